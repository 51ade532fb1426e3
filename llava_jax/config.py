"""Typed run configuration: the single source of truth for defaults.

Public surface: `Config` (model / data / train / mesh / checkpoint sections), `load_config(path, overrides)`,
`config_from_dict`, `config_to_dict`, `config_to_yaml`, `save_config`, `ConfigError` (a ValueError). YAML files
and `key=value` overrides only override dataclass defaults; every value is type-checked and cross-checked, and
errors name the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from llava_jax.anyres_grid import DEFAULT_GRID_PINPOINTS, check_pinpoints, max_crops, max_tokens


@dataclass
class VisionConfig:
    """ViT tower. `kind` fixes the architecture (CLIP: class token, pre-LN, patch conv without bias; SigLIP: none
    of these); `act` and `layer_norm_eps` default to the kind's values when left empty."""
    kind: Literal["clip", "siglip"] = "clip"
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    act: Optional[Literal["quick_gelu", "gelu", "gelu_tanh"]] = None
    layer_norm_eps: Optional[float] = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.kind == "clip"


@dataclass
class ProjectorConfig:
    """`linear` or `mlpNx_gelu` (N linear layers, exact GELU between them); optional 2x2 pixel shuffle first;
    `bias=false` drops the linear layers' biases (transformers' multimodal_projector_bias)."""
    type: str = "mlp2x_gelu"
    pixel_shuffle: bool = False
    bias: bool = True

    @property
    def num_linear(self) -> int:
        if self.type == "linear":
            return 1
        return int(self.type[len("mlp"):-len("x_gelu")])


@dataclass
class DecoderConfig:
    """LLaMA-family decoder (LLaMA / Vicuna / Mistral / Qwen2)."""
    vocab_size: int = 32064
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096


@dataclass
class AnyresConfig:
    """LLaVA-NeXT "anyres": each image is a base crop plus the tiles of its best (height, width) pinpoint (all
    multiples of model.vision.image_size), and the model learns an `image_newline` vector (llava_jax/data/anyres.py).
    `max_crops`: the crop axis of pixel_values (null = 1 + the most tiles a pinpoint has; smaller is refused)."""
    enabled: bool = False
    grid_pinpoints: list[list[int]] = field(default_factory=lambda: [list(p) for p in DEFAULT_GRID_PINPOINTS])
    max_crops: Optional[int] = None


# kernels LoRA can adapt: attention q/k/v/o (both towers), the decoder's gated MLP, the vision MLP
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


@dataclass
class LoraConfig:
    """`train.lora`: low-rank adapters on the chosen kernels (LLaVA's finetune_lora.sh; PEFT's LoraConfig)."""
    rank: int = 0                     # 0: no LoRA
    alpha: float = 16.0               # the update is (alpha / rank) x B A
    dropout: float = 0.0              # on the adapter's input, training only
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    vision: bool = False              # adapters in the vision tower too (its q/k/v/out_proj, fc1/fc2 by name)
    learning_rate: Optional[float] = None    # null: train.learning_rate

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    anyres: AnyresConfig = field(default_factory=AnyresConfig)
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"   # kernel: models/attention.py; auto: runtime.py
    # which dim of the row-parallel kernels (o_proj, down_proj, fc2: [heads or mlp, embed]) fsdp shards: "embed", as
    # every other kernel, or "input", which keeps embed whole as their minor dim: where embed / fsdp is not a multiple
    # of 128 (5120 / 16 = 320) XLA:TPU then neither pads the shards to 384 lanes nor relayouts weights, gradients
    # and Adam moments around the update (13B stage 2 on 16 chips: 18.6 -> 16.1 GiB; sharding.LOGICAL_RULES)
    fsdp_row_kernels: Literal["embed", "input"] = "embed"
    # train.lora, which the model needs to build its adapters; set from it, never read from or written to YAML
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"derived": True})

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers actually run: hidden_states[k] is the output after k layers (index 0 = embeddings)."""
        return self.vision_feature_layer % (self.vision.num_layers + 1)

    @property
    def vision_tokens_per_image(self) -> int:
        """Tokens the tower hands to the projector ("default" drops the first token, as transformers does)."""
        tokens = self.vision.num_patches + int(self.vision.has_class_token)
        return tokens - 1 if self.vision_feature_select_strategy == "default" else tokens

    @property
    def tokens_per_image(self) -> int:
        """Image tokens per image in the LLM sequence (after the projector)."""
        tokens = self.vision_tokens_per_image
        return tokens // 4 if self.projector.pixel_shuffle else tokens

    @property
    def crops_per_image(self) -> int:
        """The crop axis of anyres pixel_values [B, I, crops, S, S, 3]: model.anyres.max_crops, or 1 + the most
        tiles a pinpoint has; 1 without anyres."""
        if not self.anyres.enabled:
            return 1
        return self.anyres.max_crops or max_crops(self.anyres.grid_pinpoints, self.vision.image_size)

    @property
    def max_tokens_per_image(self) -> int:
        """The most LLM tokens one image can take: tokens_per_image, or with anyres the base crop + the largest
        grid with its newlines (2928 for the default pinpoints at 336 / 14)."""
        if not self.anyres.enabled:
            return self.tokens_per_image
        side = self.vision.image_size // self.vision.patch_size
        return max_tokens(self.anyres.grid_pinpoints, self.vision.image_size, side)


@dataclass
class EvalTask:
    """One benchmark task of `train.eval_tasks` (llava_jax.tasks), run every train.eval_every steps."""
    task: Literal["vqav2", "gqa", "textvqa", "pope", "mme", "scienceqa", "mmmu", "mmbench"] = "pope"
    data: str = ""                          # the task's files (llava_jax/tasks/<task>.py says which)
    limit: Optional[int] = 200              # the first N items (null: all)
    prompt_suffix: Optional[str] = None     # null: the task's LLaVA-1.5 instruction
    batch_size: int = 32
    max_new_tokens: int = 32


@dataclass
class MixtureEntry:
    """One weighted source of `data.mixture`; tfds entries share the data-level tfds_* split/key settings."""
    source: Literal["synthetic", "llava_json", "tfds", "arrayrecord"] = "synthetic"
    weight: float = 1.0
    json_path: Optional[str] = None
    image_root: Optional[str] = None
    tfds_name: Optional[str] = None
    arrayrecord_path: Optional[str] = None


@dataclass
class DataConfig:
    source: Literal["synthetic", "llava_json", "tfds", "arrayrecord", "mixture"] = "synthetic"
    json_path: Optional[str] = None
    image_root: Optional[str] = None
    eval_json_path: Optional[str] = None
    # `python -m llava_jax.data.to_arrayrecord` output: a directory of *.array_record shards (local, gs:// or gcsfuse)
    arrayrecord_path: Optional[str] = None
    eval_arrayrecord_path: Optional[str] = None
    tfds_name: Optional[str] = None
    tfds_data_dir: Optional[str] = None
    tfds_split: str = "train"
    tfds_eval_split: str = "test"
    tfds_image_key: str = "image"
    tfds_question_key: Optional[str] = "question"   # null: caption data (the prompt is the image alone)
    tfds_answer_key: str = "answer"                  # a text, or a list of reference answers
    mixture: list[MixtureEntry] = field(default_factory=list)
    synthetic_size: int = 20000
    synthetic_eval_size: int = 500
    synthetic_seed: int = 0                          # fixes the synthetic scenes (independent of train.seed)
    # only questions of these kinds (null: all of color, shape, count, position), e.g. to hold one kind out
    synthetic_question_kinds: Optional[list[Literal["color", "shape", "count", "position"]]] = None
    tokenizer: str = "byte"                          # "byte", an HF tokenizer directory, a tokenizer.json or a *.model
    bos_token: Optional[str] = None                  # special-token strings; null = looked up in the tokenizer
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None                  # null and absent from the tokenizer: eos is used
    template: Literal["plain", "vicuna_v1", "mistral_instruct", "chatml", "llama3", "tokenizer"] = "plain"
    system_prompt: Optional[str] = None              # replaces the template's default system message
    image_placement: Literal["keep", "front"] = "keep"   # front: "<image>\n" + text, as LLaVA-1.5 preprocesses
    max_length: int = 2048     # tokens per row
    # tokens per sample (null: max_length): packed rows longer than one sample (positions restart at 0 per sample,
    # so RoPE never goes past it); LLaVA-NeXT's ~2400-token anyres samples fill 8192-token rows, not 4096-token ones
    max_sample_length: Optional[int] = None
    max_images: int = 1        # image slots per row
    # model.anyres: a sample with several images gives each its base crop alone (1 crop: tokens_per_image tokens and
    # one image_newline), as LLaVA-OneVision does, or the full anyres crops; a record's "image_mode" overrides it
    anyres_multi_image: Literal["base", "anyres"] = "base"
    pack: Union[bool, Literal["auto"]] = False     # auto: pack when the attention kernel takes segments
    image_aspect: Literal["pad", "resize", "center_crop"] = "pad"
    image_mean: Optional[tuple[float, float, float]] = None
    image_std: Optional[tuple[float, float, float]] = None
    num_threads: int = 2
    num_workers: int = 0
    prefetch: int = 2
    bad_sample_policy: Literal["skip", "error"] = "skip"
    max_bad_fraction: float = 0.01
    bad_fraction_min_samples: int = 1000             # the bad fraction is checked once this many were seen

    @property
    def sample_length(self) -> int:
        """The most tokens one sample may take: data.max_sample_length, or a whole row."""
        return self.max_sample_length or self.max_length


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    min_learning_rate_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0   # global-norm clipping threshold (0 = no clipping, Megatron's --clip-grad 0)
    optimizer_state_dtype: Literal["float32", "bfloat16"] = "float32"   # Adam moments' storage (train/adamw.py)
    projector_learning_rate: Optional[float] = None
    vision_learning_rate: Optional[float] = None
    language_learning_rate: Optional[float] = None
    stage: Literal["pretrain", "finetune", "full"] = "finetune"
    freeze: Optional[list[Literal["vision", "projector", "language"]]] = None
    grad_accum_steps: int = 1
    micro_batch_size: Optional[int] = None   # per data-parallel replica (Megatron); sets grad_accum_steps
    # with grad accumulation, model.remat=full and scanned stacks: layer-stack weight gradients are added into the
    # accumulator by the backward pass itself (one gradient buffer, not two; models/accumulate.py)
    accumulate_in_place: bool = True
    max_bad_steps: int = 5
    loss_chunk_size: int = 512   # positions per fused loss chunk; chunks without targets are skipped (0 = one chunk)
    # loss chunks gather the hidden states over the batch and shard the logits over the vocabulary instead of
    # gathering the whole LM-head kernel (when the batch shards divide the vocabulary; train/step.py)
    loss_vocab_parallel: bool = True
    log_every: int = 10
    eval_every: int = 0
    eval_limit: int = 200
    # benchmark tasks scored every eval_every steps into metrics.jsonl / TensorBoard as eval/<task>/<score>, their
    # predictions kept in <workdir>/eval/<task>/step_<n>; with tasks, the eval set runs only where there is one
    eval_tasks: list[EvalTask] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # frozen params (no gradient, no optimizer state) kept in this dtype: bfloat16 halves their memory
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    init_from: Optional[str] = None


@dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    keep_every: Optional[int] = None
    async_save: bool = True
    load_dir: Optional[str] = None   # resume from this run's checkpoints when the workdir has none (Megatron --load)
    dir: Optional[str] = None        # where this run's checkpoints go (default WORKDIR/checkpoints); may be gs://...


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


# --------------------------------------------------------------------------------------------- dict <-> dataclass

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against annotation `tp` and returns it in canonical form; raises ValueError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        items = [_coerce(v, args[0] if origin is list or args[-1] is Ellipsis else args[i], f"{key}[{i}]")
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _parse_float(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{key}: unsupported type {_type_name(tp)}")


def _parse_float(text: str, key: str) -> float:
    """YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it obviously is."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key}: expected a number, got {text!r}") from None


def _unknown_key_error(cls: type, name: str, prefix: str) -> ValueError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"unknown config key '{_join(prefix, name)}'{hint}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _derived(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("derived"))


def _from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not _derived(f)}
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise _unknown_key_error(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], _join(prefix, name))
    return cls(**kwargs)


def config_from_dict(values: dict) -> Config:
    config = _from_dict(Config, values or {})
    config.model.lora = config.train.lora
    validate(config)
    return config


def config_to_dict(config: Any) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if not _derived(f)}
        return value
    return plain(config)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: Config, path: str) -> None:
    with open(path, "w") as f:
        f.write(config_to_yaml(config))


# ------------------------------------------------------------------------------------------------- overrides

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Applies dotted `key=value` overrides to a nested dict, checking each key against the dataclass schema."""
    for item in overrides:
        path, value = _parse_override(item)
        cls: Any = Config
        node = values
        for depth, name in enumerate(path):
            prefix = ".".join(path[:depth])
            if not dataclasses.is_dataclass(cls) or name not in {f.name for f in dataclasses.fields(cls)}:
                if not dataclasses.is_dataclass(cls):
                    raise ValueError(f"unknown config key '{'.'.join(path)}': '{prefix}' is not a section")
                raise _unknown_key_error(cls, name, prefix)
            if depth == len(path) - 1:
                node[name] = value
            else:
                cls = typing.get_type_hints(cls)[name]
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ValueError(f"config key '{'.'.join(path[:depth + 1])}' is not a section")
    return values


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Loads YAML at `path` (None = defaults only), applies `overrides` like "model.decoder.num_layers=4"."""
    values: dict = {}
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections, got {type(values).__name__}")
    values = apply_overrides(values, overrides)
    try:
        return config_from_dict(values)
    except ValueError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


# ------------------------------------------------------------------------------------------------ validation

# Splash attention tiles sequences in blocks of this many tokens (a multiple of the TPU's 128 lanes).
SPLASH_BLOCK = 128
_VISION_DEFAULTS = {"clip": ("quick_gelu", 1e-5), "siglip": ("gelu_tanh", 1e-6)}


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


def _validate_model(m: ModelConfig) -> None:
    v, d, p = m.vision, m.decoder, m.projector
    default_act, default_eps = _VISION_DEFAULTS[v.kind]
    v.act = v.act or default_act
    v.layer_norm_eps = v.layer_norm_eps if v.layer_norm_eps is not None else default_eps
    d.num_kv_heads = d.num_kv_heads or d.num_heads
    for section, obj in (("model.vision", v), ("model.decoder", d)):
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim"):
            _require(getattr(obj, name) > 0, f"{section}.{name}", "must be positive")
    _require(v.image_size % v.patch_size == 0, "model.vision.image_size",
             f"{v.image_size} is not divisible by model.vision.patch_size={v.patch_size}")
    _require(v.hidden_size % v.num_heads == 0, "model.vision.hidden_size",
             f"{v.hidden_size} is not divisible by model.vision.num_heads={v.num_heads}")
    if d.head_dim is None:
        _require(d.hidden_size % d.num_heads == 0, "model.decoder.hidden_size",
                 f"{d.hidden_size} is not divisible by model.decoder.num_heads={d.num_heads} (or set head_dim)")
        d.head_dim = d.hidden_size // d.num_heads
    _require(d.head_dim % 2 == 0, "model.decoder.head_dim", f"{d.head_dim} must be even for RoPE")
    _require(d.num_heads % d.num_kv_heads == 0, "model.decoder.num_kv_heads",
             f"{d.num_kv_heads} does not divide model.decoder.num_heads={d.num_heads}")
    _require(0 <= m.image_token_id < d.vocab_size, "model.image_token_id",
             f"{m.image_token_id} is outside the vocabulary [0, {d.vocab_size})")
    _require(-(v.num_layers + 1) <= m.vision_feature_layer <= v.num_layers, "model.vision_feature_layer",
             f"{m.vision_feature_layer} is outside [-{v.num_layers + 1}, {v.num_layers}]")
    _require(m.vision_layers_used >= 1, "model.vision_feature_layer",
             "selects the embeddings (no encoder layer); pick a layer index >= 1 or a negative index")
    valid_projector = p.type == "linear" or (p.type.startswith("mlp") and p.type.endswith("x_gelu")
                                             and p.type[3:-6].isdigit() and int(p.type[3:-6]) >= 1)
    _require(valid_projector, "model.projector.type", f"{p.type!r} is not 'linear' or 'mlpNx_gelu' (e.g. mlp2x_gelu)")
    if p.pixel_shuffle:
        tokens = m.vision_tokens_per_image
        side = int(round(tokens ** 0.5))
        _require(side * side == tokens and side % 2 == 0, "model.projector.pixel_shuffle",
                 f"needs an even square grid of vision tokens, got {tokens} (with a class token use "
                 "vision_feature_select_strategy=default on CLIP)")
    if m.anyres.enabled:
        _validate_anyres(m)


def _validate_anyres(m: ModelConfig) -> None:
    a, v = m.anyres, m.vision
    try:
        check_pinpoints(a.grid_pinpoints, v.image_size)
    except ValueError as e:
        raise ValueError(f"model.anyres.grid_pinpoints: {e}") from None
    _require(not m.projector.pixel_shuffle, "model.projector.pixel_shuffle",
             "is not supported with model.anyres.enabled=true (LLaVA-NeXT lays out each crop's full feature grid)")
    side = v.image_size // v.patch_size
    _require(m.vision_tokens_per_image == side * side, "model.vision_feature_select_strategy",
             f"{m.vision_feature_select_strategy!r} hands the projector {m.vision_tokens_per_image} tokens per crop, "
             f"anyres needs the {side}x{side} patch grid: use 'default' with CLIP, 'full' with SigLIP")
    least = max_crops(a.grid_pinpoints, v.image_size)
    _require(a.max_crops is None or a.max_crops >= least, "model.anyres.max_crops",
             f"{a.max_crops} is below {least}, the base crop + the most tiles of model.anyres.grid_pinpoints "
             "(null picks it)")


def kernel_problems(kernel: str, dtype: str, head_dims: dict[str, int], packed: bool,
                    length: Optional[int] = None) -> list[tuple[str, str]]:
    """(key, why) for each limit of attention `kernel` (llava_jax/models/attention.py) these settings break:
    compute `dtype`, `head_dims` (name -> dim, both towers), `packed` rows, sequence `length` (None: unchecked).
    The one statement of the kernels' limits: config validation refuses them, `runtime.choose_kernel` avoids them."""
    problems = []
    if kernel == "cudnn":
        if packed:
            problems.append(("model.attention", "cudnn receives padding as per-row lengths (no segment ids) and "
                             "cannot mask packed segments (data.pack=true): packed rows need xla or splash; set "
                             "data.pack=false or use model.attention=xla or splash"))
        if dtype == "float32":
            problems.append(("model.attention", "cudnn flash attention runs in bfloat16/float16 compute; set "
                             "model.dtype=bfloat16"))
        problems += [("model.attention", f"cudnn needs head dims that are multiples of 8 up to 256 (128 before "
                      f"Hopper); {key} = {dim}") for key, dim in head_dims.items() if dim % 8 or dim > 256]
    if kernel == "splash":
        problems += [("model.attention", f"splash needs head dims of 64 or a multiple of 128; {key} = {dim}")
                     for key, dim in head_dims.items() if dim != 64 and dim % 128]
        if length is not None and length % SPLASH_BLOCK:
            problems.append(("data.max_length", f"{length} must be a multiple of {SPLASH_BLOCK} with "
                             f"model.attention=splash (its block size), e.g. "
                             f"{-(-length // SPLASH_BLOCK) * SPLASH_BLOCK}"))
    return problems


def attention_head_dims(m: ModelConfig) -> dict[str, int]:
    """Both towers' attention head dims, by the config keys that set them."""
    return {"model.decoder.head_dim": m.decoder.head_dim,
            "model.vision.hidden_size / num_heads": m.vision.hidden_size // m.vision.num_heads}


def _validate_attention(c: Config) -> None:
    """The limits of the kernel `model.attention` names, for both towers (`kernel_problems`)."""
    m = c.model
    problems = kernel_problems(m.attention, m.dtype, attention_head_dims(m), c.data.pack is True, c.data.max_length)
    for key, why in problems:
        _require(False, key, why)


def _validate_train(c: Config) -> None:
    t = c.train
    for name in ("steps", "batch_size", "grad_accum_steps", "log_every", "max_bad_steps"):
        _require(getattr(t, name) > 0, f"train.{name}", "must be positive")
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(t.loss_chunk_size >= 0, "train.loss_chunk_size", "must be >= 0 (0 = no chunking)")
    _require(t.learning_rate > 0, "train.learning_rate", "must be positive")
    _require(t.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0 (0 = no clipping)")
    _require(t.batch_size % t.grad_accum_steps == 0, "train.batch_size",
             f"{t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")
    _require(0.0 <= t.min_learning_rate_ratio <= 1.0, "train.min_learning_rate_ratio", "must be in [0, 1]")
    lora = t.lora
    _require(lora.rank >= 0, "train.lora.rank", "must be >= 0 (0 = no LoRA)")
    if lora.enabled:
        _require(lora.alpha > 0, "train.lora.alpha", "must be positive")
        _require(0.0 <= lora.dropout < 1.0, "train.lora.dropout", "must be in [0, 1)")
        unknown = sorted(set(lora.targets) - set(LORA_TARGETS))
        _require(bool(lora.targets) and not unknown, "train.lora.targets",
                 f"{unknown or 'nothing'} given; targets are kernel names among {', '.join(LORA_TARGETS)}")
        _require(lora.learning_rate is None or lora.learning_rate > 0, "train.lora.learning_rate", "must be positive")
    for k, task in enumerate(t.eval_tasks):
        key = f"train.eval_tasks[{k}]"
        _require(bool(task.data), f"{key}.data", f"names no files for task {task.task}")
        _require(task.limit is None or task.limit > 0, f"{key}.limit", "must be positive or null (all items)")
        _require(task.batch_size > 0 and task.max_new_tokens > 0, key, "batch_size and max_new_tokens must be > 0")
    _require(not t.eval_tasks or t.eval_every > 0, "train.eval_every", "must be > 0 for train.eval_tasks to run")


def _validate_data(c: Config) -> None:
    d = c.data
    _require(d.max_length > 0, "data.max_length", "must be positive")
    sample = d.sample_length
    _require(0 < sample <= d.max_length, "data.max_sample_length", f"{sample} must be in [1, data.max_length]")
    _require(sample == d.max_length or d.pack is not False, "data.max_sample_length",
             f"{sample} < data.max_length={d.max_length} needs data.pack (true or auto): one sample per row would "
             "only add padding")
    _require(d.max_images >= 0, "data.max_images", "must be >= 0")
    _require(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
    m = c.model
    if not m.anyres.enabled:
        _require(d.max_images * m.tokens_per_image <= d.max_length, "data.max_length",
                 f"{d.max_length} cannot hold data.max_images={d.max_images} images of {m.tokens_per_image} tokens "
                 "each")
        _require(m.tokens_per_image <= sample, "data.max_sample_length",
                 f"{sample} cannot hold one image of {m.tokens_per_image} tokens")
    elif d.max_images > 0:
        # anyres: one image takes up to model.max_tokens_per_image; several are base-only (tokens_per_image + 1
        # each) unless data.anyres_multi_image=anyres
        multi = m.max_tokens_per_image if d.anyres_multi_image == "anyres" else m.tokens_per_image + 1
        need = max(m.max_tokens_per_image, d.max_images * multi if d.max_images > 1 else 0)
        _require(need <= sample, "data.max_sample_length" if sample < d.max_length else "data.max_length",
                 f"{sample} cannot hold {need} image tokens: one anyres image takes up to "
                 f"model.max_tokens_per_image={m.max_tokens_per_image}, data.max_images={d.max_images} "
                 f"{d.anyres_multi_image} images {multi} each (data.anyres_multi_image)")
    for name in ("synthetic_size", "synthetic_eval_size", "bad_fraction_min_samples"):
        _require(getattr(d, name) > 0, f"data.{name}", "must be positive")
    for name in ("num_threads", "num_workers", "prefetch"):
        _require(getattr(d, name) >= 0, f"data.{name}", "must be >= 0")
    _require(d.image_std is None or min(d.image_std) > 0, "data.image_std", "must be positive")
    max_positions = c.model.decoder.max_position_embeddings
    _require(sample <= max_positions, "data.max_sample_length" if sample < d.max_length else "data.max_length",
             f"{sample} is beyond model.decoder.max_position_embeddings={max_positions}: positions past it are "
             "ones the model never learned (RoPE would extrapolate silently)")
    if d.source == "llava_json":
        _require(d.json_path is not None, "data.json_path", "is required when data.source=llava_json")
    if d.source == "tfds":
        _require(d.tfds_name is not None, "data.tfds_name", "is required when data.source=tfds")
    if d.source == "arrayrecord":
        _require(d.arrayrecord_path is not None, "data.arrayrecord_path", "is required when data.source=arrayrecord")
    if d.source == "mixture":
        _require(len(d.mixture) > 0, "data.mixture", "must list at least one source when data.source=mixture")
        for i, entry in enumerate(d.mixture):
            _require(entry.weight > 0, f"data.mixture[{i}].weight", "must be positive")
            if entry.source == "llava_json":
                _require(entry.json_path is not None, f"data.mixture[{i}].json_path", "is required for llava_json")
            if entry.source == "tfds":
                _require(entry.tfds_name is not None, f"data.mixture[{i}].tfds_name", "is required for tfds")
            if entry.source == "arrayrecord":
                _require(entry.arrayrecord_path is not None, f"data.mixture[{i}].arrayrecord_path",
                         "is required for arrayrecord")


def _validate_mesh(m: MeshConfig) -> None:
    for name in ("data", "fsdp", "tensor"):
        value = getattr(m, name)
        _require(value == -1 or value >= 1, f"mesh.{name}", f"must be a positive integer or -1, got {value}")
    _require([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh",
             "at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _require(c.every_steps > 0, "checkpoint.every_steps", "must be positive")
    _require(c.keep > 0, "checkpoint.keep", "must be positive")
    _require(c.keep_every is None or c.keep_every > 0, "checkpoint.keep_every", "must be positive")


def validate(config: Config) -> None:
    """Cross-field checks; fills kind-dependent defaults (vision act/eps, kv heads, head_dim) in place."""
    _validate_model(config.model)
    _validate_train(config)
    _validate_data(config)
    _validate_attention(config)
    _validate_mesh(config.mesh)
    _validate_checkpoint(config.checkpoint)
