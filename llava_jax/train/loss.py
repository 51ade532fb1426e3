"""Next-token cross-entropy over supervised tokens: logits only where a chunk holds a target, never all at once.

Public surface: `cross_entropy_sums(hidden, head, head_params, input_ids, loss_mask, chunk_size) -> (sum, count)`
and `supervised_token_count(loss_mask)` (that count, from the mask alone). `head(head_params, h)` maps hidden
states [B, c, E] to float32 logits [B, c, V].

`hidden[:, t]` predicts `input_ids[:, t + 1]`, weighted by `loss_mask[:, t + 1]` (1 = supervised target).
With `0 < chunk_size < T - 1` each row's supervised positions are moved to its front (a stable per-row sort, so
batch shards never exchange rows) and the sequence is cut into chunks of `chunk_size` positions; a chunk with no
target in any row is skipped (`lax.cond`), so image and prompt positions cost no LM-head FLOPs. Each computed
chunk is fused: its logits, softmax and the gradients they send to the hidden states and the head parameters are
computed in the forward pass and dropped, so neither pass keeps more than one [B, chunk, V] block and nothing is
recomputed; the backward only scales them by the incoming cotangent. Head-parameter gradients are only formed
when the head is being differentiated (a frozen language model skips them).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Head = Callable[[Any, jax.Array], jax.Array]


def supervised_token_count(loss_mask: jax.Array) -> jax.Array:
    """Supervised next-token targets in a [B, T] loss mask: the `count` of `cross_entropy_sums`."""
    return jnp.sum(loss_mask[:, 1:].astype(jnp.float32))


def cross_entropy_sums(hidden: jax.Array, head: Head, head_params: Any, input_ids: jax.Array,
                       loss_mask: jax.Array, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over supervised next tokens, their count). hidden [B, T, E]; see the module doc."""
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    length = hidden.shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        chunk_size = length
    else:
        order = jnp.argsort(weights == 0, axis=1, stable=True)      # supervised positions first, per row
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets, weights = (jnp.take_along_axis(x, order, axis=1) for x in (targets, weights))
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def chunks(x):   # [B, L, ...] -> [num_chunks, B, chunk, ...]; padded positions carry weight 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    loss = _fused_sums(head, head_params, chunks(hidden), chunks(targets), chunks(weights))
    return loss, supervised_token_count(loss_mask)


def _chunk(head: Head, params: Any, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
           grad_params: bool, grad_hidden: bool):
    """One chunk: (CE sum, d sum / d params or None, d sum / d hidden or None)."""
    logits, vjp = jax.vjp(lambda p, h: head(p, h).astype(jnp.float32), params, hidden)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # the target's logit as a masked sum (exact: one term): a gather would pull a vocab-sharded row together
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logits = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    loss = jnp.sum((log_z - target_logits) * weights)
    if not (grad_params or grad_hidden):
        return loss, None, None
    probs = jnp.exp(logits - log_z[..., None])
    d_logits = jnp.where(vocab == targets[..., None], probs - 1.0, probs) * weights[..., None]
    d_params, d_hidden = vjp(d_logits)
    return loss, d_params if grad_params else None, d_hidden if grad_hidden else None


def _scan_chunks(head, params, hidden, targets, weights, grad_params: bool, grad_hidden: bool):
    """(CE sum, d params, d hidden [num_chunks, B, chunk, E]) over chunks; chunks without a target are skipped.
    The sums accumulate inside the branch that computes a chunk, so a skipped chunk touches none of them."""

    def body(carry, xs):
        h, t, w = xs

        def compute(carry):
            loss_acc, d_params_acc = carry
            loss, d_params, d_hidden = _chunk(head, params, h, t, w, grad_params, grad_hidden)
            if grad_params:
                d_params_acc = jax.tree_util.tree_map(jnp.add, d_params_acc, d_params)
            return (loss_acc + loss, d_params_acc), d_hidden

        def skip(carry):
            return carry, (jnp.zeros_like(h) if grad_hidden else None)

        return jax.lax.cond(jnp.any(w > 0), compute, skip, carry)

    zero_params = jax.tree_util.tree_map(jnp.zeros_like, params) if grad_params else None
    (loss, d_params), d_hidden = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zero_params),
                                              (hidden, targets, weights))
    return loss, d_params, d_hidden


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(head, params, hidden, targets, weights):
    return _scan_chunks(head, params, hidden, targets, weights, False, False)[0]


def _fused_forward(head, params, hidden, targets, weights):
    """With symbolic zeros every leaf arrives as a CustomVJPPrimal that says whether it is being differentiated."""
    primal = lambda leaf: isinstance(leaf, jax.custom_derivatives.CustomVJPPrimal)  # noqa: E731
    grad_params = any(leaf.perturbed for leaf in jax.tree_util.tree_leaves(params, is_leaf=primal))
    params = jax.tree_util.tree_map(lambda leaf: leaf.value, params, is_leaf=primal)
    loss, d_params, d_hidden = _scan_chunks(head, params, hidden.value, targets.value, weights.value,
                                            grad_params, hidden.perturbed)
    return loss, (d_params, d_hidden)


def _fused_backward(head, gradients, d_loss):
    d_params, d_hidden = gradients
    scale = lambda tree: None if tree is None else jax.tree_util.tree_map(  # noqa: E731
        lambda g: (g * d_loss).astype(g.dtype), tree)
    return scale(d_params), scale(d_hidden), None, None


_fused_sums.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)
