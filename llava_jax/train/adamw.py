"""AdamW with global-norm clipping as ONE elementwise update per parameter.

Public surface: `ClippedAdamWState`, `clipped_adamw(learning_rates, ...)`.

The math is optax's `chain(clip_by_global_norm(max_norm), multi_transform({group: adamw(lr_group, ...)}))` (same
operations in the same order, so the numbers agree to float32 rounding):

    g  = g if |g| < max_norm (or max_norm = 0) else g / |g| * max_norm     |g| = global norm of all grads
    mu = (1 - b1) g + b1 mu            nu = (1 - b2) g^2 + b2 nu            t = updates applied so far + 1
    p  = p - lr_group(t - 1) * ( (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) + weight_decay * p [decay_mask] )

optax runs that as a pass per transformation (clip, moments, bias correction, decay, learning rate, apply); here
each leaf is one expression that XLA fuses into a single loop over the parameter, and the global norm, which the
train step already has for its metrics, is passed in (`grad_norm=`) instead of being recomputed. One step counter
serves every group (all groups step together). Params may be a dict of groups (`learning_rates` keyed alike).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class ClippedAdamWState(NamedTuple):
    count: jax.Array   # int32 []: updates applied so far
    mu: Any            # first moments, like the params
    nu: Any            # second moments, like the params


def clipped_adamw(learning_rates: dict[str, optax.Schedule], *, b1: float, b2: float, eps: float,
                  weight_decay: float, decay_mask: Callable[[Any], Any], max_norm: float
                  ) -> optax.GradientTransformationExtraArgs:
    """`learning_rates[group]` schedules the top-level params group `group`; `decay_mask(params)` is a tree of
    bools (True = decay). `update(grads, state, params, grad_norm=None)` returns the updates (new params - params)."""

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, params)  # noqa: E731
        return ClippedAdamWState(jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(grads, state: ClippedAdamWState, params=None, *, grad_norm: Optional[jax.Array] = None, **_):
        if params is None:
            raise ValueError("clipped_adamw needs the params (decoupled weight decay)")
        norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
        keep = (norm < max_norm) | (max_norm == 0)   # max_norm 0: no clipping
        count = optax.safe_increment(state.count)
        mu_correction = (1 - b1 ** count).astype(jnp.float32)
        nu_correction = (1 - b2 ** count).astype(jnp.float32)

        def leaf(lr, decays, g, mu, nu, p):
            g = jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm)
            mu = (1 - b1) * g + b1 * mu
            nu = (1 - b2) * (g ** 2) + b2 * nu
            step = (mu / mu_correction.astype(mu.dtype)) / (jnp.sqrt(nu / nu_correction.astype(nu.dtype)) + eps)
            if decays and weight_decay:
                step = step + weight_decay * p
            return -lr * step, mu, nu

        mask = decay_mask(params)
        per_leaf = {group: jax.tree_util.tree_map(
            functools.partial(leaf, learning_rates[group](state.count)), mask[group], grads[group],
            state.mu[group], state.nu[group], params[group]) for group in grads}
        updates, mu, nu = jax.tree_util.tree_transpose(
            jax.tree_util.tree_structure(grads), jax.tree_util.tree_structure((0, 0, 0)), per_leaf)
        return updates, ClippedAdamWState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)
