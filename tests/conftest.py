"""Shared test set-up: 8 fake CPU devices (set before jax is imported), a persistent compile cache, tiny configs."""
import os

# LLVM at -O0: a third less compile time (the tests compile far more than they run); XLA's own passes unchanged
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# a size limit turns on the cache's file lock: test workers (pytest -n) and their subprocesses share it safely
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

from llava_jax.config import load_config  # noqa: E402
from tests.helpers import TINY_MODEL  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def tiny_config():
    """A tiny CLIP + LLaMA config (28px images, 16 image tokens) built from defaults plus overrides."""
    def make(*overrides):
        return load_config(None, TINY_MODEL + list(overrides))
    return make


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory):
    """(root, name -> data.tokenizer path) of the real tokenizers in tests/real_tokenizers.py (built once)."""
    from tests.real_tokenizers import build_real_tokenizers
    root = tmp_path_factory.mktemp("real_tokenizers")
    return root, build_real_tokenizers(root)
