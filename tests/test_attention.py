"""Attention kernels (`model.attention`): each applies the segment + causal mask rule, and configs a kernel cannot
run are refused naming the key.

On CPU the xla kernel runs natively and splash runs in the Pallas interpreter (not the compiled TPU kernel). cuDNN
cannot run here: the exact arguments the cudnn kernel passes are fed to `jax.nn.dot_product_attention`'s xla
implementation instead, which checks how the mask is expressed but not the cuDNN kernel itself.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.config import load_config
from llava_jax.models import attention as attention_module
from llava_jax.models.attention import (attention, causal_block_count, check_trailing_padding, cudnn_arguments,
                                        make_attention_mask, xla_attention)
from llava_jax.models.llava import LlavaModel, init_params
from llava_jax.sharding import LOGICAL_RULES
from tests.helpers import TINY_MODEL

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 4, 100, 4, 2, 64   # LENGTH is not a multiple of the splash block
IMAGE_TOKEN = 299
# Head dims of 64 (what splash accepts), grouped-query decoder, sequence one splash block long.
WIDE_HEADS = ["model.vision.hidden_size=128", "model.vision.num_heads=2", "model.decoder.hidden_size=256",
              "model.decoder.num_heads=4", "model.decoder.num_kv_heads=2", "data.max_length=128"]


def packed_segments() -> np.ndarray:
    """Rows: two packed samples then padding; one full sample; one sample then padding; padding first."""
    segments = np.ones((BATCH, LENGTH), np.int32)
    segments[0, 40:70], segments[0, 70:] = 2, 0
    segments[2, 55:] = 0
    segments[3, :10] = 0
    return segments


def right_padded_segments() -> np.ndarray:
    """What the data pipeline builds without packing: each row one sample followed by padding."""
    lengths = np.array([LENGTH, 73, 20, 1])
    return (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)


def random_qkv(seed: int = 0, kv_heads: int = KV_HEADS):
    rng = np.random.default_rng(seed)
    shapes = [(BATCH, LENGTH, HEADS, HEAD_DIM)] + [(BATCH, LENGTH, kv_heads, HEAD_DIM)] * 2
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


def reference_attention(q, k, v, segments, causal: bool, xp=np):
    """Plain softmax attention; query head h uses kv head h // (HEADS / KV_HEADS). `xp=np` computes it in float64,
    `xp=jnp` in float32 for JAX to differentiate."""
    if xp is np:
        q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = xp.repeat(k, group, axis=2), xp.repeat(v, group, axis=2)
    scores = xp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    allowed = xp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    if causal:
        allowed &= xp.tril(xp.ones(allowed.shape[1:], bool))
    scores = xp.where(allowed[:, None], scores, -xp.inf)
    probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return xp.einsum("bhts,bshd->bthd", probs / probs.sum(axis=-1, keepdims=True), v)


def run_kernel(kernel: str, q, k, v, segments, causal: bool) -> np.ndarray:
    segments = None if segments is None else jnp.asarray(segments)
    return np.asarray(jax.jit(lambda q, k, v: attention(
        q, k, v, query_segment_ids=segments, key_segment_ids=segments, causal=causal, kernel=kernel))(q, k, v))


# Decoder (packed / padded rows, causal) and vision tower (no segments, full attention).
MASK_CASES = [pytest.param(True, True, id="segments-causal"), pytest.param(False, False, id="full")]


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS], ids=["grouped", "multi-head"])
@pytest.mark.parametrize("with_segments, causal", MASK_CASES + [pytest.param(True, False, id="segments-only")])
def test_xla_kernel_matches_a_numpy_reference_with_segment_and_causal_masks(with_segments, causal, kv_heads):
    q, k, v = random_qkv(kv_heads=kv_heads)
    segments = packed_segments() if with_segments else None
    np.testing.assert_allclose(run_kernel("xla", q, k, v, segments, causal),
                               reference_attention(q, k, v, segments, causal), atol=2e-5)


def attention_gradients(run, q, k, v):
    """d/d(q, k, v) of a fixed random projection of the attention output."""
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS], ids=["grouped", "multi-head"])
@pytest.mark.parametrize("with_segments, causal", MASK_CASES)
def test_xla_kernel_gradients_match_autodiff_of_the_reference(with_segments, causal, kv_heads):
    """The xla kernel's hand-written backward against JAX's own gradient of the plain formula."""
    q, k, v = random_qkv(kv_heads=kv_heads)
    segments = jnp.asarray(packed_segments()) if with_segments else None
    ours = attention_gradients(lambda q, k, v: attention(q, k, v, query_segment_ids=segments,
                                                         key_segment_ids=segments, causal=causal, kernel="xla"),
                               q, k, v)
    reference = attention_gradients(lambda q, k, v: reference_attention(q, k, v, segments, causal, jnp), q, k, v)
    for name, got, expected in zip("qkv", ours, reference):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_causal_query_blocks_give_the_one_block_result_and_gradients(blocks):
    """Blocks skip only keys the causal mask hides (uneven blocks: 100 positions in 3)."""
    q, k, v = random_qkv()
    segments = jnp.asarray(packed_segments())
    mask = make_attention_mask(segments, segments, True, lengths=(LENGTH, LENGTH))
    one, cut = (lambda q, k, v, n=n: xla_attention(q, k, v, mask, causal_blocks=n) for n in (1, blocks))
    np.testing.assert_allclose(np.asarray(jax.jit(cut)(q, k, v)), np.asarray(jax.jit(one)(q, k, v)), atol=1e-6)
    for got, expected in zip(attention_gradients(cut, q, k, v), attention_gradients(one, q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=5e-6)


def test_causal_block_count_keeps_blocks_of_at_least_128_rows():
    assert [causal_block_count(n) for n in (1, 100, 255, 256, 384, 2048, 8192)] == [1, 1, 1, 2, 3, 4, 4]


@pytest.mark.parametrize("with_segments, causal", MASK_CASES)
def test_cudnn_arguments_give_the_xla_kernel_result_on_right_padded_rows(with_segments, causal):
    """Padded query rows are don't-care (cuDNN zeroes them, xla lets padding attend to padding): real rows only."""
    q, k, v = random_qkv()
    segments = right_padded_segments() if with_segments else None
    ids = None if segments is None else jnp.asarray(segments)
    arguments = cudnn_arguments(ids, ids, causal)
    via_cudnn_arguments = np.asarray(jax.nn.dot_product_attention(q, k, v, **arguments, implementation="xla"))
    real = np.ones((BATCH, LENGTH), bool) if segments is None else segments != 0
    np.testing.assert_allclose(via_cudnn_arguments[real], run_kernel("xla", q, k, v, segments, causal)[real],
                               atol=2e-5)


@pytest.mark.parametrize("row", [[0, 1, 1, 1], [1, 1, 2, 0], [1, 0, 1, 0]], ids=["left-padded", "packed", "holes"])
def test_cudnn_padding_check_rejects_rows_that_lengths_cannot_express(row):
    check_trailing_padding(right_padded_segments())
    with pytest.raises(ValueError, match="row 1 is"):
        check_trailing_padding(np.array([[1, 1, 1, 0], row]))


@pytest.mark.parametrize("with_segments, causal", MASK_CASES)
def test_splash_kernel_in_the_pallas_interpreter_matches_xla(with_segments, causal):
    """Grouped-query heads, packed + padded rows (causal) and a length padded up to the splash block: every row
    agrees, padding rows included (they see the same padding keys)."""
    q, k, v = random_qkv()
    segments = packed_segments() if with_segments else None
    np.testing.assert_allclose(run_kernel("splash", q, k, v, segments, causal),
                               run_kernel("xla", q, k, v, segments, causal), atol=2e-5)


def test_splash_gradients_match_xla():
    q, k, v = random_qkv()
    segments = jnp.asarray(packed_segments())

    def gradients(kernel):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(attention(q, k, v, query_segment_ids=segments, key_segment_ids=segments,
                                             causal=True, kernel=kernel)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for splash, xla in zip(gradients("splash"), gradients("xla")):
        np.testing.assert_allclose(np.asarray(splash), np.asarray(xla), atol=5e-5)


def test_splash_runs_per_device_on_batch_and_head_shards_of_the_mesh(monkeypatch):
    local_shapes = []
    kernel = attention_module._splash_batch
    monkeypatch.setattr(attention_module, "_splash_batch",
                        lambda q, *args, **kwargs: local_shapes.append(q.shape) or kernel(q, *args, **kwargs))
    q, k, v = random_qkv()
    segments = packed_segments()
    unsharded = run_kernel("splash", q, k, v, segments, causal=True)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        sharded = run_kernel("splash", q, k, v, segments, causal=True)
    assert local_shapes == [(BATCH, HEADS, 128, HEAD_DIM), (BATCH // 4, HEADS // 2, 128, HEAD_DIM)]
    np.testing.assert_allclose(sharded, unsharded, atol=1e-6)


def test_only_the_xla_kernel_takes_positions():
    q, k, v = random_qkv()
    positions = jnp.zeros((BATCH, LENGTH), jnp.int32)
    with pytest.raises(ValueError, match="KV-cache path runs the xla kernel"):
        attention(q, k, v, query_segment_ids=None, key_segment_ids=None, causal=True, query_positions=positions,
                  key_positions=positions, kernel="splash")


def model_inputs(config, lengths):
    """Right-padded rows: text, one image's tokens, text; `lengths` real tokens each -> (ids, pixels, segments)."""
    rng = np.random.default_rng(0)
    length = config.data.max_length
    ids = rng.integers(0, 256, (len(lengths), length)).astype(np.int32)
    ids[:, 3:3 + config.model.tokens_per_image] = IMAGE_TOKEN
    segments = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int32)
    pixels = rng.standard_normal((len(lengths), 1, 28, 28, 3)).astype(np.float32)
    return ids, pixels, segments


def model_logits(model_config, params, ids, pixels, segments) -> np.ndarray:
    return np.asarray(LlavaModel(model_config).apply({"params": params}, ids, pixels, segment_ids=segments))


def test_llava_logits_with_splash_equal_xla(tiny_config):
    config = tiny_config(*WIDE_HEADS, "model.attention=splash")
    params = init_params(config.model, jax.random.key(0))
    ids, pixels, segments = model_inputs(config, [128, 90])
    np.testing.assert_allclose(model_logits(config.model, params, ids, pixels, segments),
                               model_logits(dataclasses.replace(config.model, attention="xla"), params, ids, pixels,
                                            segments), atol=1e-4)


def test_llava_with_cudnn_arguments_equals_xla_on_right_padded_rows(tiny_config, monkeypatch):
    """The model's cudnn path, with cuDNN swapped for the xla implementation of the same call (float32 here;
    config validation alone would require bfloat16)."""
    calls = []
    dot_product_attention = jax.nn.dot_product_attention

    def on_cpu(*args, implementation, **kwargs):
        calls.append((implementation, kwargs["is_causal"]))
        return dot_product_attention(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    config = tiny_config(*WIDE_HEADS)
    params = init_params(config.model, jax.random.key(0))
    ids, pixels, segments = model_inputs(config, [128, 90])
    cudnn = model_logits(dataclasses.replace(config.model, attention="cudnn"), params, ids, pixels, segments)
    assert set(calls) == {("cudnn", False), ("cudnn", True)}   # vision tower (full) and decoder (causal)
    real = segments != 0
    np.testing.assert_allclose(cudnn[real], model_logits(config.model, params, ids, pixels, segments)[real], atol=1e-4)


def test_llava_with_cudnn_refuses_left_padded_rows(tiny_config):
    config = tiny_config(*WIDE_HEADS)
    params = init_params(config.model, jax.random.key(0))
    ids, pixels, segments = model_inputs(config, [128, 90])
    with pytest.raises(ValueError, match="model.attention=cudnn needs each row to be one segment"):
        model_logits(dataclasses.replace(config.model, attention="cudnn"), params, ids, pixels, segments[:, ::-1])


@pytest.mark.parametrize("overrides, key, message", [
    (["model.attention=cudnn", "model.dtype=bfloat16", "data.pack=true"], "model.attention", "data.pack=true"),
    (["model.attention=cudnn"], "model.attention", "model.dtype=bfloat16"),
    (["model.attention=cudnn", "model.dtype=bfloat16", "model.decoder.head_dim=12"], "model.attention",
     "model.decoder.head_dim = 12"),
    (["model.attention=splash", "data.max_length=100"], "data.max_length", "multiple of 128"),
    (["model.attention=splash", "model.vision.num_heads=4"], "model.attention",
     "model.vision.hidden_size / num_heads = 32"),
], ids=["cudnn-pack", "cudnn-float32", "cudnn-head-dim", "splash-length", "splash-vision-head-dim"])
def test_config_refuses_what_the_kernel_cannot_run(overrides, key, message):
    with pytest.raises(ValueError, match=key) as error:
        load_config(None, TINY_MODEL + WIDE_HEADS + overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
def test_config_accepts_each_kernel_within_its_limits(kernel):
    config = load_config(None, TINY_MODEL + WIDE_HEADS + [f"model.attention={kernel}", "model.dtype=bfloat16"])
    assert config.model.attention == kernel
