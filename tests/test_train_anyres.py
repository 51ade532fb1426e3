"""The train step on LLaVA-NeXT anyres batches: the loss is the model's on the same crops and feature ids, any mesh
and accumulation give the same step, the image-token check reads the ids, FLOPs and the floor count the crops."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from llava_jax.data.anyres_inputs import AnyresSample, anyres_batch, crop_pixels, expand_image_tokens
from llava_jax.data.bad_samples import REASONS
from llava_jax.data.images import image_stats
from llava_jax.models.llava import LlavaModel
from llava_jax.plan_floor import activation_bytes
from llava_jax.sharding import host_batch_to_global, make_mesh
from llava_jax.train.flops import train_step_flops
from llava_jax.train.state import make_train_setup
from llava_jax.train.step import abstract_batch, batch_keys, compile_train_step

PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
ANYRES = ["model.anyres.enabled=true", f"model.anyres.grid_pinpoints={PINPOINTS}", "data.max_length=224",
          "data.max_images=2", "train.batch_size=8", "train.learning_rate=1e-3", "train.stage=full",
          "train.warmup_steps=1"]
SIZES = [(40, 60), (70, 30), (28, 28), (10, 90), (90, 10), (56, 56), (33, 47), (60, 20)]


def photo(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rows(config, seed: int) -> list:
    """Eight rows: most one sample with one image, row 1 two packed samples, row 5 text only."""
    rng, m = np.random.default_rng(seed), config.model
    image = m.image_token_id

    def one(k, with_image=True):
        ids = np.concatenate([rng.integers(0, image, 3), [image] if with_image else [], rng.integers(0, image, 9)])
        sizes = [SIZES[(seed + k) % len(SIZES)]] if with_image else []
        return AnyresSample(expand_image_tokens(ids.astype(np.int32), sizes, m),
                            [photo(h, w, seed * 10 + k) for h, w in sizes])
    return [[one(k), one(k + 10)] if k == 1 else one(k, with_image=k != 5) for k in range(8)]


def train_batch(config, seed: int) -> tuple[dict, dict]:
    """(the train step's host batch: uint8 crops, a loss mask on the text after the image, (the same rows as
    anyres_batch gives the model: normalised float32 crops)."""
    m, length, images = config.model, config.data.max_length, config.data.max_images
    row_list = rows(config, seed)
    mean, std = image_stats(config)
    model_batch = anyres_batch(row_list, m, length, images, mean, std)
    pixels = []
    for row in row_list:
        samples = [row] if isinstance(row, AnyresSample) else row
        pixels.append(crop_pixels([im for s in samples for im in s.images], m, images)[0])
    rng = np.random.default_rng(seed + 1)
    text = (model_batch["segment_ids"] > 0) & (model_batch["image_feature_ids"] == -1)
    loss_mask = (text & (rng.random(text.shape) < 0.7)).astype(np.float32)
    batch = {k: model_batch[k] for k in ("input_ids", "segment_ids", "positions", "image_mask", "image_feature_ids")}
    batch.update(pixel_values=np.stack(pixels), loss_mask=loss_mask,
                 num_samples=np.array([2 if k == 1 else 1 for k in range(len(row_list))], np.int32),
                 bad_samples=np.zeros((len(row_list), len(REASONS)), np.int32))
    return batch, model_batch


def run(config, steps: int, devices=None):
    mesh = make_mesh(config.mesh, devices)
    setup = make_train_setup(config, mesh)
    state = setup.init_state(config.train.seed)
    initial = jax.device_get(state.params)
    step = compile_train_step(setup)
    metrics = []
    for i in range(steps):
        state, m = step(state, host_batch_to_global(train_batch(config, i)[0], mesh))
        metrics.append(jax.device_get(m))
    return initial, jax.device_get(state.params), metrics


@pytest.fixture(scope="module")
def single_device():
    from llava_jax.config import load_config
    from tests.helpers import TINY_MODEL
    config = load_config(None, TINY_MODEL + ANYRES + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    return run(config, 2, jax.devices()[:1])


def test_the_step_feeds_the_model_its_crops_and_feature_ids(tiny_config):
    config = tiny_config(*ANYRES, "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1")
    assert set(batch_keys(config)) == set(train_batch(config, 0)[0])
    initial, _, metrics = run(config, 1)
    _, model_batch = train_batch(config, 0)
    logits = LlavaModel(config.model).apply(
        {"params": initial}, model_batch["input_ids"], model_batch["pixel_values"],
        segment_ids=model_batch["segment_ids"], positions=model_batch["positions"],
        image_feature_ids=model_batch["image_feature_ids"])
    batch, _ = train_batch(config, 0)
    weights = batch["loss_mask"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
    expected = float(jnp.sum(ce * weights) / weights.sum())
    np.testing.assert_allclose(metrics[0]["loss"], expected, rtol=2e-5)
    assert metrics[0]["image_token_mismatches"] == 0 and metrics[0]["samples"] == 9


@pytest.mark.parametrize("mesh, accumulation", [((2, 2, 2), 1), ((1, 4, 2), 2), ((1, 2, 4), 4)])
def test_any_mesh_and_accumulation_give_the_single_device_step(tiny_config, single_device, mesh, accumulation):
    _, ref_params, ref_metrics = single_device
    config = tiny_config(*ANYRES, *(f"mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor"), mesh)),
                         f"train.grad_accum_steps={accumulation}", "model.remat=full")
    _, params, metrics = run(config, 2)
    np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in ref_metrics], rtol=1e-5)
    assert ref_metrics[0]["loss"] != ref_metrics[1]["loss"]
    for ref, got in zip(jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(got, ref, atol=2e-5)
    np.testing.assert_allclose(params["image_newline"], ref_params["image_newline"], atol=2e-5)


def test_image_token_mismatches_read_the_feature_ids(tiny_config):
    config = tiny_config(*ANYRES, "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1")
    mesh = make_mesh(config.mesh)
    setup = make_train_setup(config, mesh)
    batch, _ = train_batch(config, 0)
    batch["image_feature_ids"][3, batch["image_feature_ids"][3] >= 0] = -1      # row 3's image tokens: no feature
    _, metrics = compile_train_step(setup)(setup.init_state(0), host_batch_to_global(batch, mesh))
    assert int(metrics["image_token_mismatches"]) == 1


def test_batch_shapes_flops_and_floor_count_every_crop(tiny_config):
    anyres = tiny_config(*ANYRES)
    plain = tiny_config(*ANYRES[2:])
    crops = anyres.model.crops_per_image
    assert crops == 5
    spec = abstract_batch(anyres, make_mesh(anyres.mesh))
    assert spec["pixel_values"].shape == (8, 2, crops, 28, 28, 3) and spec["image_feature_ids"].shape == (8, 224)
    assert "image_feature_ids" not in abstract_batch(plain, make_mesh(plain.mesh))
    frozen_all_but_vision = ("projector", "language_model")
    assert train_step_flops(anyres, frozen_all_but_vision) == pytest.approx(
        crops * train_step_flops(plain, frozen_all_but_vision) - (crops - 1) * train_step_flops(
            plain, frozen_all_but_vision, real_images=0))
    assert activation_bytes(anyres, 8, True)["vision_activations"] == crops * activation_bytes(
        plain, 8, True)["vision_activations"]


@pytest.mark.slow
def test_train_py_learns_on_packed_anyres_rows(tmp_path):
    """`python train.py` on synthetic images with model.anyres on and data.pack: rows of several anyres samples."""
    import json
    import os
    from tests.helpers import TINY_MODEL
    from tests.run_helpers import TrainProcess
    workdir = str(tmp_path / "run")
    TrainProcess("configs/demo.yaml", workdir, *TINY_MODEL, "model.projector.pixel_shuffle=false",
                 "data.source=synthetic", "data.synthetic_size=200", "data.num_threads=1", "train.batch_size=8",
                 "train.learning_rate=3e-3", "train.warmup_steps=2", "train.stage=full", "train.log_every=1",
                 "checkpoint.every_steps=1000", "train.steps=30", "mesh.fsdp=8", "model.anyres.enabled=true",
                 "model.anyres.grid_pinpoints=[[28,56],[56,28],[56,56]]", "data.max_length=256", "data.max_images=3",
                 "model.decoder.max_position_embeddings=256",
                 "data.pack=true").wait()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert np.mean([r["loss"] for r in records[-5:]]) < 0.7 * np.mean([r["loss"] for r in records[:5]])
    assert np.mean([r["samples"] for r in records]) > 8          # packed: more samples than rows
