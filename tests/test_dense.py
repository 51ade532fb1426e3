"""The Dense contraction with an explicit-transpose weight gradient equals lax.dot_general, value and gradients,
and its compiled gradient contains no dot with a transposed (contracting-dim-0) left operand."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.layers import dense_dot_general

DENSE = lambda x: (((x.ndim - 1,), (0,)), ((), ()))  # noqa: E731


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
def test_value_and_gradients_equal_lax_dot_general(shape):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    kernel = jnp.asarray(rng.randn(5, 7), jnp.float32)
    cotangent = jnp.asarray(rng.randn(*shape[:-1], 7), jnp.float32)

    def loss(dot_general):
        return lambda x, k: jnp.sum(dot_general(x, k, DENSE(x)) * cotangent)

    ours, reference = loss(dense_dot_general), loss(jax.lax.dot_general)
    np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-6)
    for got, want in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(reference, (0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_other_contractions_fall_through_to_lax():
    x, kernel = jnp.ones((4, 3)), jnp.ones((4, 2))
    np.testing.assert_array_equal(dense_dot_general(x, kernel, (((0,), (0,)), ((), ()))), jnp.full((3, 2), 4.0))


def test_weight_gradient_has_no_transposed_operand_dot():
    x, kernel = jnp.ones((2, 64, 32)), jnp.ones((32, 48))
    grad = jax.jit(jax.grad(lambda k: jnp.sum(dense_dot_general(x, k, DENSE(x)) ** 2)))
    hlo = grad.lower(kernel).compile().as_text()
    contracting = re.findall(r" dot\(.*?lhs_contracting_dims=\{([\d,]+)\}", hlo)
    assert contracting and all("0" not in dims.split(",") for dims in contracting), contracting
