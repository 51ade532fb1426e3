"""AdamW with global-norm clipping as ONE elementwise update per parameter.

Public surface: `ClippedAdamWState`, `MOMENT_DTYPES`, `clipped_adamw(learning_rates, ..., moment_dtype="float32")`,
`stochastic_round_bfloat16(x, noise)`, `rounding_noise(shape, seed)`.

The math is optax's `chain(clip_by_global_norm(max_norm), multi_transform({group: adamw(lr_group, ...)}))` (same
operations in the same order, so the numbers agree to float32 rounding):

    g  = g if |g| < max_norm (or max_norm = 0) else g / |g| * max_norm     |g| = global norm of all grads
    mu = (1 - b1) g + b1 mu            nu = (1 - b2) g^2 + b2 nu            t = updates applied so far + 1
    p  = p - lr_group(t - 1) * ( (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) + weight_decay * p [decay_mask] )

optax runs that as a pass per transformation (clip, moments, bias correction, decay, learning rate, apply); here
each leaf is one expression that XLA fuses into a single loop over the parameter, and the global norm, which the
train step already has for its metrics, is passed in (`grad_norm=`) instead of being recomputed. One step counter
serves every group (all groups step together). Params may be a dict of groups (`learning_rates` keyed alike).

`moment_dtype="bfloat16"` stores mu and nu in bfloat16 (half the optimizer state): each update reads them as
float32, runs the math above in float32 (the step uses the float32 moments just computed) and rounds the new
moments to bfloat16 only to store them, stochastically (`stochastic_round_bfloat16`, unbiased: E[stored] = value).
Round-to-nearest would freeze nu: bfloat16 keeps 8 significant bits, so nu * b2 with b2 = 0.999 is within half a
unit in the last place of nu and rounds back to nu, and nu never decays. The rounding noise is a hash of the
element's index, the leaf's and the step count (`rounding_noise`: deterministic, fused into the update). With
"float32" (the default) no conversion is traced at all: the update is the one from before bfloat16 storage existed.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


MOMENT_DTYPES = ("float32", "bfloat16")
ROUNDING_SEED = 0x5EED   # salts the noise of the stochastic rounding of bfloat16 moments


class ClippedAdamWState(NamedTuple):
    count: jax.Array   # int32 []: updates applied so far
    mu: Any            # first moments, like the params (in `moment_dtype`)
    nu: Any            # second moments, like the params (in `moment_dtype`)


def _mix32(x: jax.Array) -> jax.Array:
    """An integer hash of uint32 x (Wellons' lowbias32): every output bit depends on every input bit."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def rounding_noise(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    """uint32 noise of `shape`: a hash of each element's row-major index and `seed` (uint32 []). Elementwise
    integer ops only, so XLA fuses it into the update that uses it (jax.random's threefry would materialise
    parameter-sized uint32 buffers)."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(shape):   # wraps modulo 2^32 beyond 4G elements: still a fine hash input
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    return _mix32(index ^ _mix32(seed))


def stochastic_round_bfloat16(x: jax.Array, noise: jax.Array) -> jax.Array:
    """float32 x -> bfloat16, rounded up or down at random with the probabilities that make it unbiased: the low
    16 bits of uint32 `noise` are added below the 16 bits bfloat16 keeps, which are then cut off (inf and nan stay
    what they are)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    kept = (bits + (noise & jnp.uint32(0xFFFF))) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(jnp.bfloat16)   # exact: low bits are zero


def _leaf_seeds(tree: Any, count: jax.Array) -> Any:
    """A (mu seed, nu seed) uint32 pair per leaf of `tree`, different for every leaf and every step `count`."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    step = count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(ROUNDING_SEED)
    return jax.tree_util.tree_unflatten(structure, [(step + jnp.uint32(2 * i), step + jnp.uint32(2 * i + 1))
                                                    for i in range(len(leaves))])


def clipped_adamw(learning_rates: dict[str, optax.Schedule], *, b1: float, b2: float, eps: float,
                  weight_decay: float, decay_mask: Callable[[Any], Any], max_norm: float,
                  moment_dtype: str = "float32") -> optax.GradientTransformationExtraArgs:
    """`learning_rates[group]` schedules the top-level params group `group`; `decay_mask(params)` is a tree of
    bools (True = decay). `update(grads, state, params, grad_norm=None)` returns the updates (new params - params).
    `moment_dtype` ("float32" or "bfloat16") is the storage dtype of mu and nu (see the module doc)."""
    if moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"train.optimizer_state_dtype: {moment_dtype!r} is not one of {list(MOMENT_DTYPES)}")
    stored = moment_dtype == "bfloat16"   # False: the moments are float32 like the grads, and stay so

    def init(params):
        dtype = jnp.bfloat16 if stored else None   # None: each moment like its param
        zeros = lambda: jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype), params)  # noqa: E731
        return ClippedAdamWState(jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(grads, state: ClippedAdamWState, params=None, *, grad_norm: Optional[jax.Array] = None, **_):
        if params is None:
            raise ValueError("clipped_adamw needs the params (decoupled weight decay)")
        norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
        keep = (norm < max_norm) | (max_norm == 0)   # max_norm 0: no clipping
        count = optax.safe_increment(state.count)
        mu_correction = (1 - b1 ** count).astype(jnp.float32)
        nu_correction = (1 - b2 ** count).astype(jnp.float32)

        def leaf(lr, decays, g, mu, nu, p, seeds=None):
            if stored:   # stored moments are read as float32, like the gradient
                mu, nu = mu.astype(g.dtype), nu.astype(g.dtype)
            g = jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm)
            mu = (1 - b1) * g + b1 * mu
            nu = (1 - b2) * (g ** 2) + b2 * nu
            step = (mu / mu_correction.astype(mu.dtype)) / (jnp.sqrt(nu / nu_correction.astype(nu.dtype)) + eps)
            if decays and weight_decay:
                step = step + weight_decay * p
            if stored:
                mu = stochastic_round_bfloat16(mu, rounding_noise(mu.shape, seeds[0]))
                nu = stochastic_round_bfloat16(nu, rounding_noise(nu.shape, seeds[1]))
            return -lr * step, mu, nu

        mask = decay_mask(params)
        seeds = _leaf_seeds(grads, count) if stored else None
        per_leaf = {group: jax.tree_util.tree_map(
            functools.partial(leaf, learning_rates[group](state.count)), mask[group], grads[group],
            state.mu[group], state.nu[group], params[group], *([seeds[group]] if stored else [])) for group in grads}
        updates, mu, nu = jax.tree_util.tree_transpose(
            jax.tree_util.tree_structure(grads), jax.tree_util.tree_structure((0, 0, 0)), per_leaf)
        return updates, ClippedAdamWState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)
