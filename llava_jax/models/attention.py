"""Attention kernels behind one call, chosen by `model.attention`. Public surface: `attention(q, k, v, *,
query_segment_ids, key_segment_ids, causal, query_positions=None, key_positions=None, kernel)`, the pieces it builds
on (`make_attention_mask`, `xla_attention`, `causal_block_count`, `cudnn_arguments`, `splash_attention`) and
`check_trailing_padding`.

Every kernel applies the same rule: a query sees the keys of its own segment (segment id 0 = padding, and padding
sees only padding, so no row is ever fully masked) and, if causal, no later key. Segment ids of None mean one
segment without padding (the vision tower). How each kernel receives the rule:
  xla     dense [B, T, S] boolean mask over batched matmuls (causal: query blocks skip the keys after them); the
          only kernel taking positions (the KV cache). Any device.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on GPU: `is_causal` plus
          per-row query / key lengths, so a row must be one segment followed by its padding (1..1 0..0). Packed
          rows cannot be expressed this way: config validation refuses `data.pack=true` with this kernel.
  splash  TPU Pallas splash attention: a causal (or full) block mask plus `SegmentIds`, vmapped over the batch and
          shard_map-ped over the mesh's batch and head axes; lengths are padded up to a multiple of SPLASH_BLOCK.
          On CPU it runs in the Pallas interpreter (tests); on GPU it fails to lower.
  auto    `runtime.choose_kernel` for the backend (splash on TPU, cudnn on GPU, xla elsewhere); the train loop
          resolves it up front (knowing whether rows are packed), other callers here, for unpacked rows.
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
from llava_jax.models.cpu_layout import swap_last_two
from llava_jax.runtime import choose_kernel

KERNELS = ("xla", "cudnn", "splash")
# Causal xla self-attention cuts its queries into up to CAUSAL_BLOCKS blocks of at least CAUSAL_BLOCK_ROWS rows.
CAUSAL_BLOCKS, CAUSAL_BLOCK_ROWS = 4, 128
SPLASH_BLOCK_SIZES = (512, 256, SPLASH_BLOCK)   # the largest that divides the padded length is used


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, query_segment_ids: Optional[jax.Array],
              key_segment_ids: Optional[jax.Array], causal: bool, query_positions: Optional[jax.Array] = None,
              key_positions: Optional[jax.Array] = None, kernel: str) -> jax.Array:
    """q [B, T, H, D], k/v [B, S, K, D] (K divides H), segment ids [B, T] / [B, S] -> [B, T, H, D].

    Positions [B, T] / [B, S] make causality compare positions instead of sequence indices (KV-cache decoding,
    where queries and cache slots are not aligned); only the xla kernel takes them.
    """
    if kernel == "auto":          # not resolved by the caller (the train loop resolves it, knowing the packing)
        positions = query_positions is not None or key_positions is not None
        kernel = "xla" if positions else choose_kernel(jax.default_backend(), q.dtype.name, (q.shape[-1],),
                                                       packed=False)[0]
    if kernel == "xla":
        mask = make_attention_mask(query_segment_ids, key_segment_ids, causal, query_positions, key_positions,
                                   lengths=(q.shape[1], k.shape[1]))
        self_causal = causal and query_positions is None
        return xla_attention(q, k, v, mask, causal_block_count(q.shape[1]) if self_causal else 1)
    if kernel not in KERNELS:
        raise ValueError(f"model.attention: unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if query_positions is not None or key_positions is not None:
        raise ValueError(f"the {kernel} attention kernel takes no positions; the KV-cache path runs the xla kernel")
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, **cudnn_arguments(query_segment_ids, key_segment_ids, causal),
                                            implementation="cudnn")
    return splash_attention(q, k, v, query_segment_ids, key_segment_ids, causal)


def cached_attention(q: jax.Array, k_t: jax.Array, v: jax.Array, *, query_segment_ids: jax.Array,
                     key_segment_ids: jax.Array, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """Causal attention on a KV cache stored heads first (layers.write_kv_cache): q [B, T, H, D], k_t [B, K, D, S],
    v [B, K, S, D], segment ids / positions [B, T] / [B, S] -> [B, T, H, D]. The xla kernel's rule and matmuls
    (`_attention_core`), without transposing the cache."""
    groups = q.shape[2] // k_t.shape[1]
    mask = make_attention_mask(query_segment_ids, key_segment_ids, True, query_positions, key_positions,
                               lengths=(q.shape[1], k_t.shape[3]))
    out = _attention_forward(_heads_first(q, groups), None, k_t, v, None, mask[:, None], groups)[0]
    return _heads_last(out, groups)


def causal_block_count(length: int) -> int:
    """Query blocks for causal xla self-attention over `length` positions (see `xla_attention`)."""
    return min(CAUSAL_BLOCKS, max(1, length // CAUSAL_BLOCK_ROWS))


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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array], causal_blocks: int = 1
                  ) -> jax.Array:
    """Grouped-query attention: q [B, T, H, D], k/v [B, S, K, D], mask [B or 1, T, S] or None -> [B, T, H, D].

    Heads go first (q as [B, K, G*c, D]: each kv head with its group of G query heads), so every matmul is a
    batched row-major one (`_attention_core`). With `causal_blocks` = n > 1 (causal self-attention only) the
    queries are cut into n blocks and block i attends to keys [0, end of block i) only: the keys after it are masked
    anyway, so n = 4 computes (n + 1) / 2n = 62.5 % of the scores, and the blocks are independent work for parallel
    cores.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads, keys = k.shape[2], k.shape[1]
    groups = heads // kv_heads
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))                                   # [B, K, S, D]
    k_t, v_t = swap_last_two(k), swap_last_two(v)                                       # [B, K, D, S]
    bounds = [round(i * length / causal_blocks) for i in range(causal_blocks + 1)]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        key_end = end if causal_blocks > 1 else keys
        block_mask = None if mask is None else mask[:, None, start:end, :key_end]      # [B or 1, 1, c, S']
        out = _attention_core(_heads_first(q[:, start:end], groups), k[:, :, :key_end], k_t[..., :key_end],
                              v[:, :, :key_end], v_t[..., :key_end], block_mask, groups)
        outs.append(_heads_last(out, groups))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _heads_first(q: jax.Array, groups: int) -> jax.Array:
    """[B, c, H, D] -> [B, K, G*c, D] (H = K*G: kv head k's G query heads, one after the other)."""
    batch, rows, heads, head_dim = q.shape
    if groups == 1:   # no size-1 group axis: XLA CPU's YNNPACK ops over such shapes run far slower
        return q.transpose(0, 2, 1, 3)
    kv_heads = heads // groups
    grouped = q.reshape(batch, rows, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    return grouped.reshape(batch, kv_heads, groups * rows, head_dim)


def _heads_last(out: jax.Array, groups: int) -> jax.Array:
    """The inverse of `_heads_first`: [B, K, G*c, D] -> [B, c, H, D]."""
    batch, kv_heads, grouped_rows, head_dim = out.shape
    if groups == 1:
        return out.transpose(0, 2, 1, 3)
    rows = grouped_rows // groups
    out = out.reshape(batch, kv_heads, groups, rows, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, rows, kv_heads * groups, head_dim)


def _matmul(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """[..., m, k] @ [..., k, n] with operands in the compute `dtype` and a float32 result."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _masked_scores(q, k_t, mask, groups: int) -> jax.Array:
    """Float32 scaled scores [B, K, G*c, S]; masked keys get the float32 minimum (their weight is exactly 0)."""
    scores = _matmul(q, k_t, q.dtype) * q.shape[-1] ** -0.5
    if mask is None:
        return scores
    if groups == 1:   # no size-1 group axis (see `_heads_first`)
        return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    grouped = scores.reshape(*scores.shape[:2], groups, -1, scores.shape[-1])
    return jnp.where(mask[:, :, None], grouped, jnp.finfo(jnp.float32).min).reshape(scores.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention_core(q, k, k_t, v, v_t, mask, groups: int):
    """softmax(q k^T / sqrt(D), masked) v: q [B, K, R, D] (R = G*c rows), k/v [B, K, S, D] and their transposes
    k_t/v_t [B, K, D, S], mask [B or 1, 1, c, S] or None. Softmax in float32; the backward is written out from the
    saved probabilities (as flash attention does). Every matmul, forward and backward, takes row-major operands
    (see `cpu_layout`) and no [R, S] matrix is ever transposed: the key and value gradients come out transposed,
    d k^T = q^T d_scores and d v^T = d_out^T probs, and flow back through k_t / v_t (k and v get none)."""
    return _attention_forward(q, k, k_t, v, v_t, mask, groups)[0]


def _attention_forward(q, k, k_t, v, v_t, mask, groups):
    scores = _masked_scores(q, k_t, mask, groups)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))     # masked keys: exactly 0
    probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
    out = _matmul(probs, v, v.dtype)
    return out.astype(v.dtype), (q, k, v_t, probs, out)


def _attention_backward(groups, residuals, d_out):
    q, k, v_t, probs, out = residuals
    d_out = d_out.astype(jnp.float32)
    d_v_t = _matmul(swap_last_two(d_out), probs, v_t.dtype)                  # [B, K, D, S]
    d_probs = _matmul(d_out, v_t, v_t.dtype)
    d_scores = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True)) * q.shape[-1] ** -0.5
    d_q = _matmul(d_scores, k, q.dtype)
    d_k_t = _matmul(swap_last_two(q), d_scores, q.dtype)                      # [B, K, D, S]
    return d_q.astype(q.dtype), None, d_k_t.astype(k.dtype), None, d_v_t.astype(v_t.dtype), None


_attention_core.defvjp(_attention_forward, _attention_backward)


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
