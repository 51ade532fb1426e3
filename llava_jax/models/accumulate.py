"""A layer stack whose backward pass adds each layer's weight gradient into a carried accumulator, in place.

Public surface: `accumulating_scan(layer_fn, params, accumulator, x, *consts) -> x_out`.

With gradient accumulation, the usual scan over layers hands back its weight gradients as one fresh stacked buffer
per micro-batch ([L, ...], the size of every trainable stacked weight), which the accumulation loop then adds to
its carry: two gradient-sized buffers live at once. Here the forward pass keeps only each layer's input (what
`model.remat: full` keeps) and the backward pass runs its own reverse scan that recomputes one layer at a time and
writes `accumulator[i] + dW_i` into the carried accumulator (a dynamic-update-slice XLA does in place), so the
gradient the transform returns for `params` IS the updated accumulator and no second stacked buffer exists.

`layer_fn(layer_params, x, *consts) -> x` is one layer, pure; `params` and `accumulator` are the same pytree of
arrays stacked on a leading layer axis; `consts` (segment ids, positions, ...) are the same for every layer and
receive no gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _as_bits(x: jax.Array) -> jax.Array:
    """16-bit floats kept as their bits: XLA:CPU would store a stack of bfloat16 in float32 (float normalization);
    integers it leaves alone, and on an accelerator the bitcast is free."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits


def _anchored(layer_params: Any, layer_accumulator: Any) -> Any:
    """layer_params + 0 x the layer's accumulated gradient. Without this tie to a value that changes every
    micro-batch, XLA:TPU converts the whole stack to the compute dtype once, before the accumulation loop, and keeps
    that copy through it (7B stage 2 on 16 chips: 0.7 GiB). The accumulator is sharded like the params, so the tie
    costs no communication; x * 0 is not folded for floats, and it receives no gradient."""
    return jax.tree_util.tree_map(lambda p, a: p + jax.lax.stop_gradient(a * 0).astype(p.dtype),
                                  layer_params, layer_accumulator)


def _run(layer_fn, params, accumulator, x, consts):
    """The stack forward; also returns every layer's input (as `_as_bits`)."""
    def body(carry, layer):
        layer_params, layer_accumulator = layer
        return layer_fn(_anchored(layer_params, layer_accumulator), carry, *consts), _as_bits(carry)
    return jax.lax.scan(body, x, (params, accumulator))


def accumulating_scan(layer_fn: Callable[..., jax.Array], params: Any, accumulator: Any, x: jax.Array,
                      *consts: Any) -> jax.Array:
    """Runs the stack on `x`; d/d`params` of anything downstream comes back as `accumulator` + the stack's own
    weight gradient (see the module doc). `accumulator` itself receives no gradient."""

    @jax.custom_vjp
    def stack(params, accumulator, x, consts):
        return _run(layer_fn, params, accumulator, x, consts)[0]

    def forward(params, accumulator, x, consts):
        out, inputs = _run(layer_fn, params, accumulator, x, consts)
        return out, (params, accumulator, inputs, consts)

    def backward(residuals, d_out):
        params, accumulator, inputs, consts = residuals
        num_layers = jax.tree_util.tree_leaves(params)[0].shape[0]

        def body(carry, layer):
            d_x, acc = carry
            index, layer_params, layer_input = layer
            layer_input = _from_bits(layer_input, d_x.dtype)
            layer_acc = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), acc)
            _, vjp = jax.vjp(lambda p, h: layer_fn(_anchored(p, layer_acc), h, *consts), layer_params, layer_input)
            d_params, d_x = vjp(d_x)
            acc = jax.tree_util.tree_map(
                lambda a, a_layer, d: jax.lax.dynamic_update_index_in_dim(a, a_layer + d.astype(a.dtype), index, 0),
                acc, layer_acc, d_params)
            return (d_x, acc), None

        (d_x, acc), _ = jax.lax.scan(body, (d_out, accumulator),
                                     (jnp.arange(num_layers), params, inputs), reverse=True)
        return acc, None, d_x, jax.tree_util.tree_map(lambda _: None, consts)

    stack.defvjp(forward, backward)
    return stack(params, accumulator, x, tuple(consts))
