"""cpu_layout's switch: CPU traces get the CPU-only operand layouts, `accelerator_layout()` traces do not."""
import jax
import jax.numpy as jnp
import pytest

from llava_jax.models.cpu_layout import accelerator_layout, on_cpu, swap_last_two


def barriers(x) -> int:
    """Barriers in a fresh trace of swap_last_two (a new function object: jax caches traces per function)."""
    return str(jax.make_jaxpr(lambda y: swap_last_two(y))(x)).count("optimization_barrier")


def test_cpu_traces_materialise_the_swapped_operand():
    assert jax.default_backend() == "cpu" and on_cpu()
    assert barriers(jnp.zeros((2, 3))) == 1


def test_accelerator_layout_turns_the_cpu_tricks_off_and_back_on():
    with accelerator_layout():
        assert not on_cpu()
        assert barriers(jnp.zeros((2, 3))) == 0
        with accelerator_layout():   # nests
            assert not on_cpu()
        assert not on_cpu()
    assert on_cpu()


def test_accelerator_layout_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with accelerator_layout():
            raise RuntimeError("boom")
    assert on_cpu()
