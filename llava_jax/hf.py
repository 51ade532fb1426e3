"""Hugging Face checkpoints <-> llava-jax params, with numpy + safetensors only (torch is never imported).

Public surface: `load_hf_llava(dir)` and `load_hf_towers(vision_dir, language_dir, ...)` -> (ModelConfig, params);
`save_hf_llava(config, params, out_dir)`; `model_config_from_hf(config_json_dict)`; `stack_layers` /
`unstack_layers` / `conform_params` move params between the scanned (`layers`, leading layer axis) and per-layer
(`layers_N`) trees. One table, `_MODULE_NAMES`, maps our param paths to transformers-5 names both ways.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llava_jax.config import ModelConfig, config_from_dict
from llava_jax.models.llava import init_params
from llava_jax.models.projector import Projector

# ------------------------------------------------------------------------------------------------ names

# Our per-layer module path -> transformers-5 module name (first match wins; `{i}` is a layer index). A path's
# remaining components are appended with dots and its leaf renamed by `_LEAF_NAMES`.
_MODULE_NAMES = (
    ("vision_tower/patch_embed", "model.vision_tower.embeddings.patch_embedding"),
    ("vision_tower/class_embedding", "model.vision_tower.embeddings.class_embedding"),
    ("vision_tower/position_embedding", "model.vision_tower.embeddings.position_embedding.weight"),
    ("vision_tower/pre_layernorm", "model.vision_tower.pre_layrnorm"),
    ("vision_tower/layers_{i}/self_attn/o_proj", "model.vision_tower.encoder.layers.{i}.self_attn.out_proj"),
    ("vision_tower/layers_{i}", "model.vision_tower.encoder.layers.{i}"),
    ("projector", "model.multi_modal_projector"),
    ("language_model/lm_head", "lm_head"),
    ("language_model/layers_{i}", "model.language_model.layers.{i}"),
    ("language_model", "model.language_model"),
)
_MODULE_PATTERNS = [(re.compile(ours.replace("{i}", r"(?P<i>\d+)") + r"(?:/(?P<rest>.+))?"), theirs)
                    for ours, theirs in _MODULE_NAMES]
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_PATCH_KERNEL = "vision_tower/patch_embed/kernel"

# Other layouts -> the transformers-5 one, applied in order: transformers 4.x (`language_model.model.*`,
# `language_model.lm_head`, un-prefixed towers) and the nested `vision_model.` of CLIP/SigLIP vision models.
_LEGACY_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
)


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
    raise ValueError(f"no Hugging Face name for param {path!r}; add it to llava_jax.hf._MODULE_NAMES")


def _llava_name(raw: str) -> str:
    for old, new in _LEGACY_PREFIXES:
        if raw.startswith(old):
            raw = new + raw[len(old):]
    return raw


def _skippable(config: ModelConfig, name: str) -> bool:
    """HF weights dropped on purpose: vision layers past the feature layer, the vision post-LN and pooling head,
    non-learned buffers, and a tied lm_head."""
    layer = re.fullmatch(r"model\.vision_tower\.encoder\.layers\.(\d+)\..+", name)
    if layer:
        return int(layer[1]) >= config.vision_layers_used
    return (name.startswith(("model.vision_tower.post_layernorm.", "model.vision_tower.head."))
            or name.endswith(("position_ids", "rotary_emb.inv_freq"))
            or (name == "lm_head.weight" and config.decoder.tie_embeddings))


# ----------------------------------------------------------------------------------------- param layouts

_LAYER_KEY = re.compile(r"layers_\d+")


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


def _flatten(tree: Any) -> dict[str, Any]:
    return {"/".join(key.key for key in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat: dict[str, Any]) -> dict:
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
    return {path: leaf.shape for path, leaf in _flatten(abstract).items()}


def conform_params(params: Any, config: ModelConfig) -> Any:
    """Lays `params` out for `config.scan_layers` and checks they are exactly the tree `init_params(config)`
    builds (same names and shapes); raises ValueError naming the first difference."""
    params = stack_layers(params) if config.scan_layers else unstack_layers(params)
    have = {path: tuple(np.shape(leaf)) for path, leaf in _flatten(params).items()}
    want = _param_shapes(config)
    for path in sorted(set(have) | set(want)):
        if have.get(path) != want.get(path):
            raise ValueError(f"param {path!r}: the checkpoint has {have.get(path, 'nothing')}, the model config "
                             f"needs {want.get(path, 'nothing')}; the config describes a different architecture")
    return params


# ------------------------------------------------------------------------------------- tensor conversion

def _from_hf(value: np.ndarray, path: str) -> np.ndarray:
    """HF tensor -> our layout: Linear [out, in] -> kernel [in, out]; patch conv [out, C, kh, kw] -> Dense kernel
    over (kh, kw, C)-flattened patches."""
    value = np.asarray(value, np.float32)
    if path == _PATCH_KERNEL:
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value.T if path.endswith("/kernel") else value


def _to_hf(value: Any, path: str, config: ModelConfig) -> np.ndarray:
    """Inverse of `_from_hf`."""
    value = np.asarray(value, np.float32)
    if path == _PATCH_KERNEL:
        v = config.vision
        return value.reshape(v.patch_size, v.patch_size, v.num_channels, -1).transpose(3, 2, 0, 1)
    return value.T if path.endswith("/kernel") else value


def _hf_shape(shape: tuple, path: str, config: ModelConfig) -> tuple:
    return _to_hf(np.broadcast_to(np.float32(0), shape), path, config).shape


class _Checkpoint:
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

    def read(self, name: str, path: str) -> np.ndarray:
        if name not in self._where:
            raise ValueError(f"{self.directory}: weight {name!r} (transformers-5 name, for param {path!r}) is missing")
        file, raw = self._where[name]
        with safe_open(file, framework="numpy") as f:
            return f.get_tensor(raw)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
    return files


def _read_params(config: ModelConfig, checkpoint: _Checkpoint, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Reads the per-layer params `shapes` lists; every other checkpoint weight must be `_skippable`."""
    flat = {}
    for path, shape in shapes.items():
        name = hf_name(path)
        value = checkpoint.read(name, path)
        expected = _hf_shape(shape, path, config)
        if tuple(value.shape) != expected:
            raise ValueError(f"{checkpoint.directory}: weight {name!r} has shape {tuple(value.shape)}, the config "
                             f"implies {expected}")
        flat[path] = _from_hf(value, path)
    used = {hf_name(path) for path in shapes}
    unexpected = sorted(name for name in checkpoint.names() - used if not _skippable(config, name))
    if unexpected:
        raise ValueError(f"{checkpoint.directory}: {len(unexpected)} weight(s) the model has no place for, e.g. "
                         f"{unexpected[:3]} (transformers-5 names)")
    return flat


def _as_model_params(flat: dict[str, np.ndarray], config: ModelConfig) -> dict:
    params = _unflatten(flat)
    return stack_layers(params) if config.scan_layers else params


def _per_layer_shapes(config: ModelConfig) -> dict[str, tuple]:
    return _param_shapes(dataclasses.replace(config, scan_layers=False))


# ------------------------------------------------------------------------------------------------ configs

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
_FULL_VISION_MODELS = ("clip", "siglip")     # CLIPModel / SiglipModel: the vision tower sits in vision_config
_TEXT_MODELS = ("llama", "mistral", "qwen2")
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}   # ours -> HF
_ACTS_FROM_HF = {**{hf: ours for ours, hf in _HF_ACTS.items()}, "gelu_new": "gelu_tanh"}


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face config / index file)")
    with open(path) as f:
        return json.load(f)


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


def _vision_values(hf: dict, prefix: str) -> dict:
    """An HF CLIP/SigLIP vision config -> our `model.vision` section."""
    model_type, cfg = _with_defaults(hf, prefix + "model_type", _VISION_KINDS)
    if cfg["hidden_act"] not in _ACTS_FROM_HF:
        raise _unsupported(prefix + "hidden_act", cfg["hidden_act"], f"expected one of {list(_ACTS_FROM_HF)}")
    return dict(kind=_VISION_KINDS[model_type], image_size=_square(cfg, "image_size", prefix),
                patch_size=_square(cfg, "patch_size", prefix), num_channels=cfg["num_channels"],
                hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
                act=_ACTS_FROM_HF[cfg["hidden_act"]], layer_norm_eps=float(cfg["layer_norm_eps"]))


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


def _decoder_values(hf: dict, prefix: str) -> dict:
    """An HF LLaMA / Mistral / Qwen2 config -> our `model.decoder` section."""
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


def _validated(values: dict) -> ModelConfig:
    # Model-only validation: no images in the data section, so data.max_length does not constrain the model.
    return config_from_dict({"model": values, "data": {"max_images": 0}}).model


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A transformers LlavaConfig dict -> ModelConfig; anything we cannot reproduce exactly raises ValueError."""
    if hf.get("model_type") != "llava":
        raise _unsupported("model_type", hf.get("model_type"), "expected 'llava' (LlavaForConditionalGeneration)")
    feature_layer = hf.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise _unsupported("vision_feature_layer", feature_layer, "only a single feature layer is implemented")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise _unsupported("projector_hidden_act", hf["projector_hidden_act"], "the projector uses exact gelu")
    if not hf.get("multimodal_projector_bias", True):
        raise _unsupported("multimodal_projector_bias", False, "the projector always has biases")
    decoder = _decoder_values({"model_type": "llama", **(hf.get("text_config") or {})}, "text_config.")
    decoder["tie_embeddings"] |= bool(hf.get("tie_word_embeddings", False))
    return _validated(dict(
        vision=_vision_values({"model_type": "clip_vision_model", **(hf.get("vision_config") or _LLAVA_DEFAULT_VISION)},
                              "vision_config."),
        decoder=decoder, projector=dict(type="mlp2x_gelu"),
        image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default")))


def _read_config(path: Path, parse: Callable[[dict], Any]) -> Any:
    """Parses config.json with `parse`, prefixing its errors with the file."""
    try:
        return parse(_read_json(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _hf_llava_config(config: ModelConfig) -> dict:
    """ModelConfig -> LlavaConfig dict. The vision tower is saved with exactly the layers we build, and the
    features are its last hidden state (vision_feature_layer=-1), which is what our model computes."""
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
    return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", vision_config=vision,
                text_config=text, image_token_index=config.image_token_id, projector_hidden_act="gelu",
                vision_feature_layer=-1, vision_feature_select_strategy=config.vision_feature_select_strategy,
                multimodal_projector_bias=True, tie_word_embeddings=d.tie_embeddings,
                image_seq_length=config.tokens_per_image, dtype="float32")


# --------------------------------------------------------------------------------------------- public API

def load_hf_llava(path) -> tuple[ModelConfig, dict]:
    """Reads a transformers LlavaForConditionalGeneration directory (config.json + safetensors, 4.x or 5.x key
    layout, sharded or not) -> (ModelConfig, float32 numpy params shaped like `init_params(config)`)."""
    path = Path(path)
    config = _read_config(path / "config.json", model_config_from_hf)
    flat = _read_params(config, _Checkpoint(path, _llava_name), _per_layer_shapes(config))
    return config, _as_model_params(flat, config)


def save_hf_llava(config: ModelConfig, params: dict, out_dir) -> None:
    """Writes config.json + model.safetensors (transformers-5 names) that LlavaForConditionalGeneration loads."""
    if config.projector.type != "mlp2x_gelu" or config.projector.pixel_shuffle:
        raise ValueError(f"model.projector: LlavaForConditionalGeneration only has the mlp2x_gelu projector without "
                         f"pixel shuffle, got {config.projector}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = _flatten(unstack_layers(params))
    tensors = {hf_name(path): np.ascontiguousarray(_to_hf(value, path, config)) for path, value in flat.items()}
    # HF always builds the vision post-layernorm; it never touches the features, so save it as the identity.
    hidden = config.vision.hidden_size
    tensors["model.vision_tower.post_layernorm.weight"] = np.ones(hidden, np.float32)
    tensors["model.vision_tower.post_layernorm.bias"] = np.zeros(hidden, np.float32)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    with open(out_dir / "config.json", "w") as f:
        json.dump(_hf_llava_config(config), f, indent=2)


def _vision_tower_name(model_type: str) -> Callable[[str], Optional[str]]:
    """Names in a CLIP/SigLIP vision (or full CLIP/SigLIP) checkpoint -> LLaVA names; text-side weights of a full
    model are ignored."""
    def rename(raw: str) -> Optional[str]:
        if raw.startswith("vision_model."):
            return "model.vision_tower." + raw[len("vision_model."):]
        return None if model_type in _FULL_VISION_MODELS else "model.vision_tower." + raw
    return rename


def _language_model_name(raw: str) -> str:
    return "model.language_model." + raw[len("model."):] if raw.startswith("model.") else raw


def _tower_values(vision_dir: Path, language_dir: Path) -> tuple[str, dict, dict]:
    def vision(hf: dict) -> tuple[str, dict]:
        model_type = hf.get("model_type")
        if model_type in _FULL_VISION_MODELS:
            vision_config = {"model_type": f"{model_type}_vision_model", **(hf.get("vision_config") or {})}
            return model_type, _vision_values(vision_config, "vision_config.")
        return model_type, _vision_values(hf, "")
    model_type, vision_values = _read_config(vision_dir / "config.json", vision)
    decoder_values = _read_config(language_dir / "config.json", lambda hf: _decoder_values(hf, ""))
    return model_type, vision_values, decoder_values


def init_projector(config: ModelConfig, rng: jax.Array) -> dict:
    """Freshly initialised projector params (float32 numpy), as under params["projector"]."""
    features = jnp.zeros((1, config.vision_tokens_per_image, config.vision.hidden_size), jnp.float32)
    params = nn.meta.unbox(Projector(config).init(rng, features)["params"])
    return jax.tree.map(np.asarray, params)


def _append_image_token(flat: dict[str, np.ndarray]) -> None:
    """Grows the vocabulary by one row (embedding and lm_head), initialised to the mean of the existing rows."""
    embedding = flat["language_model/embed_tokens/embedding"]                   # [V, E]
    flat["language_model/embed_tokens/embedding"] = np.concatenate([embedding, embedding.mean(0, keepdims=True)])
    if "language_model/lm_head/kernel" in flat:
        kernel = flat["language_model/lm_head/kernel"]                            # [E, V]
        flat["language_model/lm_head/kernel"] = np.concatenate([kernel, kernel.mean(1, keepdims=True)], axis=1)


def load_hf_towers(vision_dir, language_dir, projector: str = "mlp2x_gelu", image_token_id: Optional[int] = None,
                   vision_feature_layer: int = -2, vision_feature_select_strategy: str = "default",
                   rng: Optional[jax.Array] = None, pixel_shuffle: bool = False) -> tuple[ModelConfig, dict]:
    """A fresh LLaVA from a CLIPVisionModel / SiglipVisionModel (or full CLIP / SigLIP) directory and a
    LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory; the projector is initialised from `rng`.
    With image_token_id=None one token is appended to the vocabulary and becomes the image token."""
    vision_dir, language_dir = Path(vision_dir), Path(language_dir)
    vision_type, vision_values, decoder_values = _tower_values(vision_dir, language_dir)
    vocab_size = decoder_values["vocab_size"]
    if image_token_id is None:
        image_token_id, decoder_values["vocab_size"] = vocab_size, vocab_size + 1
    config = _validated(dict(vision=vision_values, decoder=decoder_values,
                             projector=dict(type=projector, pixel_shuffle=pixel_shuffle),
                             image_token_id=image_token_id, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy))
    checkpoint_config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder,
                                                                                vocab_size=vocab_size))
    shapes = _per_layer_shapes(checkpoint_config)
    flat = {}
    for directory, tower, rename in ((vision_dir, "vision_tower/", _vision_tower_name(vision_type)),
                                     (language_dir, "language_model/", _language_model_name)):
        tower_shapes = {path: shape for path, shape in shapes.items() if path.startswith(tower)}
        flat.update(_read_params(checkpoint_config, _Checkpoint(directory, rename), tower_shapes))
    if config.decoder.vocab_size != vocab_size:
        _append_image_token(flat)
    params = _as_model_params(flat, config)
    params["projector"] = init_projector(config, jax.random.key(0) if rng is None else rng)
    return config, params

