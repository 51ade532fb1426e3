"""`python train.py` end to end: loss falls and metrics are written; errors name the key; Megatron flags map onto
config keys; 2 processes x 4 devices train exactly like 1 process x 8 devices and stop together on bad data."""
import json
import os
import socket

import numpy as np
import pytest
from data_helpers import image_dataset

from llava_jax.cli import megatron_overrides
from llava_jax.config import load_config
from llava_jax.data.pipeline import EpochShuffle
from tests.helpers import TINY_MODEL
from tests.run_helpers import TrainProcess
from train import main as train_main, parse_args

pytestmark = pytest.mark.slow

RUN = TINY_MODEL + ["data.source=synthetic", "data.synthetic_size=200", "data.num_threads=1", "train.batch_size=8",
                    "train.learning_rate=3e-3", "train.warmup_steps=2", "train.stage=full", "train.log_every=1",
                    "checkpoint.every_steps=1000"]
METRIC_KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "data_wait_s",
               "compile_time_s", "flops_per_s", "real_tokens_per_s", "real_flops_per_s", "real_tokens", "samples",
               "bad_steps"}


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_run_learns_and_writes_metrics_config_and_tensorboard(tmp_path):
    workdir = str(tmp_path / "run")
    output = TrainProcess("configs/demo.yaml", workdir, *RUN, "train.steps=40", "mesh.fsdp=8",
                          "train.eval_every=20", "train.eval_limit=8").wait()
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert METRIC_KEYS <= set(records[0])
    assert [r["step"] for r in records if "eval/accuracy" in r] == [20, 40]
    assert all(r["eval/n"] == 8 and 0 <= r["eval/blind_accuracy"] <= 1 for r in records if "eval/n" in r)
    assert np.mean([r["loss"] for r in records[-5:]]) < 0.8 * np.mean([r["loss"] for r in records[:5]])
    assert load_config(os.path.join(workdir, "config.yaml")).train.steps == 40
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in output and "compiled the train step" in output


@pytest.mark.parametrize("overrides,key", [
    (["trian.steps=3"], "train"),
    (["mesh.data=3"], "mesh"),
    (["train.batch_size=12", "mesh.fsdp=8"], "train.batch_size"),
])
def test_bad_settings_exit_2_naming_the_key(tmp_path, capsys, overrides, key):
    args = ["--config", "configs/demo.yaml", "--workdir", str(tmp_path / "w"), "--set", *TINY_MODEL, *overrides]
    assert train_main(args) == 2
    assert key in capsys.readouterr().err


def test_megatron_command_line_maps_onto_config_keys(tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text("[]")
    args = parse_args(["--config", "configs/llava15_7b_stage1.yaml", "--num-layers", "4", "--hidden-size", "256",
                       "--num-attention-heads", "8", "--seq-length", "1024", "--vision-backbone-type", "siglip",
                       "--vision-model-type", "siglip", "--img-h", "224", "--img-w", "224", "--patch-dim", "16",
                       "--data-path", str(data), "--micro-batch-size", "2", "--global-batch-size", "64",
                       "--lr", "1e-4", "--train-iters", "7", "--freeze-LM", "--freeze-ViT", "--save", "out",
                       "--load", "previous", "--save-interval", "5"])
    overrides, workdir = megatron_overrides(args)
    config = load_config(args.config, overrides)
    d, v, t = config.model.decoder, config.model.vision, config.train
    assert (d.num_layers, d.hidden_size, d.num_heads, config.data.max_length) == (4, 256, 8, 1024)
    assert (v.kind, v.image_size, v.patch_size) == ("siglip", 224, 16)
    assert (config.data.source, config.data.json_path) == ("llava_json", str(data))
    assert (t.micro_batch_size, t.batch_size, t.learning_rate, t.steps) == (2, 64, 1e-4, 7)
    assert sorted(t.freeze) == ["language", "vision"]
    assert (workdir, config.checkpoint.load_dir, config.checkpoint.every_steps) == ("out", "previous", 5)


def test_set_accepts_several_items_and_repeats():
    args = parse_args(["--set", "train.steps=3", "train.seed=4", "--set", "train.log_every=2"])
    assert args.overrides == ["train.steps=3", "train.seed=4", "train.log_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    steps = ["train.steps=3", "mesh.data=2", "mesh.fsdp=4"]
    single = str(tmp_path / "single")
    TrainProcess("configs/demo.yaml", single, *RUN, *steps).wait()
    port = free_port()
    multi = str(tmp_path / "multi")
    processes = [TrainProcess("configs/demo.yaml", multi, *RUN, *steps, env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_INIT_TIMEOUT_S": "120"}) for i in range(2)]
    outputs = [p.wait() for p in processes]
    assert "over 8 cpu devices" in outputs[0]
    single_losses = [r["loss"] for r in read_metrics(single)]
    multi_losses = [r["loss"] for r in read_metrics(multi)]
    assert len(multi_losses) == 3
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)


def test_bad_data_read_by_one_process_stops_both_at_the_same_step(tmp_path):
    """Only process 0 ever reads a bad record (its share of the shuffled stream has no images); the global counts
    the train step sums make both processes stop together, instead of one stopping while the other waits in the
    next step's collective."""
    num_records = 32
    path = image_dataset(tmp_path, num_records)
    order = EpochShuffle(num_records, seed=0, stream=0).permutation(0)
    for position in range(0, num_records, 2):                          # process 0 reads positions 0, 2, 4, ...
        os.remove(tmp_path / f"img{order[position]}.png")
    port = free_port()
    settings = ["data.source=llava_json", f"data.json_path={path}", "data.bad_fraction_min_samples=16",
                "data.max_bad_fraction=0.25", "train.steps=8", "mesh.data=2", "mesh.fsdp=4"]
    processes = [TrainProcess("configs/demo.yaml", str(tmp_path / "run"), *RUN, *settings, env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_INIT_TIMEOUT_S": "120"}) for i in range(2)]
    outputs = [p.wait(expected_status=1) for p in processes]
    for output in outputs:
        assert "BadDataError: 8 of 16 samples were bad (50.00% > data.max_bad_fraction=25.00%)" in output
    assert "missing_image" in outputs[0].split("First bad samples:")[1]
