"""models/accumulate.py: the stack's weight gradient comes back added into the accumulator, the input gradient is
the plain one, in float32 and with 16-bit activations (kept as bits between the passes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.accumulate import accumulating_scan


def layer(params, x, scale):
    return x + jnp.tanh(x @ params["w"].astype(x.dtype) + params["b"].astype(x.dtype)) * scale.astype(x.dtype)


def plain(params, x, scale):
    def body(h, p):
        return layer(p, h, scale), None
    return jax.lax.scan(jax.checkpoint(body), x, params)[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_land_in_the_accumulator(dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(keys[0], (3, 8, 8)) / 3, "b": jax.random.normal(keys[1], (3, 8))}
    accumulator = jax.tree_util.tree_map(lambda p: jax.random.normal(keys[2], p.shape), params)
    x = jax.random.normal(keys[3], (4, 8)).astype(dtype)
    scale = jnp.float32(0.5)

    def loss(stack, p, h):
        return jnp.sum(jnp.sin(stack(p, h).astype(jnp.float32)))

    ref_params, ref_x = jax.grad(loss, argnums=(1, 2))(lambda p, h: plain(p, h, scale), params, x)
    got_params, got_x = jax.grad(loss, argnums=(1, 2))(
        lambda p, h: accumulating_scan(layer, p, accumulator, h, scale), params, x)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for key in params:
        np.testing.assert_allclose(got_params[key], accumulator[key] + ref_params[key], atol=tol, rtol=tol)
    assert got_x.dtype == x.dtype
    np.testing.assert_allclose(np.float32(got_x), np.float32(ref_x), atol=tol, rtol=tol)
    out = accumulating_scan(layer, params, accumulator, x, scale)
    np.testing.assert_array_equal(np.float32(out), np.float32(plain(params, x, scale)))
    assert not np.any(np.asarray(jax.grad(lambda a: jnp.sum(accumulating_scan(layer, params, a, x, scale)
                                                            .astype(jnp.float32)))(accumulator)["w"]))
