"""The AOT memory planner: per-device parameter / optimizer bytes and the floor against a hand count, `fits`, the
accelerator graph (no CPU-only layouts), the largest buffers at the peak, the JSON CLI."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from llava_jax.plan import lower_for_accelerator, plan_step
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
    """Plans on 8 fsdp devices for the projector-only stage, for training everything, and for training everything
    with bfloat16 Adam moments."""
    from llava_jax.config import load_config
    overrides = {"pretrain": ["train.stage=pretrain"], "full": ["train.stage=full"],
                 "full_bf16_moments": ["train.stage=full", "train.optimizer_state_dtype=bfloat16"]}
    configs = {name: load_config(None, TINY_MODEL + FSDP_8 + extra) for name, extra in overrides.items()}
    return {name: (config, plan_step(config, jax.devices()[:8], PLENTY)) for name, config in configs.items()}


@pytest.mark.parametrize("stage, trained", [("pretrain", ["projector"]),
                                            ("full", ["vision", "projector", "language"])])
def test_param_and_optimizer_bytes_match_a_hand_count(plans, stage, trained):
    config, plan = plans[stage]
    counts = hand_param_counts(config)
    assert plan["params"] == sum(sharded + replicated for sharded, replicated in counts.values())
    assert plan["param_bytes_per_device"] == sum(float32_bytes_per_device(c, 8) for c in counts.values())
    trainable_bytes = sum(float32_bytes_per_device(counts[GROUP_OF[name]], 8) for name in trained)
    assert plan["optimizer_bytes_per_device"] == 2 * trainable_bytes + 4   # Adam mu + nu, one int32 step count


@pytest.mark.parametrize("stage, trained", [("pretrain", ["projector"]),
                                            ("full", ["vision", "projector", "language"])])
def test_floor_parts_match_a_hand_count_and_add_up(plans, stage, trained):
    config, plan = plans[stage]
    counts, m = hand_param_counts(config), config.model
    trainable_bytes = sum(float32_bytes_per_device(counts[GROUP_OF[name]], 8) for name in trained)
    rows = 16 // 8                       # train.batch_size / fsdp devices, one micro-batch; float32 compute
    decoder = m.decoder.num_layers * rows * config.data.max_length * m.decoder.hidden_size * 4
    vision = m.vision_layers_used * rows * (m.vision.num_patches + 1) * m.vision.hidden_size * 4
    assert plan["floor_parts"] == {
        "params": plan["param_bytes_per_device"], "gradients": trainable_bytes,
        "optimizer_state": plan["optimizer_bytes_per_device"], "decoder_activations": decoder,
        "vision_activations": vision if "vision" in trained else 0}   # a frozen tower keeps nothing
    assert plan["floor_bytes"] == sum(plan["floor_parts"].values())
    assert plan["floor_gib"] == round(plan["floor_bytes"] / 2 ** 30, 3)


@pytest.mark.parametrize("name", ["pretrain", "full", "full_bf16_moments"])
def test_peak_over_floor_is_the_peak_divided_by_the_floor(plans, name):
    _, plan = plans[name]
    assert plan["peak_over_floor"] == plan["memory_bytes_per_device"]["peak"] / plan["floor_bytes"]
    assert plan["peak_over_floor"] > 1


def test_bfloat16_moments_shrink_the_floor_by_half_the_moment_bytes(plans):
    (_, float32), (_, bfloat16) = plans["full"], plans["full_bf16_moments"]
    moment_bytes = float32["optimizer_bytes_per_device"] - 4            # mu + nu in float32; the int32 count stays
    assert bfloat16["optimizer_state_dtype"] == "bfloat16" and float32["optimizer_state_dtype"] == "float32"
    assert float32["floor_bytes"] - bfloat16["floor_bytes"] == moment_bytes // 2
    assert bfloat16["optimizer_bytes_per_device"] == moment_bytes // 2 + 4


def test_the_plan_is_the_accelerator_graph_while_cpu_training_keeps_its_layouts(plans):
    """The CPU lowering (first, so a trace cache would hand its barriers on) has swap_last_two's optimization
    barriers; the planner's lowering of the same step has none."""
    import flax.linen as nn

    from llava_jax.sharding import LOGICAL_RULES, make_mesh
    from llava_jax.train.state import make_train_setup
    from llava_jax.train.step import abstract_batch, jit_train_step, resolve_batch_layout
    config, _ = plans["full"]
    setup = make_train_setup(config, make_mesh(config.mesh, jax.devices()[:8]))
    resolve_batch_layout(setup.config, setup.mesh)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        cpu = jit_train_step(setup).lower(setup.abstract_state, abstract_batch(setup.config, setup.mesh)).as_text()
    assert cpu.count("optimization_barrier") > 0
    assert lower_for_accelerator(setup).as_text().count("optimization_barrier") == 0


def test_explain_lists_the_largest_buffers_live_at_the_peak(plans):
    config, plan = plans["pretrain"]
    explained = plan_step(config, jax.devices()[:8], PLENTY, explain=5)["peak_buffers"]
    sizes = [buffer["bytes"] for buffer in explained["buffers"]]
    assert 0 < len(sizes) <= 5 and sizes == sorted(sizes, reverse=True)
    assert sum(sizes) <= explained["live_bytes_at_peak"] <= plan["memory_bytes_per_device"]["temporaries"]
    assert any("LlavaModel" in buffer["op_name"] for buffer in explained["buffers"])


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


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (requirements-test.txt) not installed")
def test_topology_compiles_for_a_tpu_slice_with_its_kernel():
    """--topology: XLA:TPU compiles the step for a v5e 2x2 slice on this CPU machine; auto picks splash and packs.
    The TPU step keeps no [heads, T, T] scores, so at a length where those dominate it plans less than the CPU."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    common = ["--set", *TINY_MODEL, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "train.batch_size=4",
              "model.dtype=bfloat16", "model.decoder.hidden_size=128", "model.decoder.num_heads=1",
              "model.decoder.num_kv_heads=1", "model.vision.hidden_size=256", "model.vision.num_heads=2",
              "data.max_length=2048", "data.pack=auto"]
    reports = {}
    for target in (["--topology", "v5e:2x2"], ["--devices", "4"]):
        result = subprocess.run([sys.executable, "-m", "llava_jax.plan", *target, *common], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[target[0]] = json.loads(result.stdout)
    tpu, cpu = reports["--topology"], reports["--devices"]
    assert tpu["platform"] == "tpu" and tpu["devices"] == 4 and tpu["mesh"]["fsdp"] == 4
    assert (tpu["attention"], tpu["pack"], cpu["attention"]) == ("splash", True, "xla")
    scores = 2 * 2048 * 2048 * 4          # one [batch 1, heads 1, T, T] float32 score matrix (and its gradient)
    assert tpu["memory_bytes_per_device"]["temporaries"] < cpu["memory_bytes_per_device"]["temporaries"] - scores
