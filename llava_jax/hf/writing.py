"""Writing llava-jax params as a transformers LlavaForConditionalGeneration directory (LlavaNext with anyres).

Public surface: `save_hf_llava(config, params, out_dir)` -> config.json + model.safetensors (transformers-5 names).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llava_jax.config import ModelConfig
from llava_jax.hf.configs import hf_llava_config
from llava_jax.hf.layout import flatten, to_hf, unstack_layers
from llava_jax.hf.names import hf_name


def save_hf_llava(config: ModelConfig, params: dict, out_dir) -> None:
    """Writes config.json + model.safetensors (transformers-5 names) that LlavaForConditionalGeneration loads
    (LlavaNextForConditionalGeneration when model.anyres.enabled)."""
    if config.projector.type != "mlp2x_gelu" or config.projector.pixel_shuffle:
        raise ValueError(f"model.projector: LlavaForConditionalGeneration / LlavaNext only have the mlp2x_gelu "
                         f"projector without pixel shuffle, got {config.projector}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = flatten(unstack_layers(params))
    tensors = {hf_name(path): np.ascontiguousarray(to_hf(value, path, config)) for path, value in flat.items()}
    # HF always builds the vision post-layernorm; it never touches the features, so save it as the identity.
    hidden = config.vision.hidden_size
    tensors["model.vision_tower.post_layernorm.weight"] = np.ones(hidden, np.float32)
    tensors["model.vision_tower.post_layernorm.bias"] = np.zeros(hidden, np.float32)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    with open(out_dir / "config.json", "w") as f:
        json.dump(hf_llava_config(config), f, indent=2)
