"""Hugging Face config dicts <-> ModelConfig, with transformers' config-class defaults filled in.

Public surface: `model_config_from_hf(llava_config_dict) -> ModelConfig` and `hf_llava_config(config) -> dict`
(LlavaConfig, or LlavaNextConfig with model.anyres.enabled, for export); for stand-alone towers
`vision_values(hf, prefix)` / `decoder_values(hf, prefix)` (our `model.vision` / `model.decoder` sections) and
`validated(model_values) -> ModelConfig`. Anything we cannot reproduce exactly raises ValueError naming the HF key.
"""
from __future__ import annotations

from typing import Any

from llava_jax.anyres_grid import DEFAULT_GRID_PINPOINTS
from llava_jax.config import ModelConfig, config_from_dict
from llava_jax.hf.names import FULL_VISION_MODELS

# transformers' config-class defaults: config.json files only hold values that differ from these.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, layer_types=None),
}
# LlavaConfig's vision tower when config.json has no vision_config (CLIP ViT-L/14 at 336 px).
_LLAVA_DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
_VISION_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_TEXT_MODELS = ("llama", "mistral", "qwen2")
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}   # ours -> HF
_ACTS_FROM_HF = {**{hf: ours for ours, hf in _HF_ACTS.items()}, "gelu_new": "gelu_tanh"}


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{key}={value!r} is not supported: {why}")


def _with_defaults(hf: dict, key: str, choices) -> tuple[str, dict]:
    model_type = hf.get("model_type")
    if model_type not in choices:
        raise _unsupported(key, model_type, f"expected one of {list(choices)}")
    return model_type, {**_HF_DEFAULTS[model_type], **hf}


def _square(cfg: dict, name: str, prefix: str) -> int:
    value = cfg[name]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _unsupported(prefix + name, value, "only square images / patches are supported")
        value = value[0]
    return int(value)


def vision_values(hf: dict, prefix: str) -> dict:
    """An HF CLIP/SigLIP vision config -> our `model.vision` section; `prefix` locates it in error messages."""
    model_type, cfg = _with_defaults(hf, prefix + "model_type", _VISION_KINDS)
    if cfg["hidden_act"] not in _ACTS_FROM_HF:
        raise _unsupported(prefix + "hidden_act", cfg["hidden_act"], f"expected one of {list(_ACTS_FROM_HF)}")
    return dict(kind=_VISION_KINDS[model_type], image_size=_square(cfg, "image_size", prefix),
                patch_size=_square(cfg, "patch_size", prefix), num_channels=cfg["num_channels"],
                hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
                act=_ACTS_FROM_HF[cfg["hidden_act"]], layer_norm_eps=float(cfg["layer_norm_eps"]))


def vision_model_values(hf: dict) -> tuple[str, dict]:
    """The config.json of a CLIPVisionModel / SiglipVisionModel or a full CLIPModel / SiglipModel ->
    (its model_type, our `model.vision` section)."""
    model_type = hf.get("model_type")
    if model_type in FULL_VISION_MODELS:
        vision_config = {"model_type": f"{model_type}_vision_model", **(hf.get("vision_config") or {})}
        return model_type, vision_values(vision_config, "vision_config.")
    return model_type, vision_values(hf, "")


def _rope_theta(cfg: dict, prefix: str) -> float:
    """Plain RoPE only: transformers 5 keeps theta in `rope_parameters`, 4.x in `rope_theta` + `rope_scaling`."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise _unsupported(prefix + key, rope, "RoPE scaling is not implemented; only plain RoPE is")
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _check_full_attention(cfg: dict, model_type: str, prefix: str) -> None:
    """Sliding-window attention is not implemented: refuse configs where it would ever be active."""
    sliding = [kind for kind in cfg.get("layer_types") or [] if kind != "full_attention"]
    if sliding:
        raise _unsupported(prefix + "layer_types", sliding[0], "only full attention is implemented")
    window = cfg.get("sliding_window")
    active = cfg.get("use_sliding_window", True) if model_type == "qwen2" else model_type == "mistral"
    if active and window is not None and window < cfg["max_position_embeddings"]:
        raise _unsupported(prefix + "sliding_window", window,
                           "sliding-window attention is not implemented (set it to null in config.json if you "
                           f"only use sequences of at most {window} tokens)")


def decoder_values(hf: dict, prefix: str) -> dict:
    """An HF LLaMA / Mistral / Qwen2 config -> our `model.decoder` section; `prefix` locates it in errors."""
    model_type, cfg = _with_defaults(hf, prefix + "model_type", _TEXT_MODELS)
    if cfg["hidden_act"] != "silu":
        raise _unsupported(prefix + "hidden_act", cfg["hidden_act"], "the decoder MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise _unsupported(prefix + flag, cfg[flag], "only Qwen2-style q/k/v biases are implemented")
    _check_full_attention(cfg, model_type, prefix)
    return dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                head_dim=cfg["head_dim"], mlp_dim=cfg["intermediate_size"], rope_theta=_rope_theta(cfg, prefix),
                rms_norm_eps=float(cfg["rms_norm_eps"]), qkv_bias=model_type == "qwen2",
                tie_embeddings=bool(cfg["tie_word_embeddings"]),
                max_position_embeddings=cfg["max_position_embeddings"])


def validated(values: dict) -> ModelConfig:
    """Our `model` section -> a validated ModelConfig."""
    # Model-only validation: no images in the data section, so data.max_length does not constrain the model.
    return config_from_dict({"model": values, "data": {"max_images": 0}}).model


def _anyres_values(hf: dict) -> dict:
    """Our `model.anyres` section of a LlavaConfig (off) or LlavaNextConfig (on, with its pinpoints)."""
    if hf["model_type"] == "llava":
        return dict(enabled=False)
    pinpoints = hf.get("image_grid_pinpoints") or DEFAULT_GRID_PINPOINTS
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pinpoints):
        raise _unsupported("image_grid_pinpoints", pinpoints, "expected a list of [height, width] pairs")
    return dict(enabled=True, grid_pinpoints=[[int(side) for side in p] for p in pinpoints])


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A transformers LlavaConfig / LlavaNextConfig dict -> ModelConfig (LlavaNext: model.anyres on); anything we
    cannot reproduce exactly raises ValueError."""
    if hf.get("model_type") not in ("llava", "llava_next"):
        raise _unsupported("model_type", hf.get("model_type"), "expected 'llava' (LlavaForConditionalGeneration) or "
                           "'llava_next' (LlavaNextForConditionalGeneration)")
    feature_layer = hf.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise _unsupported("vision_feature_layer", feature_layer, "only a single feature layer is implemented")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise _unsupported("projector_hidden_act", hf["projector_hidden_act"], "the projector uses exact gelu")
    decoder = decoder_values({"model_type": "llama", **(hf.get("text_config") or {})}, "text_config.")
    top_level_tie = bool(hf.get("tie_word_embeddings", False))
    # LlavaConfig promotes text_config.tie_word_embeddings; LlavaNext (transformers 5) ties by the top-level flag only
    decoder["tie_embeddings"] = top_level_tie or (decoder["tie_embeddings"] and hf["model_type"] == "llava")
    vision = {"model_type": "clip_vision_model", **(hf.get("vision_config") or _LLAVA_DEFAULT_VISION)}
    return validated(dict(
        vision=vision_values(vision, "vision_config."), decoder=decoder,
        projector=dict(type="mlp2x_gelu", bias=bool(hf.get("multimodal_projector_bias", True))),
        image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        anyres=_anyres_values(hf)))


def hf_llava_config(config: ModelConfig) -> dict:
    """ModelConfig -> LlavaConfig dict (LlavaNextConfig with model.anyres.enabled). The vision tower is saved with
    exactly the layers we build, and the features are its last hidden state (vision_feature_layer=-1), which is
    what our model computes."""
    v, d = config.vision, config.decoder
    vision = dict(model_type=f"{v.kind}_vision_model", hidden_size=v.hidden_size, intermediate_size=v.mlp_dim,
                  num_hidden_layers=config.vision_layers_used, num_attention_heads=v.num_heads,
                  num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=_HF_ACTS[v.act], layer_norm_eps=v.layer_norm_eps)
    if v.kind == "siglip":
        vision["vision_use_head"] = False
    text = dict(model_type="qwen2" if d.qkv_bias else "llama", vocab_size=d.vocab_size, hidden_size=d.hidden_size,
                intermediate_size=d.mlp_dim, num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim, hidden_act="silu",
                rms_norm_eps=d.rms_norm_eps, max_position_embeddings=d.max_position_embeddings,
                tie_word_embeddings=d.tie_embeddings, rope_theta=d.rope_theta,
                rope_parameters=dict(rope_type="default", rope_theta=d.rope_theta))
    hf = dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", vision_config=vision,
              text_config=text, image_token_index=config.image_token_id, projector_hidden_act="gelu",
              vision_feature_layer=-1, vision_feature_select_strategy=config.vision_feature_select_strategy,
              multimodal_projector_bias=config.projector.bias, tie_word_embeddings=d.tie_embeddings,
              image_seq_length=config.tokens_per_image, dtype="float32")
    if config.anyres.enabled:
        hf.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                  image_grid_pinpoints=[list(p) for p in config.anyres.grid_pinpoints])
    return hf
