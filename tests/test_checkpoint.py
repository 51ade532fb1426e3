"""Checkpoints end to end: `python train.py` subprocesses on a tiny model with synthetic data (8 CPU devices).

One uninterrupted reference run and one run that is killed (-9), resumed, stopped by SIGTERM and resumed again are
shared by several tests; the corrupt-checkpoint and mesh-change runs start from copies of the reference workdir.
"""
import glob
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import traverse_util

from llava_jax.checkpoint import (CHECKPOINT_DIR, ConfigMismatch, RunCheckpointer, load_init_params,
                                  resume_config_changes)
from llava_jax.config import config_to_dict, load_config, save_config
from llava_jax.convert import save_converted
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.sharding import make_mesh
from llava_jax.train.metrics import drop_records_after
from llava_jax.train.preemption import PREEMPTED_EXIT_CODE
from llava_jax.train.state import make_train_setup
from tests.helpers import TINY_MODEL
from tests.run_helpers import RUN_TIMEOUT_S, TrainProcess

pytestmark = pytest.mark.slow

STEPS = 24
RUN = TINY_MODEL + [
    "data.source=synthetic", "data.synthetic_size=400", "data.num_threads=1", "data.prefetch=1",
    "train.batch_size=8", f"train.steps={STEPS}", "train.learning_rate=1e-3", "train.warmup_steps=2",
    "train.stage=full", "train.log_every=1", "checkpoint.every_steps=4", "checkpoint.keep=2",
    "checkpoint.keep_every=8", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]


# ------------------------------------------------------------------------------------------------ helpers

def run_train(config_path: str, workdir: str, *overrides: str) -> str:
    return TrainProcess(config_path, workdir, *overrides).wait()


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir: str) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in metrics(workdir)}


def checkpoint_steps(workdir: str) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, CHECKPOINT_DIR)) if name.isdigit())


def data_state(workdir: str, step: int) -> dict:
    with open(os.path.join(workdir, CHECKPOINT_DIR, str(step), "data", "process_0-of-1.json")) as f:
        return json.load(f)


def batch_ids(iterator, count: int) -> list[list[str]]:
    return [list(next(iterator)["_ids"]) for _ in range(count)]


def copy_run(source: str, destination: str, keep_steps: list[int]) -> str:
    """A copy of a finished run keeping only the checkpoints of `keep_steps` (metrics beyond them are dropped by
    the resumed run itself)."""
    shutil.copytree(source, destination)
    for step in set(checkpoint_steps(destination)) - set(keep_steps):
        shutil.rmtree(os.path.join(destination, CHECKPOINT_DIR, str(step)))
    return destination


def params_of(path: str, config_path: str, *overrides: str) -> dict:
    """Flat params ("group/.../leaf" -> numpy) of a run / checkpoint / converted directory."""
    config = load_config(config_path, list(overrides))
    restored = load_init_params(path, make_train_setup(config, make_mesh(config.mesh)))
    return {name: np.asarray(value) for name, value in restored.params.items()}


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def config_path(base):
    path = os.path.join(base, "tiny.yaml")
    save_config(load_config(None, RUN), path)
    return path


@pytest.fixture(scope="module")
def reference(base, config_path):
    """An uninterrupted run of STEPS steps."""
    workdir = os.path.join(base, "reference")
    run_train(config_path, workdir)
    return workdir


@pytest.fixture(scope="module")
def interrupted(base, config_path):
    """The same command killed with SIGKILL after its first checkpoint, rerun and stopped with SIGTERM, rerun to
    the end. Returns the workdir, each leg's output and the data states of the checkpoints resumed from."""
    workdir = os.path.join(base, "interrupted")
    killed = TrainProcess(config_path, workdir)
    killed.wait_until(lambda: os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR, "4")), "checkpoint 4")
    killed.signal(signal.SIGKILL)
    killed.process.wait(timeout=RUN_TIMEOUT_S)
    killed_at = checkpoint_steps(workdir)[-1]
    states = {killed_at: data_state(workdir, killed_at)}

    stopped = TrainProcess(config_path, workdir)
    stopped.wait_until(lambda: f"step {killed_at + 2}/{STEPS}" in stopped.output(), f"step {killed_at + 2}")
    stopped.signal(signal.SIGTERM)
    stopped_output = stopped.wait(expected_status=PREEMPTED_EXIT_CODE)
    stopped_at = checkpoint_steps(workdir)[-1]
    states[stopped_at] = data_state(workdir, stopped_at)

    final_output = run_train(config_path, workdir)
    return {"workdir": workdir, "killed_at": killed_at, "stopped_at": stopped_at, "states": states,
            "stopped_output": stopped_output, "final_output": final_output}


# ------------------------------------------------------------------------------------------------- tests

def test_checkpoints_keep_the_newest_and_every_kth_step(reference):
    # every_steps=4, keep=2, keep_every=8 over 24 steps: 20 and 24 are the newest, 8 and 16 are kept for good.
    assert checkpoint_steps(reference) == [8, 16, 20, 24]


def test_resume_after_kill_and_sigterm_gives_bitwise_equal_losses(reference, interrupted):
    assert interrupted["killed_at"] < interrupted["stopped_at"] < STEPS
    assert losses(interrupted["workdir"]) == losses(reference)


def test_metrics_hold_each_step_once_after_resumes(interrupted):
    assert [record["step"] for record in metrics(interrupted["workdir"])] == list(range(1, STEPS + 1))


def test_sigterm_saves_the_current_step_and_exits_75(interrupted):
    output = interrupted["stopped_output"]
    assert f"saved a checkpoint at step {interrupted['stopped_at']}" in output
    assert f"resumed from {interrupted['workdir']}/{CHECKPOINT_DIR}/{interrupted['killed_at']} " in output
    assert f"{CHECKPOINT_DIR}/{interrupted['stopped_at']} (step {interrupted['stopped_at']})" in \
        interrupted["final_output"]


def test_resumed_data_stream_neither_repeats_nor_skips(config_path, interrupted):
    config = load_config(config_path)
    expected = batch_ids(make_train_iterator(config), STEPS)
    assert len({i for batch in expected for i in batch}) == STEPS * config.train.batch_size   # one epoch, no repeat
    for step, state in interrupted["states"].items():
        iterator = make_train_iterator(config)
        iterator.set_state(state)
        assert batch_ids(iterator, STEPS - step) == expected[step:], f"data resumed at step {step}"


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(base, config_path, reference):
    workdir = copy_run(reference, os.path.join(base, "corrupt"), [16, 20, 24])
    newest = os.path.join(workdir, CHECKPOINT_DIR, "24")
    for path in glob.glob(os.path.join(newest, "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)
    interrupted_save = os.path.join(workdir, CHECKPOINT_DIR, "28.orbax-checkpoint-tmp-1")
    shutil.copytree(newest, interrupted_save)

    output = run_train(config_path, workdir)
    assert f"{newest} cannot be restored" in output and "falling back to the previous checkpoint" in output
    assert f"resumed from {workdir}/{CHECKPOINT_DIR}/20 (step 20)" in output
    assert losses(workdir) == losses(reference)
    assert glob.glob(newest + ".unusable-*") and not os.path.exists(interrupted_save)
    assert checkpoint_steps(workdir)[-1] == 24


def test_load_dir_resumes_on_another_mesh_like_the_uninterrupted_run(base, config_path, reference):
    saved_on_fsdp8 = copy_run(reference, os.path.join(base, "saved_on_fsdp8"), [8])
    workdir = os.path.join(base, "resumed_on_2x4")
    output = run_train(config_path, workdir, f"checkpoint.load_dir={saved_on_fsdp8}", "mesh.data=2", "mesh.fsdp=4")
    assert f"resumed from {saved_on_fsdp8}/{CHECKPOINT_DIR}/8 (step 8)" in output
    assert "config changed since that checkpoint: mesh.data: 1 -> 2" in output
    resumed, expected = losses(workdir), losses(reference)
    assert sorted(resumed) == list(range(9, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in resumed], [expected[s] for s in resumed], rtol=1e-5)
    assert checkpoint_steps(workdir) == [16, 20, 24] and checkpoint_steps(saved_on_fsdp8) == [8]


def test_stage_two_starts_from_stage_one_projector_and_converted_towers(base, config_path):
    config = load_config(config_path)
    setup = make_train_setup(config, make_mesh(config.mesh))
    towers = jax.device_get(setup.init_state(seed=7).params)
    del towers["projector"]                      # HF towers: a vision model and a language model, no projector
    converted = os.path.join(base, "towers")
    save_converted(converted, config, towers)

    stage1 = os.path.join(base, "stage1")
    stage1_output = run_train(config_path, stage1, "train.stage=pretrain", f"train.init_from={converted}",
                              "train.steps=3", "checkpoint.every_steps=3")
    assert "train.init_from: freshly initialised (not in the source): projector/" in stage1_output
    stage2 = os.path.join(base, "stage2")
    stage2_output = run_train(config_path, stage2, "train.freeze=[vision, projector]", f"train.init_from={stage1}",
                              "train.steps=2", "checkpoint.every_steps=2")
    assert re.search(rf"loaded (\d+) of \1 params from {stage1}/{CHECKPOINT_DIR}/3/state", stage2_output)

    source = traverse_util.flatten_dict(towers, sep="/")
    stage1_params = params_of(stage1, config_path)
    stage2_params = params_of(stage2, config_path)
    for name, value in stage2_params.items():
        if name.startswith("projector/"):
            np.testing.assert_array_equal(value, stage1_params[name], err_msg=name)
        elif name.startswith("vision_tower/"):
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    language = [name for name in source if name.startswith("language_model/")]
    assert all(np.array_equal(stage1_params[name], source[name]) for name in language)   # frozen in stage 1
    assert not any(np.array_equal(stage2_params[name], source[name]) for name in language)  # trained in stage 2


# ----------------------------------------------------------------------------------------- in-process checks

def test_model_change_on_resume_is_an_error_naming_the_key(config_path, reference):
    config = load_config(config_path, ["model.decoder.mlp_dim=128"])
    setup = make_train_setup(config, make_mesh(config.mesh))
    checkpointer = RunCheckpointer(os.path.join(reference, CHECKPOINT_DIR), config.checkpoint, read_only=True)
    with pytest.raises(ConfigMismatch, match=r"model\.decoder\.mlp_dim=96 \(now 128\)"):
        checkpointer.restore(setup.abstract_state, make_train_iterator(config), config)


def test_safe_config_changes_are_reported(config_path):
    saved = config_to_dict(load_config(config_path))
    changes = resume_config_changes(saved, load_config(config_path, ["train.steps=50", "model.dtype=bfloat16",
                                                                     "mesh.fsdp=4", "mesh.data=2"]), "ckpt")
    assert changes == ["mesh.data: 1 -> 2", "mesh.fsdp: 8 -> 4", "model.dtype: 'float32' -> 'bfloat16'",
                       "train.steps: 24 -> 50"]


@pytest.mark.parametrize("override,key", [("train.stage=pretrain", "train.stage"),
                                          ("model.projector.type=linear", "model.projector.type")])
def test_changes_to_the_state_tree_are_errors(config_path, override, key):
    saved = config_to_dict(load_config(config_path))
    with pytest.raises(ConfigMismatch, match=key.replace(".", r"\.")):
        resume_config_changes(saved, load_config(config_path, [override]), "ckpt")


def test_a_config_field_added_since_the_checkpoint_is_not_a_mismatch(config_path):
    saved = config_to_dict(load_config(config_path))
    del saved["model"]["decoder"]["qkv_bias"]
    assert resume_config_changes(saved, load_config(config_path), "ckpt") == ["model.decoder.qkv_bias: None -> False"]


def test_data_saved_by_another_process_count_restarts_the_stream_with_a_warning(base, config_path, reference):
    checkpoints = os.path.join(copy_run(reference, os.path.join(base, "two_processes"), [24]), CHECKPOINT_DIR)
    data_dir = os.path.join(checkpoints, "24", "data")
    os.rename(os.path.join(data_dir, "process_0-of-1.json"), os.path.join(data_dir, "process_0-of-2.json"))
    config = load_config(config_path)
    setup = make_train_setup(config, make_mesh(config.mesh))
    checkpointer = RunCheckpointer(checkpoints, config.checkpoint)
    restored = checkpointer.restore(setup.abstract_state, make_train_iterator(config), config)
    checkpointer.close()
    assert restored.step == 24 and not restored.data_restored


def test_init_from_shape_mismatch_names_the_param(config_path, reference):
    config = load_config(config_path, ["model.decoder.vocab_size=320"])
    with pytest.raises(ValueError, match="param 'language_model/embed_tokens/embedding' has shape"):
        load_init_params(reference, make_train_setup(config, make_mesh(config.mesh)))


def test_init_from_with_the_other_tie_embeddings_flag_is_refused(config_path, reference):
    config = load_config(config_path, ["model.decoder.tie_embeddings=true"])       # the reference run is untied
    with pytest.raises(ValueError, match="tie_embeddings=true but .* holds a separate lm_head"):
        load_init_params(reference, make_train_setup(config, make_mesh(config.mesh)))


def test_dropping_metrics_after_a_step_keeps_whole_earlier_records(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n{"step": 3, "loss": 2.0}\n{"step": 4, "lo')
    drop_records_after(path, 2)
    with open(path) as f:
        assert f.read() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'
