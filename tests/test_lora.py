"""LoRA (train.lora): the adapters' arithmetic, what trains and what stays frozen, sharding, bfloat16 frozen
weights, generation on unmerged adapters, init_from and kill -9 resume."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from llava_jax.config import load_config, save_config
from llava_jax.generate import generate_tokens
from llava_jax.model_params import abstract_params
from llava_jax.models.llava import LlavaModel, init_params, model_variables
from llava_jax.sharding import make_mesh
from llava_jax.train.state import make_train_setup
from tests.helpers import TINY_MODEL, random_batch
from tests.run_helpers import RUN_TIMEOUT_S, TrainProcess
from tests.test_checkpoint import checkpoint_steps, losses, run_train
from tests.test_train_step import STEP_CONFIG, mesh_overrides, run_steps

LORA = ["train.lora.rank=4", "train.lora.alpha=8"]


def lora_config(*overrides):
    return load_config(None, TINY_MODEL + STEP_CONFIG + LORA + list(overrides))


def random_adapters(params, seed=1):
    """params with every adapter A and B random (B starts at zero, which would hide the update)."""
    leaves, treedef = jax.tree_util.tree_flatten(params["lora"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    lora = treedef.unflatten([0.2 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
    return {**params, "lora": lora}


def merged_by_hand(params, scale):
    """Base params with (alpha / rank) A B added to each adapted kernel: the independent reference."""
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "lora"}, sep="/")
    for path, a in traverse_util.flatten_dict(params["lora"], sep="/").items():
        if path.endswith("/a"):
            module = path[:-2]
            b = traverse_util.flatten_dict(params["lora"], sep="/")[module + "/b"]
            flat[module + "/kernel"] = flat[module + "/kernel"] + scale * jnp.matmul(a, b)
    return traverse_util.unflatten_dict(flat, sep="/")


def logits(config, params):
    batch = random_batch(config, 0, batch_size=2)
    pixels = batch["pixel_values"].astype(np.float32) / 255.0
    return LlavaModel(config.model).apply(model_variables(params), batch["input_ids"], pixels,
                                          segment_ids=batch["segment_ids"], positions=batch["positions"])


def test_fresh_adapters_leave_the_model_unchanged_and_trained_ones_equal_merged_kernels():
    config = lora_config()
    params = init_params(config.model, jax.random.PRNGKey(0))
    assert set(params["lora"]) == {"language_model"}            # train.lora.vision is off
    plain = load_config(None, TINY_MODEL + STEP_CONFIG)
    base = {k: v for k, v in params.items() if k != "lora"}
    np.testing.assert_array_equal(logits(config, params), logits(plain, base))
    adapted = random_adapters(params)
    with_adapters = logits(config, adapted)
    assert np.abs(with_adapters - logits(plain, base)).max() > 1e-2
    np.testing.assert_allclose(with_adapters, logits(plain, merged_by_hand(adapted, 8 / 4)), atol=2e-5)


def test_vision_adapters_and_target_selection():
    config = lora_config("train.lora.vision=true", "train.lora.targets=[q_proj,v_proj,fc1]")
    lora = init_params(config.model, jax.random.PRNGKey(0))["lora"]
    names = {path.split("/")[-2] for path in traverse_util.flatten_dict(lora, sep="/")}
    assert set(lora) == {"language_model", "vision_tower"} and names == {"q_proj", "v_proj", "fc1"}
    with pytest.raises(ValueError, match="train.lora.targets"):
        lora_config("train.lora.targets=[qkv]")


def test_adapters_shard_like_their_kernels():
    config = lora_config(*mesh_overrides(1, 8, 1))
    _, shardings = abstract_params(LlavaModel(config.model), make_mesh(config.mesh))
    attention = shardings["language_model"]["layers"]["self_attn"]
    lora = shardings["lora"]["language_model"]["layers"]["self_attn"]["q_proj"]
    kernel = attention["q_proj"]["kernel"].spec                  # [layers, embed -> fsdp, heads]
    assert lora["a"].spec[:2] == kernel[:2] and lora["b"].spec[2:] == kernel[2:]
    assert kernel[1] == "fsdp"


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_only_adapters_and_projector_train_and_frozen_weights_stay_bit_identical(frozen_dtype):
    config = lora_config(*mesh_overrides(2, 2, 2), "train.lora.dropout=0.1", "train.grad_accum_steps=2",
                         f"train.frozen_dtype={frozen_dtype}")
    setup = make_train_setup(config, make_mesh(config.mesh))
    assert setup.frozen == ("language_model", "vision_tower")
    initial = jax.device_get(setup.init_state(config.train.seed).params)
    run_losses, state, _ = run_steps(config, 3)
    for group in initial:
        same = [np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(initial[group]),
                                                     jax.tree_util.tree_leaves(state.params[group]))]
        assert all(same) if group in setup.frozen else not any(same), group
        dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(state.params[group])}
        assert dtypes == {frozen_dtype if group in setup.frozen else "float32"}, group
    assert sorted(state.opt_state.mu) == sorted(state.opt_state.nu) == ["lora", "projector"]
    assert run_losses[0] != run_losses[2]


def test_frozen_bfloat16_halves_the_frozen_bytes():
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        setup = make_train_setup(lora_config(f"train.frozen_dtype={dtype}"), make_mesh(lora_config().mesh))
        sizes[dtype] = sum(leaf.size * leaf.dtype.itemsize for group in setup.frozen
                           for leaf in jax.tree_util.tree_leaves(setup.abstract_state.params[group]))
    assert sizes["bfloat16"] * 2 == sizes["float32"]


def test_generation_reads_the_adapters_unmerged():
    config = lora_config()
    params = random_adapters(init_params(config.model, jax.random.PRNGKey(0)))
    plain = load_config(None, TINY_MODEL + STEP_CONFIG)
    rng = np.random.RandomState(0)
    n = config.model.tokens_per_image
    prompts = [np.concatenate([[1, 2], np.full(n, config.model.image_token_id), rng.randint(3, 200, k)])
               for k in (3, 7)]
    pixels = rng.rand(2, 1, 28, 28, 3).astype(np.float32)
    image_mask = np.ones((2, 1), np.int32)
    ours = generate_tokens(config.model, params, prompts, pixels, image_mask, 6, -1, 0)
    merged = generate_tokens(plain.model, merged_by_hand(params, 2.0), prompts, pixels, image_mask, 6, -1, 0)
    base = generate_tokens(plain.model, {k: v for k, v in params.items() if k != "lora"}, prompts, pixels,
                           image_mask, 6, -1, 0)
    np.testing.assert_array_equal(ours, merged)
    assert not np.array_equal(ours, base)


# ------------------------------------------------------------------------- runs: init_from, kill -9 resume

RUN = TINY_MODEL + [
    "data.source=synthetic", "data.synthetic_size=400", "data.num_threads=1", "data.prefetch=1",
    "train.batch_size=8", "train.steps=12", "train.learning_rate=1e-3", "train.warmup_steps=2", "train.log_every=1",
    "checkpoint.every_steps=4", "checkpoint.keep=3", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A full run (the base), a LoRA run from it (train.init_from, dropout on), and the same LoRA command killed
    with SIGKILL after its first checkpoint and rerun."""
    base = tmp_path_factory.mktemp("lora")
    full_path, lora_path = str(base / "full.yaml"), str(base / "lora.yaml")
    save_config(load_config(None, RUN + ["train.stage=full", "train.steps=4"]), full_path)
    full = str(base / "full")
    run_train(full_path, full)
    save_config(load_config(None, RUN + LORA + ["train.lora.dropout=0.1", f"train.init_from={full}"]), lora_path)
    reference = str(base / "reference")
    reference_output = run_train(lora_path, reference)
    interrupted = str(base / "interrupted")
    killed = TrainProcess(lora_path, interrupted)
    killed.wait_until(lambda: os.path.isdir(os.path.join(interrupted, "checkpoints", "4")), "checkpoint 4")
    killed.signal(signal.SIGKILL)
    killed.process.wait(timeout=RUN_TIMEOUT_S)
    killed_at = checkpoint_steps(interrupted)[-1]
    run_train(lora_path, interrupted)
    return {"full": full, "reference": reference, "interrupted": interrupted, "killed_at": killed_at,
            "reference_output": reference_output, "config": lora_path}


@pytest.mark.slow
def test_lora_run_resumes_bitwise_after_kill(lora_runs):
    assert lora_runs["killed_at"] < 12
    assert losses(lora_runs["interrupted"]) == losses(lora_runs["reference"])


@pytest.mark.slow
def test_lora_run_starts_from_the_full_run_with_fresh_adapters(lora_runs):
    from llava_jax.model_params import load_model
    _, full = load_model(lora_runs["full"])
    _, lora = load_model(lora_runs["reference"])
    for group in ("language_model", "vision_tower"):
        for a, b in zip(jax.tree_util.tree_leaves(full[group]), jax.tree_util.tree_leaves(lora[group])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "freshly initialised (not in the source): lora/" in lora_runs["reference_output"]
