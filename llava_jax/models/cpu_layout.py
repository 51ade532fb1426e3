"""Matmul operand layouts for XLA's CPU backend. Public surface: `on_cpu()`, `swap_last_two(x)`,
`accelerator_layout()`.

XLA:CPU's fast (YNNPACK) dots take row-major operands contracted over the lhs's last and the rhs's first
dimension only; a dot that contracts any other dimension (x^T @ dy, q @ k^T) falls back to a kernel ~30 % slower
or worse. `swap_last_two` hands a dot the transposed operand it needs as a materialised array (an optimization
barrier stops XLA folding the transpose back into the dot's dimension numbers). Other backends lay out dots
themselves, so there it is a plain transpose that XLA is free to fold.

`on_cpu()` is read while a function is traced. Inside `with accelerator_layout():` it is False even on CPU, so a
function traced there is the graph a TPU / GPU would run (the memory planner compiles that on fake CPU devices).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax
import jax.numpy as jnp

_override = threading.local()


def on_cpu() -> bool:
    """True when tracing for XLA's CPU backend, outside `accelerator_layout()`."""
    return jax.default_backend() == "cpu" and not getattr(_override, "accelerator", False)


@contextlib.contextmanager
def accelerator_layout() -> Iterator[None]:
    """Traces inside this block skip the CPU-only layout tricks (`on_cpu()` is False), as on an accelerator.
    Jit caches key on the function, not on this switch: trace a fresh function object inside it."""
    previous = getattr(_override, "accelerator", False)
    _override.accelerator = True
    try:
        yield
    finally:
        _override.accelerator = previous


def swap_last_two(x: jax.Array) -> jax.Array:
    """x [..., m, n] -> [..., n, m], materialised row-major on CPU."""
    swapped = jnp.swapaxes(x, -1, -2)
    return jax.lax.optimization_barrier(swapped) if on_cpu() else swapped
