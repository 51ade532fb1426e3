"""Attention kernels behind one call, chosen by `model.attention`. Public surface: `attention(q, k, v, *,
query_segment_ids, key_segment_ids, causal, query_positions=None, key_positions=None, kernel)`, the pieces it builds
on (`make_attention_mask`, `xla_attention`, `cudnn_arguments`, `splash_attention`) and `check_trailing_padding`.

Every kernel applies the same rule: a query sees the keys of its own segment (segment id 0 = padding, and padding
sees only padding, so no row is ever fully masked) and, if causal, no later key. Segment ids of None mean one
segment without padding (the vision tower). How each kernel receives the rule:
  xla     dense [B, T, S] boolean mask over an einsum; the only kernel taking positions (the KV cache). Any device.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on GPU: `is_causal` plus
          per-row query / key lengths, so a row must be one segment followed by its padding (1..1 0..0). Packed
          rows cannot be expressed this way: config validation refuses `data.pack=true` with this kernel.
  splash  TPU Pallas splash attention: a causal (or full) block mask plus `SegmentIds`, vmapped over the batch and
          shard_map-ped over the mesh's batch and head axes; lengths are padded up to a multiple of SPLASH_BLOCK.
          On CPU it runs in the Pallas interpreter (tests); on GPU it fails to lower.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from llava_jax.config import SPLASH_BLOCK

KERNELS = ("xla", "cudnn", "splash")
SPLASH_BLOCK_SIZES = (512, 256, SPLASH_BLOCK)   # the largest that divides the padded length is used


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, query_segment_ids: Optional[jax.Array],
              key_segment_ids: Optional[jax.Array], causal: bool, query_positions: Optional[jax.Array] = None,
              key_positions: Optional[jax.Array] = None, kernel: str) -> jax.Array:
    """q [B, T, H, D], k/v [B, S, K, D] (K divides H), segment ids [B, T] / [B, S] -> [B, T, H, D].

    Positions [B, T] / [B, S] make causality compare positions instead of sequence indices (KV-cache decoding,
    where queries and cache slots are not aligned); only the xla kernel takes them.
    """
    if kernel == "xla":
        mask = make_attention_mask(query_segment_ids, key_segment_ids, causal, query_positions, key_positions,
                                   lengths=(q.shape[1], k.shape[1]))
        return xla_attention(q, k, v, mask)
    if kernel not in KERNELS:
        raise ValueError(f"model.attention: unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if query_positions is not None or key_positions is not None:
        raise ValueError(f"the {kernel} attention kernel takes no positions; the KV-cache path runs the xla kernel")
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, **cudnn_arguments(query_segment_ids, key_segment_ids, causal),
                                            implementation="cudnn")
    return splash_attention(q, k, v, query_segment_ids, key_segment_ids, causal)


def make_attention_mask(query_segment_ids: Optional[jax.Array], key_segment_ids: Optional[jax.Array], causal: bool,
                        query_positions: Optional[jax.Array] = None, key_positions: Optional[jax.Array] = None, *,
                        lengths: tuple[int, int]) -> Optional[jax.Array]:
    """Boolean mask [B or 1, T, S] (True = attend), or None when every query sees every key (no segments, not
    causal). `lengths` = (T, S). Causality compares positions when given, else sequence indices."""
    mask = None
    if query_segment_ids is not None:
        mask = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
    if causal:
        if query_positions is None:
            query_positions, key_positions = jnp.arange(lengths[0])[None], jnp.arange(lengths[1])[None]
        before = query_positions[:, :, None] >= key_positions[:, None, :]
        mask = before if mask is None else mask & before
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """Grouped-query attention as two einsums: q [B, T, H, D], k/v [B, S, K, D], mask [B or 1, T, S] or None.

    Scores and softmax are float32 whatever the compute dtype. The softmax is normalised after the value einsum,
    as flash attention does: the division runs over [.., D] instead of [.., S] and the backward reduces over D.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if heads == kv_heads:   # no size-1 group axis: XLA CPU's YNNPACK reductions run ~10x slower with one
        q_axes, weight_axes = "btkd", "bkts"
    else:
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        q_axes, weight_axes = "btkgd", "bkgts"
    scores = jnp.einsum(f"{q_axes},bskd->{weight_axes}", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    if mask is not None:
        mask = mask.reshape(mask.shape[0], *[1] * (scores.ndim - 3), *mask.shape[1:])
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))   # shift only: no gradient
    weights = jnp.exp(scores - row_max)                                            # masked keys: exactly 0
    normaliser = jnp.einsum(f"{weight_axes}->{q_axes[:-1]}", weights)[..., None]
    out = jnp.einsum(f"{weight_axes},bskd->{q_axes}", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / normaliser).astype(v.dtype).reshape(batch, length, heads, head_dim)


def cudnn_arguments(query_segment_ids: Optional[jax.Array], key_segment_ids: Optional[jax.Array], causal: bool
                    ) -> dict:
    """Keyword arguments of `jax.nn.dot_product_attention` that express the mask rule for cuDNN: causality as
    `is_causal`, padding as per-row counts of real tokens. Exact only for rows of one segment followed by
    padding (see `check_trailing_padding`); the default scale 1/sqrt(head_dim) matches `xla_attention`."""
    arguments: dict = {"is_causal": causal}
    if query_segment_ids is not None:
        arguments["query_seq_lengths"] = jnp.sum(query_segment_ids != 0, axis=1, dtype=jnp.int32)
        arguments["key_value_seq_lengths"] = jnp.sum(key_segment_ids != 0, axis=1, dtype=jnp.int32)
    return arguments


def check_trailing_padding(segment_ids) -> None:
    """Raises ValueError unless every row of host `segment_ids` [B, T] is 1..1 0..0 (what the cudnn kernel's
    per-row lengths can express; the data pipeline builds such rows when data.pack=false)."""
    segment_ids = np.asarray(segment_ids)
    real = np.sum(segment_ids != 0, axis=1)
    expected = (np.arange(segment_ids.shape[1])[None] < real[:, None]).astype(segment_ids.dtype)
    bad = np.nonzero(np.any(segment_ids != expected, axis=1))[0]
    if bad.size:
        raise ValueError(f"model.attention=cudnn needs each row to be one segment (id 1) followed by padding (id 0), "
                         f"but row {int(bad[0])} is {segment_ids[bad[0]].tolist()}; right-pad the batch, or use "
                         "model.attention=xla or splash for left-padded or packed rows")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, query_segment_ids: Optional[jax.Array],
                     key_segment_ids: Optional[jax.Array], causal: bool) -> jax.Array:
    """Self-attention (T == S) with TPU splash attention; shapes as in `attention`.

    q is scaled by head_dim^-0.5 here (the kernel does not scale). The sequence is padded to a multiple of
    SPLASH_BLOCK with segment id 0, which real queries never see; the padded rows are cut off again.
    """
    length, head_dim = q.shape[1], q.shape[3]
    if k.shape[1] != length:
        raise ValueError(f"splash attention is self-attention only: {length} queries but {k.shape[1]} keys")
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    query_segments = _pad_length(_segments_or_ones(query_segment_ids, q), padded)
    key_segments = _pad_length(_segments_or_ones(key_segment_ids, k), padded)
    q, k, v = (_pad_length(x, padded).transpose(0, 2, 1, 3) for x in (q * head_dim ** -0.5, k, v))  # [B, H, T, D]
    run = functools.partial(_splash_batch, causal=causal, interpret=jax.default_backend() == "cpu")
    out = _shard_batch_and_heads(run, q, k, v, query_segments, key_segments)
    return out.transpose(0, 2, 1, 3)[:, :length]


def _segments_or_ones(segment_ids: Optional[jax.Array], x: jax.Array) -> jax.Array:
    """Segment ids [B, T] as int32; None (one unpadded segment) becomes ones over x's [B, T]."""
    return jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)


def _pad_length(x: jax.Array, length: int) -> jax.Array:
    """Zero-pads axis 1 (the sequence) of x up to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _splash_batch(q, k, v, query_segments, key_segments, *, causal: bool, interpret: bool) -> jax.Array:
    """The kernel over a (local) batch: q [B, H, T, D], k/v [B, K, T, D] (GQA native), segments [B, T]."""
    heads, length = q.shape[1], q.shape[2]
    block = next(size for size in SPLASH_BLOCK_SIZES if length % size == 0)
    head_mask = splash_mask.CausalMask((length, length)) if causal else splash_mask.FullMask((length, length))
    kernel = splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask((head_mask,) * heads), head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=splash_kernel.BlockSizes(*(block,) * 8))   # every forward and backward tile

    def per_row(q, k, v, query_segments, key_segments):
        return kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(query_segments, key_segments))

    return jax.vmap(per_row)(q, k, v, query_segments, key_segments)


def _shard_batch_and_heads(run, q, k, v, query_segments, key_segments) -> jax.Array:
    """Calls `run` once per device under the ambient mesh (jax.set_mesh), with the batch split over the mesh axes
    of "activation_batch" and the heads over those of "activation_heads" (the logical rules in scope); a dimension
    those axes do not divide (e.g. kv heads over tensor) is not split. Without a mesh, `run` sees everything."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k, v, query_segments, key_segments)
    batch_axes, head_axes = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
    if q.shape[0] % _mesh_size(mesh, batch_axes):
        batch_axes = None
    if q.shape[1] % _mesh_size(mesh, head_axes) or k.shape[1] % _mesh_size(mesh, head_axes):
        head_axes = None
    heads_spec, segments_spec = P(batch_axes, head_axes, None, None), P(batch_axes, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(heads_spec,) * 3 + (segments_spec,) * 2, out_specs=heads_spec,
                         check_vma=False)(q, k, v, query_segments, key_segments)


def _mesh_size(mesh, axes) -> int:
    """Devices along `axes` (None, one mesh axis name or a tuple of them)."""
    if axes is None:
        return 1
    return math.prod(mesh.shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes))
