"""Weight names: our param paths <-> transformers-5 LLaVA names, and the renames that bring other layouts to them.

Public surface: `hf_name(path)` (our per-layer param path -> transformers-5 name, from the one table
`MODULE_NAMES`); `llava_name(raw)` (transformers-4.x LLaVA names -> 5.x); `vision_tower_name(model_type)` and
`language_model_name(raw)` (stand-alone tower checkpoints -> LLaVA names); `skippable(config, name)` (checkpoint
weights dropped on purpose); `HEAD_NAME` / `EMBEDDING_NAME` (the output layer and the embedding table).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from llava_jax.config import ModelConfig

# Our per-layer module path -> transformers-5 module name (first match wins; `{i}` is a layer index). A path's
# remaining components are appended with dots and its leaf renamed by `_LEAF_NAMES`.
MODULE_NAMES = (
    ("vision_tower/patch_embed", "model.vision_tower.embeddings.patch_embedding"),
    ("vision_tower/class_embedding", "model.vision_tower.embeddings.class_embedding"),
    ("vision_tower/position_embedding", "model.vision_tower.embeddings.position_embedding.weight"),
    ("vision_tower/pre_layernorm", "model.vision_tower.pre_layrnorm"),
    ("vision_tower/layers_{i}/self_attn/o_proj", "model.vision_tower.encoder.layers.{i}.self_attn.out_proj"),
    ("vision_tower/layers_{i}", "model.vision_tower.encoder.layers.{i}"),
    ("projector", "model.multi_modal_projector"),
    ("image_newline", "model.image_newline"),
    ("language_model/lm_head", "lm_head"),
    ("language_model/layers_{i}", "model.language_model.layers.{i}"),
    ("language_model", "model.language_model"),
)
_MODULE_PATTERNS = [(re.compile(ours.replace("{i}", r"(?P<i>\d+)") + r"(?:/(?P<rest>.+))?"), theirs)
                    for ours, theirs in MODULE_NAMES]
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Other layouts -> the transformers-5 one, applied in order: transformers 4.x (`language_model.model.*`,
# `language_model.lm_head`, un-prefixed towers, LlavaNext's `image_newline`) and the nested `vision_model.` of
# CLIP/SigLIP vision models.
_LEGACY_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
)

# Full CLIPModel / SiglipModel checkpoints: the vision tower sits under `vision_model.`, next to a text tower.
FULL_VISION_MODELS = ("clip", "siglip")


def hf_name(path: str) -> str:
    """Our per-layer param path ("language_model/layers_0/mlp/up_proj/kernel") -> its transformers-5 name."""
    for pattern, theirs in _MODULE_PATTERNS:
        match = pattern.fullmatch(path)
        if match:
            name = theirs.format(i=match["i"]) if "{i}" in theirs else theirs
            if match["rest"] is None:
                return name
            *modules, leaf = match["rest"].split("/")
            return ".".join([name, *modules, _LEAF_NAMES[leaf]])
    raise ValueError(f"no Hugging Face name for param {path!r}; add it to llava_jax.hf.names.MODULE_NAMES")


HEAD_PATH, EMBEDDING_PATH = "language_model/lm_head/kernel", "language_model/embed_tokens/embedding"
HEAD_NAME, EMBEDDING_NAME = hf_name(HEAD_PATH), hf_name(EMBEDDING_PATH)


def llava_name(raw: str) -> str:
    """A LlavaForConditionalGeneration weight name of any supported layout -> its transformers-5 name."""
    for old, new in _LEGACY_PREFIXES:
        if raw.startswith(old):
            raw = new + raw[len(old):]
    return raw


def vision_tower_name(model_type: str) -> Callable[[str], Optional[str]]:
    """Names in a CLIP/SigLIP vision (or full CLIP/SigLIP) checkpoint -> LLaVA names; text-side weights of a full
    model map to None (ignored)."""
    def rename(raw: str) -> Optional[str]:
        if raw.startswith("vision_model."):
            return "model.vision_tower." + raw[len("vision_model."):]
        return None if model_type in FULL_VISION_MODELS else "model.vision_tower." + raw
    return rename


def language_model_name(raw: str) -> str:
    """Names in a LlamaForCausalLM-style checkpoint (`model.*`, `lm_head.*`) -> LLaVA names."""
    return "model.language_model." + raw[len("model."):] if raw.startswith("model.") else raw


def skippable(config: ModelConfig, name: str) -> bool:
    """HF weights dropped on purpose: vision layers past the feature layer, the vision post-LN and pooling head,
    and non-learned buffers. (A tied model's stored lm_head copy is checked, not skipped: see reading.py.)"""
    layer = re.fullmatch(r"model\.vision_tower\.encoder\.layers\.(\d+)\..+", name)
    if layer:
        return int(layer[1]) >= config.vision_layers_used
    return (name.startswith(("model.vision_tower.post_layernorm.", "model.vision_tower.head."))
            or name.endswith(("position_ids", "rotary_emb.inv_freq")))
