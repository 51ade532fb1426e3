"""Next-token cross-entropy over supervised tokens, without materialising [B, T, V] float32 logits.

Public surface: `cross_entropy_sums(hidden, head, input_ids, loss_mask, chunk_size) -> (sum, count)` and
`supervised_token_count(loss_mask)` (that count, from the mask alone).

`hidden[:, t]` predicts `input_ids[:, t + 1]`, weighted by `loss_mask[:, t + 1]` (1 = supervised target).
With `chunk_size > 0` the sequence is cut into chunks of that many positions; each chunk's logits are computed,
reduced and dropped inside a rematerialised scan body, so forward and backward hold one [B, chunk, V] block.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _chunk_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logits) * weights), jnp.sum(weights)


def supervised_token_count(loss_mask: jax.Array) -> jax.Array:
    """Supervised next-token targets in a [B, T] loss mask: the `count` of `cross_entropy_sums`."""
    return jnp.sum(loss_mask[:, 1:].astype(jnp.float32))


def cross_entropy_sums(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], input_ids: jax.Array,
                       loss_mask: jax.Array, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of CE over supervised next tokens, their count). hidden [B, T, E]; head maps it to logits [.., V]."""
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    length = hidden.shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        return _chunk_sums(head(hidden), targets, weights)
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def chunks(x):   # [B, L, ...] -> [num_chunks, B, chunk, ...]; padded positions carry weight 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def body(carry, xs):
        h, t, w = xs
        loss, count = _chunk_sums(head(h), t, w)
        return (carry[0] + loss, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (loss, count), _ = jax.lax.scan(body, (zero, zero), (chunks(hidden), chunks(targets), chunks(weights)))
    return loss, count
