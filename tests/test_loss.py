"""The fused, chunked cross-entropy equals the plain full-logits version in value and gradient, skips chunks
without targets, and never holds full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.train.loss import cross_entropy_sums

HEAD = lambda kernel, h: h @ kernel  # noqa: E731


def reference_sums(hidden, kernel, input_ids, loss_mask):
    logits = (hidden @ kernel)[:, :-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1)[..., 0]
    weights = loss_mask[:, 1:]
    return -jnp.sum(picked * weights), jnp.sum(weights)


@pytest.mark.parametrize("chunk_size", [0, 4, 7, 19, 64])
def test_chunked_loss_and_gradients_match_full_logits(chunk_size):
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(3, 20, 16), jnp.float32)
    kernel = jnp.asarray(rng.randn(16, 50) * 0.3, jnp.float32)
    input_ids = jnp.asarray(rng.randint(0, 50, (3, 20)), jnp.int32)
    loss_mask = jnp.asarray(rng.rand(3, 20) > 0.4, jnp.float32)

    def ours(h, k):
        total, count = cross_entropy_sums(h, HEAD, k, input_ids, loss_mask, chunk_size)
        return total / count

    def reference(h, k):
        total, count = reference_sums(h, k, input_ids, loss_mask)
        return total / count

    np.testing.assert_allclose(ours(hidden, kernel), reference(hidden, kernel), rtol=1e-6)
    for got, want in zip(jax.grad(ours, (0, 1))(hidden, kernel), jax.grad(reference, (0, 1))(hidden, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(cross_entropy_sums(hidden, HEAD, kernel, input_ids, loss_mask, chunk_size)[1]) == \
        float(loss_mask[:, 1:].sum())


def test_chunked_loss_never_holds_full_logits():
    """The compiled chunked loss keeps temporaries well below one [B, T, V] float32 logits buffer."""
    batch, length, embed, vocab = 2, 512, 32, 4096
    hidden = jax.ShapeDtypeStruct((batch, length, embed), jnp.float32)
    kernel = jax.ShapeDtypeStruct((embed, vocab), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def temp_bytes(chunk_size):
        def loss(h, k, i, m):
            total, count = cross_entropy_sums(h, HEAD, k, i, m, chunk_size)
            return total / count
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, kernel, ids, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits = batch * length * vocab * 4
    assert temp_bytes(0) >= full_logits
    assert temp_bytes(64) < full_logits / 2   # a few [B, 64, V] blocks (logits, softmax, its gradient) at once


def test_chunks_without_targets_are_skipped_and_frozen_heads_get_no_gradient():
    """Targets only in the last 5 positions of each row: after the per-row sort they fill the first chunk, so with
    chunks of 8 over 19 positions the head runs on one chunk of three, forward and backward."""
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 20, 16), jnp.float32)
    kernel = jnp.asarray(rng.randn(16, 30) * 0.3, jnp.float32)
    input_ids = jnp.asarray(rng.randint(0, 30, (2, 20)), jnp.int32)
    loss_mask = jnp.zeros((2, 20), jnp.float32).at[:, 15:].set(1.0)
    calls = []

    def counting_head(k, h):
        jax.debug.callback(lambda: calls.append(1))
        return h @ k

    def ours(h, k):
        total, count = cross_entropy_sums(h, counting_head, k, input_ids, loss_mask, 8)
        return total / count

    grads = jax.jit(jax.grad(ours, (0, 1)))(hidden, kernel)
    jax.effects_barrier()
    assert len(calls) == 1
    want = jax.grad(lambda h, k: reference_sums(h, k, input_ids, loss_mask)[0] / 10.0, (0, 1))(hidden, kernel)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    hidden_only = jax.jit(jax.grad(ours)).lower(hidden, kernel).compile().as_text()
    assert hidden_only.count(" dot(") < jax.jit(jax.grad(ours, (0, 1))).lower(hidden, kernel).compile().as_text() \
        .count(" dot(")
