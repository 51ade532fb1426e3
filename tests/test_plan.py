"""The AOT memory planner: per-device parameter / optimizer bytes against a hand count, `fits`, the JSON CLI."""
import json
import os
import subprocess
import sys

import jax
import pytest

from llava_jax.plan import plan_step
from tests.helpers import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_8 = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "train.batch_size=16"]
PLENTY = 2.0 ** 40
GROUP_OF = {"vision": "vision_tower", "projector": "projector", "language": "language_model"}


def hand_param_counts(config) -> dict[str, tuple[int, int]]:
    """{group: (params with an embed axis: fsdp-sharded, params without one: replicated)}, from the dims.

    Replicated are the norm scales / biases and the biases along attention heads or the MLP hidden dim.
    """
    m, v, d = config.model, config.model.vision, config.model.decoder
    h, e = v.hidden_size, d.hidden_size
    q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    vision_layer = (4 * h * h + h + 2 * h * v.mlp_dim + h,          # q/k/v/o and fc1/fc2 kernels, o and fc2 biases
                    3 * h + v.mlp_dim + 4 * h)                        # q/k/v and fc1 biases, two layer norms
    patch_and_positions = v.patch_size ** 2 * v.num_channels * h + (v.num_patches + 1) * h + h   # + class token
    decoder_layer = 2 * e * q_width + 2 * e * kv_width + 3 * e * d.mlp_dim
    return {
        "vision_tower": (patch_and_positions + m.vision_layers_used * vision_layer[0],
                         2 * h + m.vision_layers_used * vision_layer[1]),
        "projector": (h * e + e * e + e, e),                                       # linear_1 bias is along "mlp"
        "language_model": (2 * d.vocab_size * e + d.num_layers * decoder_layer, (2 * d.num_layers + 1) * e),
    }


def float32_bytes_per_device(counts: tuple[int, int], fsdp: int) -> int:
    sharded, replicated = counts
    return 4 * (sharded // fsdp + replicated)


@pytest.fixture(scope="module")
def plans():
    """Plans on 8 fsdp devices for the projector-only stage and for training everything."""
    from llava_jax.config import load_config
    configs = {stage: load_config(None, TINY_MODEL + FSDP_8 + [f"train.stage={stage}"])
               for stage in ("pretrain", "full")}
    return {stage: (config, plan_step(config, jax.devices()[:8], PLENTY)) for stage, config in configs.items()}


@pytest.mark.parametrize("stage, trained", [("pretrain", ["projector"]),
                                            ("full", ["vision", "projector", "language"])])
def test_param_and_optimizer_bytes_match_a_hand_count(plans, stage, trained):
    config, plan = plans[stage]
    counts = hand_param_counts(config)
    assert plan["params"] == sum(sharded + replicated for sharded, replicated in counts.values())
    assert plan["param_bytes_per_device"] == sum(float32_bytes_per_device(c, 8) for c in counts.values())
    trainable_bytes = sum(float32_bytes_per_device(counts[GROUP_OF[name]], 8) for name in trained)
    assert plan["optimizer_bytes_per_device"] == 2 * trainable_bytes + 4   # Adam mu + nu, one int32 step count


def test_the_donated_state_is_counted_once(plans):
    _, plan = plans["full"]
    memory = plan["memory_bytes_per_device"]
    state_bytes = plan["param_bytes_per_device"] + plan["optimizer_bytes_per_device"]
    assert memory["arguments"] >= state_bytes and memory["aliased"] >= state_bytes
    assert memory["peak"] == memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["flops_per_step"] > 0


def test_fits_flips_at_the_peak(plans):
    config, plan = plans["pretrain"]
    peak = plan["memory_bytes_per_device"]["peak"]
    assert plan["fits"]
    assert plan_step(config, jax.devices()[:8], peak)["fits"]
    assert not plan_step(config, jax.devices()[:8], peak - 1)["fits"]


def test_cli_prints_one_json_object_with_a_search_and_reads_no_data():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}    # the planner sets the device count itself
    missing_data = ["data.source=llava_json", "data.json_path=/nonexistent/data.json",
                    "data.tokenizer=/nonexistent/tokenizer.model"]
    command = [sys.executable, "-m", "llava_jax.plan", "--devices", "8", "--device-memory-gib", "1", "--search",
               "--set", *TINY_MODEL, *FSDP_8, *missing_data]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["devices"] == 8 and report["mesh"]["fsdp"] == 8 and report["fits"]
    assert report["search"]["best"]["micro_batch_size"] == 2 and report["search"]["best"]["remat"] == "none"
    assert report["search"]["best"]["overrides"] == ["train.micro_batch_size=2", "model.remat=none"]
