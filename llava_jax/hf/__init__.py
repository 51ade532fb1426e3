"""Hugging Face checkpoints <-> llava-jax params, with numpy + safetensors only (torch is never imported).

Public surface: `load_hf_llava(dir)` (Llava, or LlavaNext with model.anyres on) and `load_hf_towers(vision_dir,
language_dir, ...)` -> (ModelConfig, params); `save_hf_llava(config, params, out_dir)`;
`model_config_from_hf(config_json_dict)`; `init_projector` / `init_image_newline`; `hf_name`; `stack_layers` /
`unstack_layers` / `conform_params` (scanned `layers` vs per-layer `layers_N` trees). Modules: names (weight names),
configs (config.json <-> ModelConfig), layout, reading, writing, towers.
"""
from llava_jax.hf.configs import model_config_from_hf
from llava_jax.hf.layout import conform_params, stack_layers, unstack_layers
from llava_jax.hf.names import hf_name
from llava_jax.hf.reading import load_hf_llava
from llava_jax.hf.towers import init_image_newline, init_projector, load_hf_towers
from llava_jax.hf.writing import save_hf_llava

__all__ = ["conform_params", "hf_name", "init_image_newline", "init_projector", "load_hf_llava", "load_hf_towers",
           "model_config_from_hf", "save_hf_llava", "stack_layers", "unstack_layers"]
