"""LlavaModel behaviour: layer stacking, compute dtype, image-token bookkeeping, projector variants, remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.hf import stack_layers, unstack_layers
from llava_jax.models.llava import LlavaModel, init_params

IMAGE_TOKEN = 299


def inputs(config, batch: int = 2, images_per_sample: int = 1, text: int = 6, seed: int = 0):
    """Each sample: `text` tokens, then per image its image tokens and `text` more tokens -> (ids, pixels)."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, IMAGE_TOKEN, (batch, text))]
    for _ in range(images_per_sample):
        parts += [np.full((batch, config.tokens_per_image), IMAGE_TOKEN), rng.integers(0, IMAGE_TOKEN, (batch, text))]
    v = config.vision
    pixels = rng.standard_normal((batch, images_per_sample, v.image_size, v.image_size, 3)).astype(np.float32)
    return np.concatenate(parts, axis=1).astype(np.int32), pixels


def logits(config, params, ids, pixels, **kwargs) -> np.ndarray:
    return np.asarray(LlavaModel(config).apply({"params": params}, ids, pixels, **kwargs))


def count_layers(tree) -> int:
    return len([key for key in tree if key.startswith("layers_")])


def test_scan_and_per_layer_stacks_give_the_same_logits(tiny_config):
    scanned = tiny_config().model
    per_layer = tiny_config("model.scan_layers=false").model
    params = init_params(scanned, jax.random.key(0))
    unstacked = unstack_layers(params)
    assert count_layers(unstacked["language_model"]) == 2 and "layers" not in unstacked["language_model"]
    ids, pixels = inputs(scanned)
    np.testing.assert_allclose(logits(per_layer, unstacked, ids, pixels), logits(scanned, params, ids, pixels),
                               rtol=0, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(unstacked), params)


def test_bfloat16_compute_stays_close_to_float32(tiny_config):
    """bfloat16 rounds to 8 significant bits (2^-9 ~ 0.2% per op); through this 2+2-layer model the logits drift by
    ~1% of their range (transformers' LLaVA in bfloat16 drifts the same ~0.85% on a model like this), so the bound
    is 3% of the float32 logit range. Params stay float32; the returned logits are float32 either way."""
    config = tiny_config().model
    params = init_params(config, jax.random.key(0))
    ids, pixels = inputs(config)
    reference = logits(config, params, ids, pixels)
    low = logits(dataclasses.replace(config, dtype="bfloat16"), params, ids, pixels)
    assert low.dtype == np.float32
    relative_error = np.abs(low - reference).max() / np.abs(reference).max()
    assert 0 < relative_error <= 3e-2


def test_image_token_count_mismatch_raises_naming_the_sample(tiny_config):
    config = tiny_config().model
    params = init_params(config, jax.random.key(0))
    ids, pixels = inputs(config)
    ids[1, 8] = 5                                                  # sample 1 loses one image token
    with pytest.raises(ValueError, match="sample 1 has 15 image tokens"):
        logits(config, params, ids, pixels)


def test_image_mask_lets_a_sample_hold_fewer_real_images(tiny_config):
    config = tiny_config().model
    params = init_params(config, jax.random.key(0))
    two_images, pixels = inputs(config, batch=1, images_per_sample=2)
    one_image, _ = inputs(config, batch=1, images_per_sample=1)
    length = two_images.shape[1]
    padded = np.pad(one_image, ((0, 0), (0, length - one_image.shape[1])))
    attention_mask = (np.arange(length) < one_image.shape[1]).astype(np.int32)[None]
    batch_ids = np.concatenate([two_images, padded])
    batch_pixels = np.concatenate([pixels, np.stack([pixels[0, 0], np.zeros_like(pixels[0, 1])])[None]])
    mixed = logits(config, params, batch_ids, batch_pixels, image_mask=np.array([[1, 1], [1, 0]]),
                   attention_mask=np.concatenate([np.ones_like(attention_mask), attention_mask]))
    alone = logits(config, params, one_image, pixels[:, :1])
    np.testing.assert_allclose(mixed[1, :one_image.shape[1]], alone[0], rtol=0, atol=1e-5)


def test_pixel_shuffle_projector_quarters_the_image_tokens(tiny_config):
    config = tiny_config("model.projector.pixel_shuffle=true").model
    assert config.tokens_per_image == config.vision_tokens_per_image // 4 == 4
    params = init_params(config, jax.random.key(0))
    assert params["projector"]["linear_1"]["kernel"].shape == (4 * config.vision.hidden_size,
                                                                config.decoder.hidden_size)
    ids, pixels = inputs(config)
    out = logits(config, params, ids, pixels)
    assert out.shape == (*ids.shape, config.decoder.vocab_size) and np.isfinite(out).all()


def test_mlp3x_gelu_projector_builds_three_linears(tiny_config):
    params = init_params(tiny_config("model.projector.type=mlp3x_gelu").model, jax.random.key(0))
    assert sorted(params["projector"]) == ["linear_1", "linear_2", "linear_3"]


@pytest.mark.parametrize("feature_layer, built", [(-2, 2), (-1, 3), (1, 1)])
def test_only_the_vision_layers_up_to_the_feature_layer_are_built(tiny_config, feature_layer, built):
    config = tiny_config(f"model.vision_feature_layer={feature_layer}", "model.scan_layers=false").model
    assert config.vision_layers_used == built
    assert count_layers(init_params(config, jax.random.key(0))["vision_tower"]) == built


def loss_logits_and_grads(config, params, ids, pixels):
    def loss(p):
        out = LlavaModel(config).apply({"params": p}, ids, pixels)
        return jnp.mean(jax.nn.log_softmax(out) ** 2), out
    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, out, grads


def assert_gradients_close(actual, reference, relative: float):
    """Every gradient within `relative` x the largest reference gradient (per-leaf scales do not work: some
    gradients, e.g. of the attention key biases, are exactly zero in exact arithmetic)."""
    scale = max(np.abs(np.asarray(leaf)).max() for leaf in jax.tree.leaves(reference))
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=0, atol=relative * scale), actual, reference)


@pytest.mark.parametrize("policy, scan", [("full", True), ("dots_saveable", True), ("full", False)])
def test_remat_gives_the_same_logits_and_gradients(tiny_config, policy, scan):
    config = tiny_config(f"model.scan_layers={str(scan).lower()}").model
    params = init_params(config, jax.random.key(0))
    ids, pixels = inputs(config)
    loss, out, grads = loss_logits_and_grads(config, params, ids, pixels)
    remat_loss, remat_out, remat_grads = loss_logits_and_grads(dataclasses.replace(config, remat=policy), params,
                                                               ids, pixels)
    # The same math, up to float reassociation.
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(remat_out, out, rtol=0, atol=1e-6)
    assert_gradients_close(remat_grads, grads, relative=1e-5)
