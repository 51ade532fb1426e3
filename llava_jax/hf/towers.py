"""A fresh LLaVA (stage-1 start) from a stand-alone vision tower and a stand-alone language model.

Public surface: `load_hf_towers(vision_dir, language_dir, ...) -> (ModelConfig, params)`, whose vocabulary is
grown the way llava-1.5-*-hf's is (image token, room for a pad token, padded to a multiple of 64; `grid_pinpoints`
makes it a LLaVA-NeXT anyres model), `init_projector(config, rng)` (freshly initialised projector params) and
`init_image_newline(config, rng)`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import ModelConfig
from llava_jax.hf.configs import decoder_values, validated, vision_model_values
from llava_jax.hf.layout import as_model_params, per_layer_shapes
from llava_jax.hf.names import EMBEDDING_PATH, HEAD_PATH, language_model_name, vision_tower_name
from llava_jax.hf.reading import Checkpoint, read_config, read_params
from llava_jax.models.projector import Projector

# llava-1.5-7b-hf: LLaMA's 32000 tokens + <image> (32000) + <pad> (32001), padded to 32064 = 501 * 64.
_NEW_TOKENS = 2
_VOCAB_MULTIPLE = 64


def init_projector(config: ModelConfig, rng: jax.Array) -> dict:
    """Freshly initialised projector params (float32 numpy), as under params["projector"]."""
    features = jnp.zeros((1, config.vision_tokens_per_image, config.vision.hidden_size), jnp.float32)
    params = nn.meta.unbox(Projector(config).init(rng, features)["params"])
    return jax.tree.map(np.asarray, params)


def init_image_newline(config: ModelConfig, rng: jax.Array) -> np.ndarray:
    """A fresh anyres `image_newline` [E] (float32 numpy), randn / sqrt(E) as transformers' LlavaNextModel."""
    embed = config.decoder.hidden_size
    return np.asarray(jax.random.normal(rng, (embed,), jnp.float32) * embed ** -0.5)


def _vocabulary(language_dir: Path, original: int, vocab_size: Optional[int], image_token_id: Optional[int],
                min_vocab_size: int) -> tuple[int, int]:
    """(vocab_size, image_token_id) of the LLaVA built on a language model with `original` tokens; see
    `load_hf_towers` for the rules. Errors name the argument."""
    if vocab_size is None:
        vocab_size = -(-max(original + _NEW_TOKENS, min_vocab_size) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    elif vocab_size < max(original, min_vocab_size):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the vocabulary of the language model in "
                         f"{language_dir} ({original} tokens) or the tokenizer's {min_vocab_size} ids; the "
                         "vocabulary can only grow")
    if image_token_id is None:
        if vocab_size == original:
            raise ValueError(f"image_token_id: not given, and vocab_size={vocab_size} adds no token to the "
                             f"{original} of the language model in {language_dir}; pass the id of an existing "
                             "token to use for images, or a larger vocab_size")
        image_token_id = original
    elif not 0 <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id={image_token_id} is outside the vocabulary [0, {vocab_size}) "
                         f"(vocab_size={vocab_size}; the language model in {language_dir} has {original} tokens)")
    return vocab_size, image_token_id


def _grow_vocabulary(flat: dict[str, np.ndarray], vocab_size: int) -> None:
    """Appends rows to the embedding table (and columns to an untied lm_head) up to `vocab_size`, each
    initialised to the mean of the existing ones."""
    embedding = flat[EMBEDDING_PATH]                                               # [V, E]
    new_tokens = vocab_size - embedding.shape[0]
    if new_tokens == 0:
        return
    flat[EMBEDDING_PATH] = np.concatenate([embedding, np.repeat(embedding.mean(0, keepdims=True), new_tokens, 0)])
    if HEAD_PATH in flat:
        kernel = flat[HEAD_PATH]                                                   # [E, V]
        flat[HEAD_PATH] = np.concatenate([kernel, np.repeat(kernel.mean(1, keepdims=True), new_tokens, 1)], axis=1)


def load_hf_towers(vision_dir, language_dir, projector: str = "mlp2x_gelu", image_token_id: Optional[int] = None,
                   vocab_size: Optional[int] = None, vision_feature_layer: int = -2,
                   vision_feature_select_strategy: str = "default", rng: Optional[jax.Array] = None,
                   pixel_shuffle: bool = False, min_vocab_size: int = 0,
                   grid_pinpoints: Optional[Sequence[Sequence[int]]] = None) -> tuple[ModelConfig, dict]:
    """A fresh LLaVA from a CLIPVisionModel / SiglipVisionModel (or full CLIP / SigLIP) directory and a
    LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory; the projector is initialised from `rng`.

    The language model's vocabulary of V tokens grows to `vocab_size` (default: V + 2 rounded up to a multiple
    of 64, room for an image and a pad token, as in llava-1.5-7b-hf: 32000 -> 32064; at least `min_vocab_size`,
    the ids of the tokenizer that goes with it; an explicit value must be >= both). New embedding rows (and untied
    lm_head columns) are the mean of the existing ones. `image_token_id` defaults to V, the first new token; an
    explicit one must lie in [0, vocab_size). `grid_pinpoints` ((height, width) pairs): model.anyres on with them,
    and a fresh `image_newline` (LLaVA-NeXT).
    """
    vision_dir, language_dir = Path(vision_dir), Path(language_dir)
    vision_type, vision_values = read_config(vision_dir / "config.json", vision_model_values)
    decoder = read_config(language_dir / "config.json", lambda hf: decoder_values(hf, ""))
    original_vocab_size = decoder["vocab_size"]
    decoder["vocab_size"], image_token_id = _vocabulary(language_dir, original_vocab_size, vocab_size,
                                                        image_token_id, min_vocab_size)
    anyres = (dict(enabled=False) if grid_pinpoints is None
              else dict(enabled=True, grid_pinpoints=[[int(side) for side in p] for p in grid_pinpoints]))
    config = validated(dict(vision=vision_values, decoder=decoder,
                            projector=dict(type=projector, pixel_shuffle=pixel_shuffle),
                            image_token_id=image_token_id, vision_feature_layer=vision_feature_layer,
                            vision_feature_select_strategy=vision_feature_select_strategy,
                            anyres=anyres))
    checkpoint_config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder,
                                                                                vocab_size=original_vocab_size))
    shapes = per_layer_shapes(checkpoint_config)
    flat = {}
    for directory, tower, rename in ((vision_dir, "vision_tower/", vision_tower_name(vision_type)),
                                     (language_dir, "language_model/", language_model_name)):
        tower_shapes = {path: shape for path, shape in shapes.items() if path.startswith(tower)}
        flat.update(read_params(checkpoint_config, Checkpoint(directory, rename), tower_shapes))
    _grow_vocabulary(flat, config.decoder.vocab_size)
    params = as_model_params(flat, config)
    rng = jax.random.key(0) if rng is None else rng
    if grid_pinpoints is None:
        params["projector"] = init_projector(config, rng)
    else:
        projector_rng, newline_rng = jax.random.split(rng)
        params["projector"] = init_projector(config, projector_rng)
        params["image_newline"] = init_image_newline(config, newline_rng)
    return config, params
