"""Orbax checkpoints of a training run, resuming from them, and `train.init_from`.

A checkpoint is WORKDIR/checkpoints/<step>/ with three items: `state` (TrainState: params, optimizer state, step,
RNG), `data` (the Grain iterator state, one file per process) and `config` (the run config). Orbax writes a step
into a temporary directory and renames it once every process has finished, so an interrupted save is never listed
(its leftovers are deleted on the next start); a listed checkpoint that does not read back is set aside as
`<step>.unusable-<time>` and the previous one is used. A preempted run saves and exits with status 75 (see
`llava_jax.train.preemption`).

Public surface: `RunCheckpointer(directory, checkpoint_config)` with `save`, `restore`, `steps`, `close`;
`restore_or_init(setup, data_iterator, checkpointer) -> (state, report lines)`; `resume_config_changes(saved,
config, where)` (raises `ConfigMismatch`); `load_init_params(path, setup) -> InitParams`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from typing import Any, Iterator, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from llava_jax.config import CheckpointConfig, Config, config_to_dict
from llava_jax.model_params import CHECKPOINT_DIR, CONFIG, STATE, params_source, restore_params
from llava_jax.paths import is_remote
from llava_jax.train.state import TrainSetup, TrainState

DATA = "data"
# Keys that fix the params or the optimizer-state tree: a resumed run must keep them ...
STATE_KEYS = ("model.", "train.stage", "train.freeze")
# ... except these model keys, which change how the model computes but not its params.
COMPUTE_ONLY_KEYS = ("model.dtype", "model.remat", "model.attention")
MAX_REASON_CHARS = 300                                          # of a read error in a warning

log = logging.getLogger(__name__)


class ConfigMismatch(ValueError):
    """The run config changed in a way that makes the saved train state unusable."""


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    where: str                 # the checkpoint directory
    changes: list[str]         # allowed config changes, "key: saved -> now"
    data_restored: bool        # False: saved by another number of processes, the data stream starts afresh


# ------------------------------------------------------------------------------------------- checkpointer

def _manager_options(options: CheckpointConfig, read_only: bool) -> ocp.CheckpointManagerOptions:
    """Keep the `keep` newest checkpoints, plus every `keep_every`-th step for good."""
    policies = [ocp.checkpoint_managers.LatestN(options.keep)]
    if options.keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(options.keep_every))
    return ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=options.async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)


def _check_writable(directory: epath.Path) -> None:
    """Writes and deletes a probe object: a remote checkpoint.dir that cannot be written (a missing bucket, no
    permission) fails now, not at the first save hours into the run."""
    probe = directory / ".llava_jax_write_probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - each file system raises its own errors
        raise FileNotFoundError(f"checkpoint.dir {directory}: cannot write there ({type(e).__name__}: {e}); "
                                "does the bucket exist and may this host write to it?") from e


class RunCheckpointer:
    """The checkpoints under one directory (read_only: another run's, e.g. checkpoint.load_dir)."""

    def __init__(self, directory: str, options: CheckpointConfig, read_only: bool = False):
        remote = is_remote(str(directory))
        # a local path is made absolute; a remote one (gs://...) stays as it is (absolute() would make it local)
        self.directory = epath.Path(directory) if remote else epath.Path(directory).absolute()
        self.read_only = read_only
        if remote and not read_only:
            _check_writable(self.directory)          # (a local directory Orbax creates at once, failing there)
        self.manager = ocp.CheckpointManager(self.directory, options=_manager_options(options, read_only))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: Any, config: Config) -> float:
        """Starts saving checkpoint `step` in the background; returns the seconds the caller was blocked (waiting
        for the previous save, copying arrays to host memory, writing the small data and config items)."""
        start = time.perf_counter()
        self.manager.save(step, force=True, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), DATA: grain.checkpoint.CheckpointSave(data_iterator),
            CONFIG: ocp.args.JsonSave(config_to_dict(config))}))
        return time.perf_counter() - start

    def close(self) -> None:
        """Waits for a save in flight to be committed."""
        self.manager.wait_until_finished()
        self.manager.close()

    def restore(self, abstract_state: Any, data_iterator: Any, config: Config) -> Optional[Restored]:
        """Restores the newest checkpoint that reads back into `abstract_state` (whose shardings may differ from
        the saved ones) and sets `data_iterator` to its position. A newer unreadable checkpoint is warned about
        and set aside; a config change that alters the model raises ConfigMismatch. None if there are none."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            where = str(self.directory / str(step))
            try:
                saved_config = self.manager.restore(step, args=ocp.args.Composite(
                    **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
                changes = resume_config_changes(saved_config, config, where)
                state, data_restored = self._restore_state(step, abstract_state, data_iterator)
            except ConfigMismatch:
                raise
            except Exception as error:   # anything unreadable (truncated, missing or corrupt files) -> older one
                reason = f"{type(error).__name__}: {str(error)[:MAX_REASON_CHARS]}"
                log.warning("checkpoint %s cannot be restored (%s); falling back to the previous checkpoint",
                            where, reason)
                _silence_closed_loop_callbacks()
                failures.append((step, reason))
                continue
            self._set_aside([failed for failed, _ in failures])
            return Restored(step, state, where, changes, data_restored)
        if failures:
            listing = "\n".join(f"  step {step}: {reason}" for step, reason in failures)
            raise RuntimeError(f"{self.directory}: none of the checkpoints can be restored:\n{listing}\nMove the "
                               "directory away to start afresh.")
        return None

    def _restore_state(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[TrainState, bool]:
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        data_restored = self._has_data_state_for_process_count(step)
        if data_restored:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))[STATE], data_restored

    def _has_data_state_for_process_count(self, step: int) -> bool:
        """Grain stores `process_I-of-N.json` per process; a run with another N cannot continue that stream."""
        data_dir = self.directory / str(step) / DATA
        counts = {m[1] for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name) for p in data_dir.iterdir())
                  if m}
        if not counts:
            raise FileNotFoundError(f"{data_dir}: no data iterator state")
        return str(jax.process_count()) in counts

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable checkpoints out of the step listing (kept for inspection, never overwritten)."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                path.rename(path.parent / f"{step}.unusable-{int(time.time())}")
                log.warning("moved the unusable checkpoint %s aside", path)
        multihost_utils.sync_global_devices("llava_jax.checkpoint.set_aside")
        self.manager.reload()


def _is_closed_loop_callback(unraisable: Any) -> bool:
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def _silence_closed_loop_callbacks() -> None:
    """After a failed restore, tensorstore finishes the reads still in flight and calls back into Orbax's event
    loop, closed by then; each call would print a "RuntimeError: Event loop is closed" traceback (hundreds for one
    corrupt checkpoint). Drops exactly those; every other unraisable exception reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)
    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


# ------------------------------------------------------------------------------------------ config check

def _flat_config(values: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(values, sep=".")


def config_differences(saved: dict, current: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, current value) for every key (under `prefix`) whose value differs; a key only
    one side has (a config field added or removed since) pairs with None."""
    old, new = _flat_config(saved), _flat_config(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key.startswith(prefix) and old.get(key) != new.get(key)}


def _breaks_state(key: str) -> bool:
    return key.startswith(STATE_KEYS) and key not in COMPUTE_ONLY_KEYS


def resume_config_changes(saved: dict, config: Config, where: str) -> list[str]:
    """"key: saved -> now" for each config change since the checkpoint at `where` was written. Changes to the
    model's params or the optimizer-state tree (model shape, train.stage, train.freeze) raise ConfigMismatch."""
    current = config_to_dict(config)
    differences = config_differences(saved, current)
    # a key only one side has is a config field added or removed since; at its default it breaks nothing
    in_both = set(_flat_config(saved)) & set(_flat_config(current))
    breaking = [key for key in differences if _breaks_state(key) and key in in_both]
    if breaking:
        listing = ", ".join(f"{key}={differences[key][0]!r} (now {differences[key][1]!r})" for key in breaking)
        raise ConfigMismatch(f"{where} was saved with {listing}: the saved train state does not fit this model. "
                             "Restore those values, or start a new workdir with train.init_from pointing here to "
                             "reuse the matching weights.")
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items()]


# ---------------------------------------------------------------------------------------- restore or init

def _load_dir_checkpointer(load_dir: str, options: CheckpointConfig) -> RunCheckpointer:
    """checkpoint.load_dir may name a run directory (with checkpoints/) or its checkpoints directory."""
    path = epath.Path(load_dir)
    directory = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint.load_dir: {load_dir} does not exist")
    return RunCheckpointer(str(directory), options, read_only=True)


def _resume_sources(checkpointer: RunCheckpointer, options: CheckpointConfig) -> Iterator[RunCheckpointer]:
    yield checkpointer
    if options.load_dir and not checkpointer.steps():
        source = _load_dir_checkpointer(options.load_dir, options)
        if not source.steps():
            raise FileNotFoundError(f"checkpoint.load_dir: {source.directory} holds no complete checkpoint")
        yield source


def _resume_report(restored: Restored, config: Config) -> list[str]:
    lines = [f"resumed from {restored.where} (step {restored.step})"]
    lines += [f"config changed since that checkpoint: {change}" for change in restored.changes]
    if not restored.data_restored:
        lines.append(f"WARNING: the data position was saved by another number of processes than this run's "
                     f"{jax.process_count()}; the data stream starts again from its beginning")
    if config.train.init_from:
        lines.append(f"train.init_from={config.train.init_from} is ignored: the run resumes from a checkpoint")
    return lines


def restore_or_init(setup: TrainSetup, data_iterator: Any, checkpointer: RunCheckpointer,
                    run_config: Optional[Config] = None) -> tuple[TrainState, list[str]]:
    """The state to start from: the newest usable checkpoint in `checkpointer`, else in checkpoint.load_dir, else
    a fresh state (params from train.init_from when set). Also returns lines for the log. `run_config` (default
    setup.config) is what checkpoints were saved with and are compared against (the config as the user wrote it,
    `auto` values unresolved, so a run moves between backends)."""
    config = setup.config
    for source in _resume_sources(checkpointer, config.checkpoint):
        restored = source.restore(setup.abstract_state, data_iterator, run_config or config)
        if restored:
            return restored.state, _resume_report(restored, config)
    state = setup.init_state(config.train.seed)
    if not config.train.init_from:
        return state, []
    init = load_init_params(config.train.init_from, setup)
    return state.replace(params=init.merged_into(state.params)), init.report()


# --------------------------------------------------------------------------------------------- init_from

@dataclasses.dataclass
class InitParams:
    source: str                    # the item directory the params were read from
    params: dict[str, Any]         # "group/module/.../leaf" -> array, for the params the source has
    missing: list[str]             # params of this model the source lacks: left freshly initialised
    unused: list[str]              # params of the source this model does not have
    model_differences: list[str]   # model config keys that differ from the source's config

    def merged_into(self, fresh_params: dict) -> dict:
        return traverse_util.unflatten_dict({**traverse_util.flatten_dict(fresh_params, sep="/"), **self.params},
                                            sep="/")

    def report(self) -> list[str]:
        lines = [f"train.init_from: loaded {len(self.params)} of {len(self.params) + len(self.missing)} params "
                 f"from {self.source}"]
        if self.missing:
            lines.append(f"train.init_from: freshly initialised (not in the source): {', '.join(self.missing)}")
        if self.unused:
            lines.append(f"train.init_from: ignored (not in this model): {', '.join(self.unused)}")
        lines += [f"train.init_from: model config differs from the source's: {d}" for d in self.model_differences]
        return lines


def _check_compatible(wanted: dict, saved: dict[str, tuple], source: str) -> None:
    head = "language_model/lm_head/kernel"
    if (head in wanted) != (head in saved) and any(path.startswith("language_model/") for path in saved):
        tied = head not in wanted
        raise ValueError(f"train.init_from: this model has model.decoder.tie_embeddings={str(tied).lower()} but "
                         f"{source} {'holds' if tied else 'has no'} a separate lm_head; use the source's "
                         "tie_embeddings")
    for path, leaf in wanted.items():
        if path in saved and saved[path] != tuple(leaf.shape):
            raise ValueError(f"train.init_from: param {path!r} has shape {saved[path]} in {source} but this model "
                             f"needs {tuple(leaf.shape)}; fix the model config or start that part afresh")
    scanned = any("/layers/" in path for path in wanted)
    per_layer = any(re.search(r"/layers_\d+/", path) for path in saved)
    if scanned and per_layer or not scanned and any("/layers/" in path for path in saved):
        raise ValueError(f"train.init_from: {source} stores its layers "
                         f"{'one by one (layers_N)' if per_layer else 'stacked (layers)'} but this run has "
                         f"model.scan_layers={str(scanned).lower()}; use the source's model.scan_layers")
    if not set(wanted) & set(saved):
        raise ValueError(f"train.init_from: {source} has none of this model's params (is it a llava-jax "
                         "checkpoint or convert output?)")


def load_init_params(path: str, setup: TrainSetup) -> InitParams:
    """train.init_from: reads only the params (no optimizer state or step) from a converted model directory
    (`python -m llava_jax.convert` output), a run directory, its checkpoints directory (newest step) or one step
    directory (`model_params.params_source`), directly into this run's shardings. Shape mismatches and a tied /
    untied output layer that disagrees with the source raise ValueError naming the param or key."""
    source = params_source(path)
    wanted = traverse_util.flatten_dict(setup.abstract_state.params, sep="/")
    saved = source.shapes()
    _check_compatible(wanted, saved, str(source.item_dir))
    found = {p: leaf for p, leaf in wanted.items() if p in saved}
    restored = restore_params(source, traverse_util.unflatten_dict(found, sep="/"), partial=True)
    differences = config_differences(source.config, config_to_dict(setup.config), prefix="model.")
    return InitParams(
        source=str(source.item_dir), params=traverse_util.flatten_dict(restored, sep="/"),
        missing=sorted(set(wanted) - set(saved)), unused=sorted(set(saved) - set(wanted)),
        model_differences=[f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items()
                           if old != "auto"])       # an `auto` setting resolves per machine (runtime.resolve_auto)
