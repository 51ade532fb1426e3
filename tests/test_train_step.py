"""The sharded train step: mesh invariance, exact accumulation, real freezing, NaN guard, one compilation."""
import jax
import numpy as np
import pytest

from llava_jax.data.images import ImageProcessor
from llava_jax.models.llava import LlavaModel
from llava_jax.sharding import host_batch_to_global, make_mesh
from llava_jax.train.guards import StopTraining, check_step_metrics as _check_step
from llava_jax.train.state import make_train_setup
from llava_jax.train.loss import cross_entropy_sums
from llava_jax.train.step import compile_train_step, in_place_stacks, jit_train_step
from tests.helpers import TINY_MODEL, random_batch

STEP_CONFIG = ["data.max_length=32", "train.batch_size=8", "train.learning_rate=1e-3", "train.stage=full",
               "train.warmup_steps=1"]
MESH_SIZES = ["mesh.data", "mesh.fsdp", "mesh.tensor"]


def mesh_overrides(data, fsdp, tensor):
    return [f"{k}={v}" for k, v in zip(MESH_SIZES, (data, fsdp, tensor))]


def run_steps(config, num_steps, devices=None, batch_size=None):
    mesh = make_mesh(config.mesh, devices)
    setup = make_train_setup(config, mesh)
    state = setup.init_state(config.train.seed)
    step = compile_train_step(setup)
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, host_batch_to_global(random_batch(config, i, batch_size), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state), setup


@pytest.fixture(scope="module")
def single_device_run():
    from llava_jax.config import load_config
    config = load_config(None, TINY_MODEL + STEP_CONFIG + mesh_overrides(1, 1, 1))
    return run_steps(config, 3, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_losses_and_params_match_single_device(tiny_config, single_device_run, mesh):
    ref_losses, ref_state, _ = single_device_run
    losses, state, _ = run_steps(tiny_config(*STEP_CONFIG, *mesh_overrides(*mesh)), 3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[0] != ref_losses[2]
    for ref, got in zip(jax.tree_util.tree_leaves(ref_state.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 4, 1)])
def test_vocab_parallel_loss_matches_the_gathered_head(tiny_config, mesh):
    """train.loss_vocab_parallel gives the losses and params of the FSDP-gathered LM head, and its compiled step
    never holds the whole [embed, vocab] head kernel (the gathered one does)."""
    common = [*STEP_CONFIG, "model.decoder.vocab_size=304", "train.loss_chunk_size=8", *mesh_overrides(*mesh)]
    runs, programs = {}, {}
    for vocab_parallel in (True, False):
        config = tiny_config(*common, f"train.loss_vocab_parallel={str(vocab_parallel).lower()}")
        runs[vocab_parallel] = run_steps(config, 2)
        programs[vocab_parallel] = compile_train_step(runs[vocab_parallel][2]).as_text()
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6)
    for ref, got in zip(*(jax.tree_util.tree_leaves(runs[key][1].params) for key in (False, True))):
        np.testing.assert_allclose(got, ref, atol=1e-6)
    gathers = {key: [line for line in text.splitlines() if "all-gather(" in line and "[48,304]" in line]
               for key, text in programs.items()}
    assert gathers[False] and not gathers[True], gathers


def test_grad_accumulation_equals_one_big_batch(tiny_config):
    big = tiny_config(*STEP_CONFIG, "train.batch_size=32", *mesh_overrides(8, 1, 1))
    accumulated = tiny_config(*STEP_CONFIG, "train.batch_size=32", "train.grad_accum_steps=4",
                              *mesh_overrides(8, 1, 1))
    big_losses, big_state, _ = run_steps(big, 1)
    acc_losses, acc_state, _ = run_steps(accumulated, 1)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-6)
    for ref, got in zip(jax.tree_util.tree_leaves(big_state.params), jax.tree_util.tree_leaves(acc_state.params)):
        np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 2, 4)])
def test_row_kernels_sharded_on_their_input_match_single_device(tiny_config, single_device_run, mesh):
    """model.fsdp_row_kernels=input: o_proj / down_proj / fc2 shard their heads / MLP dim over tensor x fsdp and keep
    embed whole; the step is the single-device one."""
    ref_losses, ref_state, _ = single_device_run
    losses, state, setup = run_steps(tiny_config(*STEP_CONFIG, "model.fsdp_row_kernels=input", *mesh_overrides(*mesh)),
                                     3)
    spec = setup.state_shardings.params["language_model"]["layers"]["mlp"]["down_proj"]["kernel"].spec
    assert tuple(spec) == (None, ("tensor", "fsdp"), None)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for ref, got in zip(jax.tree_util.tree_leaves(ref_state.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)])
def test_in_place_accumulation_equals_the_plain_sum(tiny_config, mesh):
    """models/accumulate.py: the layer stacks' backward adds into the carried gradients; same losses and params as
    accumulating a fresh gradient per micro-batch, and as one big batch."""
    common = [*STEP_CONFIG, "train.batch_size=32", "model.remat=full", *mesh_overrides(*mesh)]
    in_place = tiny_config(*common, "train.grad_accum_steps=4")
    plain = tiny_config(*common, "train.grad_accum_steps=4", "train.accumulate_in_place=false")
    big = tiny_config(*common)
    runs = [run_steps(config, 2) for config in (in_place, plain, big)]
    assert in_place_stacks(runs[0][2].config, runs[0][2].frozen) == ("vision_tower", "language_model")
    assert in_place_stacks(runs[1][2].config, runs[1][2].frozen) == ()
    for losses, state, _ in runs[1:]:
        np.testing.assert_allclose(runs[0][0], losses, rtol=1e-6)
        for ref, got in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(runs[0][1].params)):
            np.testing.assert_allclose(got, ref, atol=1e-6)


def test_in_place_accumulation_saves_one_gradient_of_the_stacks(tiny_config):
    """The compiled step's temporaries shrink by about the stacked trainable weights' bytes (the per-micro-batch
    gradient buffer the plain path allocates)."""
    from llava_jax.plan import memory_figures
    common = [*STEP_CONFIG, "train.batch_size=32", "model.remat=full", "train.grad_accum_steps=4",
              "model.decoder.num_layers=8", "model.decoder.mlp_dim=256", *mesh_overrides(1, 8, 1)]
    temps = {}
    for in_place in (True, False):
        config = tiny_config(*common, f"train.accumulate_in_place={str(in_place).lower()}")
        setup = make_train_setup(config, make_mesh(config.mesh))
        temps[in_place] = memory_figures(compile_train_step(setup))["temporaries"]
    stacked = sum(leaf.size * 4 for group in ("vision_tower", "language_model")
                  for leaf in jax.tree_util.tree_leaves(setup.abstract_state.params[group]["layers"])) / 8
    # (the backward keeps one layer's accumulator slice live for the anchor in models/accumulate._anchored)
    assert temps[False] - temps[True] >= 0.85 * stacked, (temps, stacked)


@pytest.mark.parametrize("stage,frozen", [("pretrain", ("vision_tower", "language_model")),
                                          ("finetune", ("vision_tower",))])
def test_frozen_parts_stay_bit_identical_and_have_no_optimizer_state(tiny_config, stage, frozen):
    config = tiny_config(*STEP_CONFIG, f"train.stage={stage}", *mesh_overrides(2, 4, 1))
    mesh = make_mesh(config.mesh)
    setup = make_train_setup(config, mesh)
    initial = jax.device_get(setup.init_state(0).params)
    _, state, _ = run_steps(config, 2)
    for group in initial:
        same = [np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(initial[group]),
                                                     jax.tree_util.tree_leaves(state.params[group]))]
        assert all(same) if group in frozen else not any(same), group
    trainable_leaves = sum(len(jax.tree_util.tree_leaves(state.params[g])) for g in state.params if g not in frozen)
    moments = [leaf for leaf in jax.tree_util.tree_leaves(state.opt_state) if leaf.ndim > 0]
    assert len(moments) == 2 * trainable_leaves   # Adam mu + nu for trainable leaves only


def test_custom_freeze_list_overrides_stage(tiny_config):
    config = tiny_config(*STEP_CONFIG, "train.stage=full", "train.freeze=[projector]", *mesh_overrides(8, 1, 1))
    setup = make_train_setup(config, make_mesh(config.mesh))
    assert setup.frozen == ("projector",)
    opt_state = setup.abstract_state.opt_state
    assert "projector" not in opt_state.mu and "projector" not in opt_state.nu


def test_non_finite_step_is_skipped_and_counted(tiny_config):
    config = tiny_config(*STEP_CONFIG, *mesh_overrides(8, 1, 1))
    mesh = make_mesh(config.mesh)
    setup = make_train_setup(config, mesh)
    state = setup.init_state(0)
    before = jax.device_get(state.params)
    batch = random_batch(config, 0)
    batch["loss_mask"][0, -1] = np.nan             # (uint8 pixels cannot carry a NaN) -> NaN loss and gradients
    state, metrics = compile_train_step(setup)(state, host_batch_to_global(batch, mesh))
    assert float(metrics["finite"]) == 0.0
    assert int(state.bad_steps) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)


def test_step_normalises_uint8_pixels_like_the_evaluation_path(tiny_config):
    """The step takes raw uint8 pixels: its loss equals the model's loss on pixels normalised on the host by
    ImageProcessor.normalize (evaluation / generation). Slot 1 holds junk with image_mask 0."""
    config = tiny_config(*STEP_CONFIG, "train.stage=pretrain", "data.max_images=2", *mesh_overrides(1, 1, 1))
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    setup = make_train_setup(config, mesh)
    state = setup.init_state(0)
    params = jax.device_get(state.params)
    batch = random_batch(config, 0)
    batch["pixel_values"] = np.concatenate([batch["pixel_values"], batch["pixel_values"][:, :, ::-1]], axis=1)
    batch["image_mask"] = np.array([[1, 0]] * len(batch["image_mask"]), np.int32)
    _, metrics = compile_train_step(setup)(state, host_batch_to_global(batch, mesh))

    pixels = ImageProcessor(config).normalize(batch["pixel_values"], batch["image_mask"])
    model = LlavaModel(config.model)
    hidden = model.apply({"params": params}, batch["input_ids"], pixels, image_mask=batch["image_mask"],
                         segment_ids=batch["segment_ids"], positions=batch["positions"], return_hidden=True)
    head = lambda p, h: model.apply({"params": p}, h, method=LlavaModel.logits)  # noqa: E731
    loss_sum, count = cross_entropy_sums(hidden, head, params, batch["input_ids"], batch["loss_mask"])
    np.testing.assert_allclose(float(metrics["loss"]), float(loss_sum / count), rtol=1e-5)


def test_training_halts_after_max_bad_steps_in_a_row():
    ok = {"finite": 1.0, "image_token_mismatches": 0.0}
    bad = {"finite": 0.0, "image_token_mismatches": 0.0}
    count = _check_step(bad, 1, 0, 3)
    count = _check_step(bad, 2, count, 3)
    assert _check_step(ok, 3, count, 3) == 0
    with pytest.raises(StopTraining, match="max_bad_steps=3"):
        _check_step(bad, 6, _check_step(bad, 5, _check_step(bad, 4, 0, 3), 3), 3)


def test_image_token_mismatch_stops_training():
    with pytest.raises(StopTraining, match="image-token count"):
        _check_step({"finite": 1.0, "image_token_mismatches": 2.0}, 7, 0, 3)


def test_step_compiles_once(tiny_config):
    config = tiny_config(*STEP_CONFIG, *mesh_overrides(2, 2, 2))
    mesh = make_mesh(config.mesh)
    setup = make_train_setup(config, mesh)
    state = setup.init_state(0)
    step = jit_train_step(setup)
    with jax.set_mesh(mesh):
        for i in range(3):
            state, _ = step(state, host_batch_to_global(random_batch(config, i), mesh))
    assert step._cache_size() == 1


@pytest.mark.parametrize("overrides,key", [
    (mesh_overrides(3, 1, 1), "mesh"),
    (mesh_overrides(2, -1, 3), "mesh.fsdp=-1"),
    (["train.batch_size=12", *mesh_overrides(8, 1, 1)], "train.batch_size"),
    (["train.batch_size=16", "train.grad_accum_steps=4", *mesh_overrides(8, 1, 1)], "train.batch_size"),
    (["train.batch_size=16", "train.micro_batch_size=3", *mesh_overrides(8, 1, 1)], "train.batch_size"),
])
def test_invalid_mesh_or_batch_names_the_key(tiny_config, overrides, key):
    from llava_jax.train.step import resolve_batch_layout
    config = tiny_config(*STEP_CONFIG, *overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        resolve_batch_layout(config, make_mesh(config.mesh))


def test_micro_batch_size_sets_accumulation(tiny_config):
    from llava_jax.train.step import resolve_batch_layout
    config = tiny_config(*STEP_CONFIG, "train.batch_size=32", "train.micro_batch_size=2", *mesh_overrides(8, 1, 1))
    resolve_batch_layout(config, make_mesh(config.mesh))
    assert config.train.grad_accum_steps == 2
