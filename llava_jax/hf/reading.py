"""Reading Hugging Face model directories: config.json and safetensors weights (one file or index-listed shards).

Public surface: `load_hf_llava(dir) -> (ModelConfig, params)`; the pieces the tower loader shares: `Checkpoint`
(a directory's weights, read lazily by transformers-5 name), `read_params(config, checkpoint, shapes)` (the
params `shapes` lists, every other weight accounted for) and `read_config(path, parse)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from safetensors import safe_open

from llava_jax.config import ModelConfig
from llava_jax.hf.configs import model_config_from_hf
from llava_jax.hf.layout import as_model_params, from_hf, hf_shape, per_layer_shapes
from llava_jax.hf.names import EMBEDDING_NAME, EMBEDDING_PATH, HEAD_NAME, HEAD_PATH, hf_name, llava_name, skippable


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face config / index file)")
    with open(path) as f:
        return json.load(f)


def read_config(path: Path, parse: Callable[[dict], Any]) -> Any:
    """Parses config.json at `path` with `parse`, prefixing its errors with the file."""
    try:
        return parse(_read_json(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
    return files


class Checkpoint:
    """The safetensors weights of one directory (single file, or shards listed in model.safetensors.index.json),
    read lazily and addressed by transformers-5 LLaVA names given by `rename(raw) -> name | None (ignore)`."""

    def __init__(self, directory: Path, rename: Callable[[str], Optional[str]]):
        self.directory = directory
        self._where: dict[str, tuple[Path, str]] = {}
        for file in _safetensors_files(directory):
            with safe_open(file, framework="numpy") as f:
                for raw in f.keys():
                    name = rename(raw)
                    if name is None:
                        continue
                    if name in self._where:
                        raise ValueError(f"{file}: weight {raw!r} and {self._where[name][1]!r} both mean {name!r}")
                    self._where[name] = (file, raw)

    def names(self) -> set[str]:
        return set(self._where)

    def file(self, name: str) -> Path:
        """The safetensors file holding weight `name`."""
        return self._where[name][0]

    def read(self, name: str, path: str) -> np.ndarray:
        """Weight `name` as stored; `path` (our param it is read for) only goes into the error if it is missing."""
        if name not in self._where:
            raise ValueError(f"{self.directory}: weight {name!r} (transformers-5 name, for param {path!r}) is missing")
        file, raw = self._where[name]
        with safe_open(file, framework="numpy") as f:
            return f.get_tensor(raw)


def _require_untied_head(checkpoint: Checkpoint, shapes: dict[str, tuple]) -> None:
    """An untied decoder needs its own output layer: name the flag that disagrees with the weights."""
    if HEAD_PATH in shapes and HEAD_NAME not in checkpoint.names():
        raise ValueError(f"{checkpoint.directory}: config.json says tie_word_embeddings=false (the output layer has "
                         f"its own weights), but the checkpoint has no {HEAD_NAME!r}; if the model reuses its "
                         f"embedding table as the output layer, set tie_word_embeddings=true in "
                         f"{checkpoint.directory / 'config.json'}")


def _verified_tied_head(config: ModelConfig, checkpoint: Checkpoint, flat: dict[str, np.ndarray]) -> set[str]:
    """A tied decoder's checkpoint may still store lm_head.weight as a copy of the embedding table: accepted (and
    returned as used) only if it is exactly that copy."""
    if not (config.decoder.tie_embeddings and EMBEDDING_PATH in flat and HEAD_NAME in checkpoint.names()):
        return set()
    head = np.asarray(checkpoint.read(HEAD_NAME, EMBEDDING_PATH), np.float32)
    if not np.array_equal(head, flat[EMBEDDING_PATH]):
        raise ValueError(f"{checkpoint.file(HEAD_NAME)}: config.json says tie_word_embeddings=true (the output layer "
                         f"is the embedding table), but the checkpoint's {HEAD_NAME!r} differs from "
                         f"{EMBEDDING_NAME!r} (transformers-5 names); if the model has its own output layer, set "
                         f"tie_word_embeddings=false in {checkpoint.directory / 'config.json'}")
    return {HEAD_NAME}


def read_params(config: ModelConfig, checkpoint: Checkpoint, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Reads the per-layer params `shapes` lists (flat, float32, our layout). Every other checkpoint weight must be
    `skippable` or a tied model's exact copy of its embedding table as lm_head; otherwise ValueError."""
    _require_untied_head(checkpoint, shapes)
    flat = {}
    for path, shape in shapes.items():
        name = hf_name(path)
        value = checkpoint.read(name, path)
        expected = hf_shape(shape, path, config)
        if tuple(value.shape) != expected:
            raise ValueError(f"{checkpoint.directory}: weight {name!r} has shape {tuple(value.shape)}, the config "
                             f"implies {expected}")
        flat[path] = from_hf(value, path)
    used = {hf_name(path) for path in shapes} | _verified_tied_head(config, checkpoint, flat)
    unexpected = sorted(name for name in checkpoint.names() - used if not skippable(config, name))
    if unexpected:
        raise ValueError(f"{checkpoint.directory}: {len(unexpected)} weight(s) the model has no place for, e.g. "
                         f"{unexpected[:3]} (transformers-5 names)")
    return flat


def load_hf_llava(path) -> tuple[ModelConfig, dict]:
    """Reads a transformers LlavaForConditionalGeneration or LlavaNextForConditionalGeneration (model.anyres on)
    directory (config.json + safetensors, 4.x or 5.x key layout, sharded or not) -> (ModelConfig, float32 numpy
    params shaped like `init_params(config)`)."""
    path = Path(path)
    config = read_config(path / "config.json", model_config_from_hf)
    flat = read_params(config, Checkpoint(path, llava_name), per_layer_shapes(config))
    return config, as_model_params(flat, config)
