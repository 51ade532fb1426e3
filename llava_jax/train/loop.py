"""The training loop: set-up, restore or initialise, compile once, then data -> global batch -> train step ->
metrics -> periodic checkpoint, until train.steps or a preemption.

Public surface: `train(config, workdir) -> dict` (summary of the run; "preempted" is True when a preemption
stopped it after saving, and the caller should exit with `preemption.PREEMPTED_EXIT_CODE`).

The host never waits for the device in the steady state. Step n is dispatched (it runs asynchronously); then,
while it runs, step n's checkpoint (if due) is started, batch n+1 is read and put on the devices, and only then
are step n-1's metrics read (by now they are ready) and acted on: logging, the non-finite-step halt and the
bad-sample stop (both decided on the GLOBAL counts the step computed, so every process stops at the same step).
A checkpoint of step n holds the data position after batch n (it is saved before batch n+1 is read), so resuming
is still exact; checkpoints and evaluation are the only places the host waits for the device.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.checkpoint import CHECKPOINT_DIR, RunCheckpointer, restore_or_init
from llava_jax.config import Config, save_config
from llava_jax.data.bad_samples import REASONS, BadSampleMonitor
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.distributed import maybe_initialize_distributed
from llava_jax.evaluate import evaluate
from llava_jax.task_eval import run_task
from llava_jax.runtime import resolve_auto
from llava_jax.sharding import format_sharding_report, host_batch_to_global, make_mesh, sharding_report
from llava_jax.train.flops import peak_flops, train_step_flops
from llava_jax.train.guards import check_step_metrics
from llava_jax.train.metrics import MetricsLogger
from llava_jax.train.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch
from llava_jax.train.state import make_train_setup
from llava_jax.train.step import compile_train_step, resolve_batch_layout


@dataclasses.dataclass
class _Dispatched:
    """A step whose metrics are still on the device."""
    step: int
    keys: list                    # metric names, in the order of `metrics`
    metrics: Any                  # float32 [len(keys)] on the device
    data_time: float              # host seconds spent producing this step's batch (overlapping the previous step)
    extra: dict                   # host-side figures of this step (checkpoint blocking time, evaluation scores)


class _Reporter:
    """Reads a dispatched step's metrics and acts on them: health checks, bad samples, throughput, logging."""

    def __init__(self, config: Config, setup, logger: MetricsLogger, compile_time: float, start_step: int):
        self.config, self.logger, self.compile_time = config, logger, compile_time
        self.frozen = setup.frozen
        self.step_flops = train_step_flops(config, setup.frozen)
        self.peak = peak_flops(jax.devices()[0].device_kind)
        self.bad_samples = BadSampleMonitor(config)
        self.consecutive_bad = 0
        self.last: dict = {}
        self._previous_time = time.time()
        self._previous_step = start_step

    def report(self, done: _Dispatched, force_log: bool = False) -> None:
        config = self.config
        metrics = dict(zip(done.keys, jax.device_get(done.metrics).tolist()))      # waits for step `done.step`
        now = time.time()
        step_time = (now - self._previous_time) / max(done.step - self._previous_step, 1)
        self._previous_time, self._previous_step = now, done.step
        self.consecutive_bad = check_step_metrics(metrics, done.step, self.consecutive_bad,
                                                  config.train.max_bad_steps)
        self.bad_samples.add(int(metrics["samples"]), {r: metrics.pop(f"bad_samples/{r}") for r in REASONS})
        self.last = {**metrics, **self._throughput(metrics, step_time), "data_wait_s": done.data_time,
                     "compile_time_s": self.compile_time, "bad_steps": int(metrics["bad_steps"]),
                     **{f"bad_samples/{k}": v for k, v in self.bad_samples.counts().items()}, **done.extra}
        evaluated = any(key.startswith("eval/") for key in done.extra)
        if force_log or evaluated or done.step % config.train.log_every == 0 or done.step == config.train.steps:
            self.logger.write(done.step, self.last)
        self.logger.progress(done.step, metrics["loss"], self.last["tokens_per_s"])

    def _throughput(self, metrics: dict, step_time: float) -> dict:
        """Tokens/s and FLOP/s over all positions (padding computed too) and over real tokens only; MFU of both
        on devices with a known peak (see train/flops.py)."""
        positions = self.config.train.batch_size * self.config.data.max_length
        real_flops = train_step_flops(self.config, self.frozen, real_tokens=metrics["real_tokens"],
                                      real_images=metrics["real_images"])
        figures = {"step_time_s": step_time, "tokens_per_s": positions / step_time,
                   "real_tokens_per_s": metrics["real_tokens"] / step_time,
                   "flops_per_s": self.step_flops / step_time, "real_flops_per_s": real_flops / step_time}
        if self.peak:
            figures["mfu"] = figures["flops_per_s"] / (self.peak * jax.device_count())
            figures["real_mfu"] = figures["real_flops_per_s"] / (self.peak * jax.device_count())
        return figures


@jax.jit
def _stacked(metrics: dict) -> jax.Array:
    """A step's scalar metrics as ONE float32 vector (in sorted key order): one transfer to read them all."""
    return jnp.stack([jnp.asarray(metrics[key], jnp.float32) for key in sorted(metrics)])


def _next_global_batch(data, mesh, reporter: _Reporter) -> tuple[dict, float]:
    """Reads this process's next host batch and starts its transfer to the devices (asynchronous)."""
    start = time.time()
    host_batch = next(data)
    reporter.bad_samples.note_examples(host_batch)
    return host_batch_to_global(host_batch, mesh), time.time() - start


def _has_eval_set(config: Config) -> bool:
    return config.data.source in ("synthetic", "tfds") or config.data.eval_json_path is not None


def _scalars(prefix: str, summary: dict, depth: int = 2) -> dict[str, float]:
    """The numbers of a (nested) summary as flat "prefix/key/subkey" scalars, `depth` levels down."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
        elif isinstance(value, dict) and depth > 1:
            out.update(_scalars(f"{prefix}/{key}", value, depth - 1))
    return out


def _evaluation(config: Config, params: Any, workdir: str, step: int) -> dict[str, float]:
    """The eval set's scores (eval/<score>) and train.eval_tasks' summaries (eval/<task>/<score>)."""
    scores = {}
    if not config.train.eval_tasks or _has_eval_set(config):
        scores.update(_scalars("eval", evaluate(config, params, limit=config.train.eval_limit), depth=1))
    for task in config.train.eval_tasks:
        summary = run_task(config, params, task.task, task.data, os.path.join(workdir, "eval", task.task,
                                                                              f"step_{step}"),
                           limit=task.limit, prompt_suffix=task.prompt_suffix, batch_size=task.batch_size,
                           max_new_tokens=task.max_new_tokens, progress=False)
        scores.update(_scalars(f"eval/{task.task}", summary))
    return scores


def train(config: Config, workdir: str) -> dict:
    """Trains up to train.steps from the newest checkpoint in WORKDIR/checkpoints (or checkpoint.load_dir, or
    train.init_from's params, or scratch); saves every checkpoint.every_steps, at the end and on preemption."""
    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        save_config(config, os.path.join(workdir, "config.yaml"))
    run_config = config                      # saved with checkpoints: `auto` stays auto, the run stays portable
    config, choices = resolve_auto(config)
    mesh = make_mesh(config.mesh)
    resolve_batch_layout(config, mesh)
    setup = make_train_setup(config, mesh)
    data = make_train_iterator(config, jax.process_index(), jax.process_count())
    checkpointer = RunCheckpointer(config.checkpoint.dir or os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint)
    state, restore_report = restore_or_init(setup, data, checkpointer, run_config)
    start_step = int(jax.device_get(state.step))
    logger = MetricsLogger(workdir, config.train.steps, enabled=is_main, start_step=start_step)
    logger.message(format_sharding_report(mesh, sharding_report(setup.abstract_state.params,
                                                                setup.state_shardings.params)))
    logger.message(f"frozen: {', '.join(setup.frozen) or 'nothing'}")
    for line in choices + restore_report:
        logger.message(line)

    compile_start = time.time()
    train_step = compile_train_step(setup)
    compile_time = time.time() - compile_start
    logger.message(f"compiled the train step in {compile_time:.1f}s")

    reporter = _Reporter(config, setup, logger, compile_time, start_step)
    logger.start(start_step)
    preemption = PreemptionWatch()
    pending: Optional[_Dispatched] = None
    step, preempted = start_step, False
    try:
        if start_step < config.train.steps:
            batch, data_time = _next_global_batch(data, mesh, reporter)
        for step in range(start_step + 1, config.train.steps + 1):
            state, metrics = train_step(state, batch)                       # dispatched; runs asynchronously
            current = _Dispatched(step, sorted(metrics), _stacked(metrics), data_time, {})
            preempted = preemption.stop_requested(step) and step < config.train.steps
            if preempted or step % config.checkpoint.every_steps == 0 or step == config.train.steps:
                current.extra["checkpoint_blocking_s"] = checkpointer.save(step, state, data, run_config)
            if config.train.eval_every and step % config.train.eval_every == 0:
                current.extra.update(_evaluation(config, state.params, workdir, step))
            if step < config.train.steps and not preempted:
                batch, data_time = _next_global_batch(data, mesh, reporter)   # overlaps step `step`
            if pending is not None:
                reporter.report(pending)
            pending = current
            if preempted:
                break
        if pending is not None:
            reporter.report(pending, force_log=preempted)
            if preempted:
                logger.message(f"\npreempted: saved a checkpoint at step {step}; exiting with status "
                               f"{PREEMPTED_EXIT_CODE}, run the same command to resume")
    finally:
        checkpointer.close()   # commits a save still in flight, also when training failed
        data.close()
        preemption.close()
        logger.close()
    return {"final_step": step, "preempted": preempted, "compile_time_s": compile_time,
            "final_loss": reporter.last.get("loss", float(np.nan)), "state": state}
