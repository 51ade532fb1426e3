"""Building blocks shared by the vision tower and the decoder: dense layers with logical axes, norms, MLP,
attention (GQA, optional RoPE, segment/causal masks, a KV cache; kernels in `attention.py`), and layer stacking
(nn.scan + remat).

Every parameter carries logical axis names (see `llava_jax.sharding.LOGICAL_RULES`); params are float32 and the
compute dtype is passed in. Softmax, norms and RoPE run in float32.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.accumulate import accumulating_scan
from llava_jax.models.attention import attention, cached_attention
from llava_jax.models.cpu_layout import on_cpu, swap_last_two

Dtype = Any
INIT_STD = 0.02

# Activation logical axes at block boundaries.
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


def constrain(x: jax.Array, axes: Sequence[Optional[str]] = ACTIVATION_AXES) -> jax.Array:
    return nn.with_logical_constraint(x, tuple(axes))


@jax.custom_vjp
def _matmul_nn_grads(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., I] @ kernel [I, O], whose kernel gradient is a row-major NN matmul (see `dense_dot_general`)."""
    return jnp.einsum("...i,io->...o", x, kernel)


def _matmul_forward(x, kernel):
    return _matmul_nn_grads(x, kernel), (x, kernel)


def _matmul_backward(residuals, dy):
    x, kernel = residuals
    x_transposed = swap_last_two(x.reshape(-1, x.shape[-1]))
    dkernel = jnp.dot(x_transposed, dy.reshape(-1, dy.shape[-1]), preferred_element_type=jnp.float32)
    dx = jnp.einsum("...o,io->...i", dy, kernel)
    return dx, dkernel.astype(kernel.dtype)


_matmul_nn_grads.defvjp(_matmul_forward, _matmul_backward)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's contraction. On CPU (see `cpu_layout`) the weight gradient x^T @ dy of a plain dot has a
    transposed operand and falls back to a ~30 % slower kernel, so there the gradient transposes x explicitly
    first. Other backends take lax.dot_general as is."""
    dense_contraction = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (not on_cpu() or dimension_numbers != dense_contraction or precision is not None
            or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _matmul_nn_grads(lhs, rhs)


LORA = "lora"     # the variable collection of the LoRA adapters (models/llava.py folds it into params["lora"])


class LoraDense(nn.Dense):
    """nn.Dense (the same params: kernel [in, out], bias [out]) plus a low-rank update in the "lora" collection:
    y = x W + b + (alpha / rank) (dropout(x) A) B, A [in, rank] (PEFT's lora_A, Kaiming-uniform) sharded like the
    kernel's input, B [rank, out] (lora_B, zeros: the adapter starts as the identity) like its output, its rank dim
    over fsdp where the output dim is not ("lora_rank"). Dropout runs only when the caller supplies a "dropout" rng
    (the train step)."""
    rank: int = 1
    alpha: float = 1.0
    dropout: float = 0.0
    axes: tuple[Optional[str], Optional[str]] = (None, None)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        a = self.variable(LORA, "a", lambda: nn.LogicallyPartitioned(
            nn.initializers.he_uniform()(self.make_rng("params"), (x.shape[-1], self.rank), jnp.float32) / 3 ** 0.5,
            (self.axes[0], None))).value
        b = self.variable(LORA, "b", lambda: nn.LogicallyPartitioned(
            jnp.zeros((self.rank, self.features), jnp.float32), ("lora_rank", self.axes[1]))).value
        x = x.astype(self.dtype)
        if self.dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(self.dtype)
        update = jnp.dot(jnp.dot(x, nn.meta.unbox(a).astype(self.dtype)), nn.meta.unbox(b).astype(self.dtype))
        return y + update * jnp.asarray(self.alpha / self.rank, self.dtype)


def dense(features: int, axes: tuple[Optional[str], Optional[str]], *, use_bias: bool, dtype: Dtype,
          name: str, lora: Any = None) -> nn.Dense:
    """A Dense layer whose kernel [in, out] carries logical `axes` (and the bias the output axis); a `LoraDense`
    where `lora` (config.LoraConfig) is enabled and names this kernel among its targets."""
    kwargs = dict(use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name, dot_general=dense_dot_general,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))
    if lora is not None and lora.enabled and name in lora.targets:
        return LoraDense(features, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, axes=axes, **kwargs)
    return nn.Dense(features, **kwargs)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class Embed(nn.Module):
    """Token embedding [vocab, embed]; `attend` is the tied head. A lookup runs on each device's own (embed) shard of
    the table for the whole batch (the token ids, a few KB, are what is all-gathered), so no full float32 table is
    gathered and the gradient scatters into the local shard only; the caller reshards the output to the batch."""
    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids: jax.Array) -> jax.Array:
        ids = nn.with_logical_constraint(ids, (None, None))
        out = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(out, (None, None, "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("bte,ve->btv", x, self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back to the input dtype, then multiply by the weight."""
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return (scale * normed).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics and float32 affine, output in the compute dtype."""
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (features,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


# Logical axes of the row-parallel kernels ([mlp or heads, embed]: down_proj / fc2, o_proj) by
# model.fsdp_row_kernels: fsdp shards their embed dim like every other kernel's, or their input dim (see
# llava_jax.sharding.LOGICAL_RULES).
ROW_KERNEL_AXES = {"embed": {"mlp": ("mlp", "embed"), "heads": ("q_heads", "embed")},
                   "input": {"mlp": ("mlp_in", "embed_out"), "heads": ("heads_in", "embed_out")}}


class Mlp(nn.Module):
    """Gated (SwiGLU: down(act(gate(x)) * up(x))) or plain (fc2(act(fc1(x)))) MLP."""
    hidden_size: int
    mlp_dim: int
    act: str
    gated: bool
    use_bias: bool
    dtype: Dtype = jnp.float32
    row_sharding: str = "embed"      # model.fsdp_row_kernels
    lora: Any = None                 # config.LoraConfig of this tower (None: no adapters)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, lora=self.lora)
        if self.gated:
            h = act(dense(self.mlp_dim, ("embed", "mlp"), name="gate_proj", **kw)(x))
            h = h * dense(self.mlp_dim, ("embed", "mlp"), name="up_proj", **kw)(x)
            h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
            return dense(self.hidden_size, ROW_KERNEL_AXES[self.row_sharding]["mlp"], name="down_proj", **kw)(h)
        h = act(dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x))
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(self.hidden_size, ROW_KERNEL_AXES[self.row_sharding]["mlp"], name="fc2", **kw)(h)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half layout: x [B, T, H, D], positions [B, T]; inv_freq = theta^(-2i/D)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]       # [B, T, 1, D]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class CachedKeys(NamedTuple):
    """What a KV-cache step attends to (built by the decoder's CacheSlots): the segment id and position of each
    cache slot, [B, slots] each, and the slot this step's keys/values are written at."""
    segment_ids: jax.Array
    positions: jax.Array
    write_index: jax.Array


def write_kv_cache(module: nn.Module, k: jax.Array, v: jax.Array, index: jax.Array, length: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Static KV cache in `module`'s "cache" collection, heads first in the layouts attention's matmuls read (so a
    decode step never transposes the whole cache): writes k/v [B, T, K, D] at slots [index, index + T) of
    `cached_key_t` [B, K, D, length] (keys transposed) / `cached_value` [B, K, length, D] (zeros when first
    created) and returns both whole caches."""
    batch, _, kv_heads, head_dim = k.shape
    cached_key_t = module.variable("cache", "cached_key_t", jnp.zeros, (batch, kv_heads, head_dim, length), k.dtype)
    cached_value = module.variable("cache", "cached_value", jnp.zeros, (batch, kv_heads, length, head_dim), v.dtype)
    cached_key_t.value = jax.lax.dynamic_update_slice_in_dim(cached_key_t.value, k.transpose(0, 2, 3, 1), index,
                                                             axis=3)
    cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, v.transpose(0, 2, 1, 3), index,
                                                             axis=2)
    return cached_key_t.value, cached_value.value


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional RoPE. Projections are Dense(H*D) + reshape; the core
    is the `kernel` of llava_jax.models.attention (segment ids: 0 = padding, None = one unpadded segment)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    qkv_bias: bool
    out_bias: bool
    causal: bool
    kernel: str = "xla"
    rope_theta: Optional[float] = None
    dtype: Dtype = jnp.float32
    row_sharding: str = "embed"      # model.fsdp_row_kernels (o_proj)
    lora: Any = None                 # config.LoraConfig of this tower (None: no adapters)

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
                 cache: Optional[CachedKeys] = None) -> jax.Array:
        """x [B, T, E], segment_ids / positions [B, T]. With `cache` (KV-cache mode, see `write_kv_cache`) the keys
        and values of x are written into the cache and queries attend to every cache slot, causally by position;
        that path always runs the xla kernel (queries and slots are not aligned, which only it can express)."""
        batch, length, _ = x.shape
        kw = dict(use_bias=self.qkv_bias, dtype=self.dtype, lora=self.lora)
        q = dense(self.num_heads * self.head_dim, ("embed", "q_heads"), name="q_proj", **kw)(x)
        k = dense(self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), name="k_proj", **kw)(x)
        v = dense(self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), name="v_proj", **kw)(x)
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        heads_axes = ("activation_batch", "activation_length", "activation_heads", None)
        q = nn.with_logical_constraint(q, heads_axes)
        if cache is None:
            out = attention(q, k, v, query_segment_ids=segment_ids, key_segment_ids=segment_ids, causal=self.causal,
                            kernel=self.kernel)
        else:
            k_t, v = write_kv_cache(self, k, v, cache.write_index, cache.segment_ids.shape[1])
            out = cached_attention(q, k_t, v, query_segment_ids=segment_ids, key_segment_ids=cache.segment_ids,
                                   query_positions=positions, key_positions=cache.positions)
        out = nn.with_logical_constraint(out, heads_axes).reshape(batch, length, self.num_heads * self.head_dim)
        return dense(self.hidden_size, ROW_KERNEL_AXES[self.row_sharding]["heads"], use_bias=self.out_bias,
                     dtype=self.dtype, name="o_proj", lora=self.lora)(out)


REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_layer_stack(block_cls: type[nn.Module], num_layers: int, scan: bool, remat: str, **block_kwargs):
    """Builds `num_layers` blocks, either one nn.scan-ned module (params stacked on a leading "layers" axis)
    or a list of modules (named `<attr>_0`, `<attr>_1`, ... by the parent's setup). Blocks return (x, None).
    A "cache" collection (KV cache) is stacked on the leading axis like the params."""
    if remat != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0, LORA: 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=nn.broadcast, length=num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        return scanned(**block_kwargs)
    return [block_cls(**block_kwargs) for _ in range(num_layers)]


def run_layer_stack(stack, x: jax.Array, *args, accumulator: Any = None,
                    block: Optional[nn.Module] = None) -> jax.Array:
    """Runs a stack from `make_layer_stack`; `args` are broadcast to every layer. With `accumulator` (a scanned
    stack's params tree of gradients so far) the stack runs as `accumulate.accumulating_scan` of `block` (an
    unbound, un-rematted instance of the stack's block): full remat, and the stack's weight gradient comes back
    already added into `accumulator`."""
    if accumulator is not None:
        if isinstance(stack, (list, tuple)):
            raise ValueError("in-place gradient accumulation needs a scanned layer stack (model.scan_layers=true)")

        def layer_fn(layer_params, h, *consts):
            return block.apply({"params": layer_params}, h, *consts)[0]
        return accumulating_scan(layer_fn, stack.variables["params"], accumulator, x, *args)
    if isinstance(stack, (list, tuple)):
        for block in stack:
            x, _ = block(x, *args)
        return x
    x, _ = stack(x, *args)
    return x
