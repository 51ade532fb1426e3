"""Param tree layouts: scanned vs per-layer trees, flat path dicts, and one tensor's HF vs our memory layout.

Public surface: `stack_layers` / `unstack_layers` (per-layer `layers_N` <-> scanned `layers` with a leading layer
axis); `conform_params(params, config)`; `flatten` / `unflatten` ("a/b/c" path dicts); `per_layer_shapes(config)`;
`as_model_params(flat, config)`; `from_hf` / `to_hf` / `hf_shape` (Linear and patch-conv weight layouts).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

from llava_jax.config import ModelConfig
from llava_jax.models.llava import init_params

_LAYER_KEY = re.compile(r"layers_\d+")
_PATCH_KERNEL = "vision_tower/patch_embed/kernel"


def stack_layers(params: Any) -> Any:
    """Per-layer tree (`layers_0`, `layers_1`, ...) -> scanned tree (`layers`, leading layer axis); numpy leaves."""
    if not isinstance(params, dict):
        return params
    out = {key: stack_layers(value) for key, value in params.items() if not _LAYER_KEY.fullmatch(key)}
    layer_keys = [f"layers_{i}" for i in range(len(params) - len(out))]
    if layer_keys:
        missing = [key for key in layer_keys if key not in params]
        if missing:
            raise ValueError(f"cannot stack layers: {missing[0]!r} is missing (layers must be numbered 0..n-1)")
        out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[key] for key in layer_keys])
    return out


def unstack_layers(params: Any) -> Any:
    """Scanned tree (`layers` with a leading layer axis) -> per-layer tree (`layers_0`, `layers_1`, ...)."""
    if not isinstance(params, dict):
        return params
    out = {key: unstack_layers(value) for key, value in params.items() if key != "layers"}
    if "layers" in params:
        num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
        for i in range(num_layers):
            out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


def flatten(tree: Any) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    return {"/".join(key.key for key in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a/b/c": leaf} -> nested dict (inverse of `flatten`)."""
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


def _param_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Path -> shape of every param `init_params(config)` builds (no memory is allocated)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {path: leaf.shape for path, leaf in flatten(abstract).items()}


def per_layer_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Path -> shape of every param of `config` in the per-layer (`layers_N`) layout checkpoints use."""
    return _param_shapes(dataclasses.replace(config, scan_layers=False))


def as_model_params(flat: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Flat per-layer params -> the tree `init_params(config)` builds (stacked when `config.scan_layers`)."""
    params = unflatten(flat)
    return stack_layers(params) if config.scan_layers else params


def conform_params(params: Any, config: ModelConfig) -> Any:
    """Lays `params` out for `config.scan_layers` and checks they are exactly the tree `init_params(config)`
    builds (same names and shapes); raises ValueError naming the first difference."""
    params = stack_layers(params) if config.scan_layers else unstack_layers(params)
    have = {path: tuple(np.shape(leaf)) for path, leaf in flatten(params).items()}
    want = _param_shapes(config)
    for path in sorted(set(have) | set(want)):
        if have.get(path) != want.get(path):
            raise ValueError(f"param {path!r}: the checkpoint has {have.get(path, 'nothing')}, the model config "
                             f"needs {want.get(path, 'nothing')}; the config describes a different architecture")
    return params


def from_hf(value: np.ndarray, path: str) -> np.ndarray:
    """HF tensor -> our layout (float32): Linear [out, in] -> kernel [in, out]; patch conv [out, C, kh, kw] ->
    Dense kernel over (kh, kw, C)-flattened patches."""
    value = np.asarray(value, np.float32)
    if path == _PATCH_KERNEL:
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value.T if path.endswith("/kernel") else value


def to_hf(value: Any, path: str, config: ModelConfig) -> np.ndarray:
    """Inverse of `from_hf`."""
    value = np.asarray(value, np.float32)
    if path == _PATCH_KERNEL:
        v = config.vision
        return value.reshape(v.patch_size, v.patch_size, v.num_channels, -1).transpose(3, 2, 0, 1)
    return value.T if path.endswith("/kernel") else value


def hf_shape(shape: tuple, path: str, config: ModelConfig) -> tuple:
    """The HF tensor shape of our param `path` of `shape`."""
    return to_hf(np.broadcast_to(np.float32(0), shape), path, config).shape
