"""What `auto` stands for on the backend at hand: the attention kernel and whether rows are packed.

Public surface: `choose_kernel(backend, dtype, head_dims, packed) -> (kernel, why)`, `packs(config) -> bool` and
`resolve_auto(config, backend=None) -> (Config with concrete values, [log lines])`.

model.attention=auto: `splash` on TPU (head dims of 64 or a multiple of 128), `cudnn` on GPU (bfloat16/float16
compute, head dims multiples of 8 up to 256, rows NOT packed: jax's cuDNN call takes one segment per row as a
length, no segment ids), `xla` otherwise (CPU; the documented fallback on accelerators: packed rows on GPU, float32
or odd head dims). data.pack=auto: pack whenever the kernel takes segments (xla, splash), so on TPU and CPU rows are
packed and on GPU cuDNN runs unpacked rows.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import jax

from llava_jax.config import SPLASH_BLOCK, Config, validate


def choose_kernel(backend: str, dtype: str, head_dims: Sequence[int], packed: bool, length: Optional[int] = None
                  ) -> tuple[str, str]:
    """(kernel, the reason) for model.attention=auto; `length` (data.max_length), when given, must suit splash."""
    if backend == "tpu":
        if not all(dim == 64 or dim % 128 == 0 for dim in head_dims):
            return "xla", f"TPU, but splash needs head dims of 64 or a multiple of 128 (have {list(head_dims)})"
        if length is not None and length % SPLASH_BLOCK:
            return "xla", f"TPU, but splash needs data.max_length to be a multiple of {SPLASH_BLOCK}"
        return "splash", "TPU"
    if backend == "gpu":
        if packed:
            return "xla", "GPU with packed rows (cuDNN through jax takes no segment ids; data.pack=auto avoids this)"
        if dtype == "float32":
            return "xla", "GPU, but cuDNN flash attention needs bfloat16/float16 compute (model.dtype)"
        if not all(dim % 8 == 0 and dim <= 256 for dim in head_dims):
            return "xla", f"GPU, but cuDNN needs head dims that are multiples of 8 up to 256 (have {list(head_dims)})"
        return "cudnn", "GPU"
    return "xla", backend.upper()


def _head_dims(config: Config) -> tuple[int, int]:
    m = config.model
    return m.decoder.head_dim, m.vision.hidden_size // m.vision.num_heads


def packs(config: Config, backend: Optional[str] = None) -> bool:
    """data.pack as a bool: `auto` packs when the attention kernel takes segment ids."""
    if config.data.pack != "auto":
        return bool(config.data.pack)
    if config.model.attention != "auto":
        return config.model.attention != "cudnn"
    kernel, _ = choose_kernel(backend or jax.default_backend(), config.model.dtype, _head_dims(config), packed=False,
                              length=config.data.max_length)
    return kernel != "cudnn"


def resolve_auto(config: Config, backend: Optional[str] = None) -> tuple[Config, list[str]]:
    """A copy of `config` with model.attention and data.pack concrete for `backend` (default: JAX's), validated,
    and log lines saying what `auto` became and why."""
    backend = backend or jax.default_backend()
    resolved, lines = copy.deepcopy(config), []
    if config.data.pack == "auto":
        resolved.data.pack = packs(config, backend)
        lines.append(f"data.pack: auto -> {str(resolved.data.pack).lower()}")
    if config.model.attention == "auto":
        kernel, why = choose_kernel(backend, config.model.dtype, _head_dims(config), bool(resolved.data.pack),
                                    config.data.max_length)
        resolved.model.attention = kernel
        lines.append(f"model.attention: auto -> {kernel} ({why})")
    validate(resolved)
    return resolved, lines
