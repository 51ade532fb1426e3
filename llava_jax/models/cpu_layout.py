"""Matmul operand layouts for XLA's CPU backend. Public surface: `on_cpu()`, `swap_last_two(x)`.

XLA:CPU's fast (YNNPACK) dots take row-major operands contracted over the lhs's last and the rhs's first
dimension only; a dot that contracts any other dimension (x^T @ dy, q @ k^T) falls back to a kernel ~30 % slower
or worse. `swap_last_two` hands a dot the transposed operand it needs as a materialised array (an optimization
barrier stops XLA folding the transpose back into the dot's dimension numbers). Other backends lay out dots
themselves, so there it is a plain transpose that XLA is free to fold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def swap_last_two(x: jax.Array) -> jax.Array:
    """x [..., m, n] -> [..., n, m], materialised row-major on CPU."""
    swapped = jnp.swapaxes(x, -1, -2)
    return jax.lax.optimization_barrier(swapped) if on_cpu() else swapped
