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
from typing import Mapping, Optional, Sequence

import jax

from llava_jax.config import Config, attention_head_dims, kernel_problems, validate


def choose_kernel(backend: str, dtype: str, head_dims: Mapping[str, int] | Sequence[int], packed: bool,
                  length: Optional[int] = None) -> tuple[str, str]:
    """(kernel, the reason) for model.attention=auto: the backend's fast kernel unless a limit of it
    (`config.kernel_problems`) is broken; `length` (data.max_length), when given, must suit it too."""
    fast = {"tpu": "splash", "gpu": "cudnn"}.get(backend)
    if fast is None:
        return "xla", backend.upper()
    dims = head_dims if isinstance(head_dims, Mapping) else {f"head dim {k}": d for k, d in enumerate(head_dims)}
    problems = kernel_problems(fast, dtype, dims, packed, length)
    if problems:
        return "xla", f"{backend.upper()}, but {problems[0][1]}"
    return fast, backend.upper()


def packs(config: Config, backend: Optional[str] = None) -> bool:
    """data.pack as a bool: `auto` packs when the attention kernel takes segment ids."""
    if config.data.pack != "auto":
        return bool(config.data.pack)
    if config.model.attention != "auto":
        return config.model.attention != "cudnn"
    kernel, _ = choose_kernel(backend or jax.default_backend(), config.model.dtype,
                              attention_head_dims(config.model), packed=False, length=config.data.max_length)
    return kernel != "cudnn"


def resolve_auto(config: Config, backend: Optional[str] = None) -> tuple[Config, list[str]]:
    """A copy of `config` with model.attention and data.pack concrete for `backend` (default: JAX's), validated,
    and log lines saying what `auto` became and why. Rows that `auto` leaves unpacked are one sample long
    (data.max_length becomes data.max_sample_length where that is shorter)."""
    backend = backend or jax.default_backend()
    resolved, lines = copy.deepcopy(config), []
    if config.data.pack == "auto":
        resolved.data.pack = packs(config, backend)
        lines.append(f"data.pack: auto -> {str(resolved.data.pack).lower()}")
    if config.model.attention == "auto":
        kernel, why = choose_kernel(backend, config.model.dtype, attention_head_dims(config.model),
                                    bool(resolved.data.pack), config.data.max_length)
        resolved.model.attention = kernel
        lines.append(f"model.attention: auto -> {kernel} ({why})")
    data = resolved.data
    if data.pack is False and data.sample_length < data.max_length:   # rows of one sample: one sample long
        lines.append(f"data.max_length: {data.max_length} -> {data.sample_length} (unpacked rows hold one sample of "
                     "at most data.max_sample_length)")
        data.max_length, data.max_sample_length = data.sample_length, None
    validate(resolved)
    return resolved, lines
