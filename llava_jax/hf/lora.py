"""LoRA adapters: our params["lora"] <-> PEFT adapters of LlavaForConditionalGeneration, and adapters merged away.

Public surface: `peft_adapter(config, params)` / `save_peft_adapter(config, params, out_dir)` (PEFT's
save_pretrained format: adapter_config.json + adapter_model.safetensors, the projector as modules_to_save);
`read_peft_adapter(dir)`; `lora_config_from_peft(model_config, adapter)` (the train.lora an adapter needs);
`params_from_peft(config, adapter)` (-> {"lora": ..., "projector": ...}); `merged_params(config, params)`.
`config` is a run Config or a ModelConfig (its `lora` is train.lora); `adapter` a directory or
(adapter_config, tensors).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional, Union

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from llava_jax.config import LORA_TARGETS, Config, LoraConfig, ModelConfig
from llava_jax.hf.layout import (flatten, from_hf, hf_shape, per_layer_shapes, stack_layers, to_hf, unflatten,
                                 unstack_layers)
from llava_jax.hf.names import hf_name, llava_name, skippable
from llava_jax.models.layers import LORA

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."          # PeftModel -> LoraModel -> LlavaForConditionalGeneration
PROJECTOR_MODULE = "multi_modal_projector"  # saved whole (PEFT modules_to_save), as LLaVA's LoRA recipe trains it
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")

Adapter = Union[str, Path, tuple[dict, dict]]


def _model_config(config: Union[Config, ModelConfig]) -> ModelConfig:
    return config.model if isinstance(config, Config) else config


def _module_name(module_path: str) -> str:
    """Our per-layer module path ("language_model/layers_0/self_attn/q_proj") -> its transformers-5 module name."""
    return hf_name(module_path + "/kernel")[:-len(".weight")]


def _adapted_modules(config: ModelConfig) -> dict[str, tuple[tuple, tuple]]:
    """Per-layer module path -> (A shape [in, r], B shape [r, out]) of every adapter `config` builds."""
    shapes = per_layer_shapes(config)
    prefix = LORA + "/"
    modules = sorted({path[len(prefix):].rsplit("/", 1)[0] for path in shapes if path.startswith(prefix)})
    return {module: (shapes[f"{prefix}{module}/a"], shapes[f"{prefix}{module}/b"]) for module in modules}


def _adaptable_modules(config: ModelConfig) -> dict[str, str]:
    """transformers-5 module name -> our module path, for every kernel LoRA could adapt in this architecture."""
    every = LoraConfig(rank=1, targets=list(LORA_TARGETS), vision=True)
    return {_module_name(module): module for module in _adapted_modules(dataclasses.replace(config, lora=every))}


def _projector_names(config: ModelConfig) -> dict[str, str]:
    """transformers-5 weight name -> our param path, for the projector's params."""
    return {hf_name(path): path for path in per_layer_shapes(config) if path.startswith("projector/")}


def _target_regex(module_names) -> str:
    """PEFT `target_modules` (a regex PEFT full-matches against module names) naming exactly `module_names`: per
    tower, its layers (the vision tower's by index: a base with more layers than we run gets none there) and the
    adapted module names."""
    towers: dict[str, dict[str, set]] = {}
    for name in module_names:
        tower, index, rest = _LAYER_INDEX.split(name, maxsplit=1)   # "model.language_model.layers", "0", "mlp.up_proj"
        entry = towers.setdefault(tower, {"layers": set(), "modules": set()})
        entry["layers"].add(int(index))
        entry["modules"].add(rest)
    alternatives = []
    for tower, entry in sorted(towers.items()):
        layers = (r"\d+" if tower.endswith("language_model.layers")
                  else "(?:" + "|".join(str(i) for i in sorted(entry["layers"])) + ")")
        modules = "|".join(re.escape(m) for m in sorted(entry["modules"]))
        alternatives.append(rf"{re.escape(tower)}\.{layers}\.(?:{modules})")
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def peft_adapter(config: Union[Config, ModelConfig], params: dict,
                 base_model_name_or_path: Optional[str] = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, tensors) as PEFT's save_pretrained writes them for a LoraModel over
    LlavaForConditionalGeneration (LlavaNext with model.anyres): `...<module>.lora_A.weight` [r, in] = a.T and
    `lora_B.weight` [out, r] = b.T for every adapter, and the projector's weights (modules_to_save) under their
    plain names. An anyres model's image_newline is no module, so PEFT cannot save it: it travels in the base only."""
    config = _model_config(config)
    lora = config.lora
    if not lora.enabled or LORA not in params:
        raise ValueError("the model has no LoRA adapters (train.lora.rank=0, no params['lora']): export it without "
                         "a PEFT adapter")
    tensors: dict[str, np.ndarray] = {}
    for path, value in flatten(unstack_layers(jax.device_get(params[LORA]))).items():
        module, matrix = path.rsplit("/", 1)
        tensors[f"{PEFT_PREFIX}{_module_name(module)}.lora_{matrix.upper()}.weight"] = (
            np.ascontiguousarray(np.asarray(value, np.float32).T))
    for path, value in flatten({"projector": jax.device_get(params["projector"])}).items():
        tensors[PEFT_PREFIX + hf_name(path)] = np.ascontiguousarray(to_hf(value, path, config))
    base_class, library = (("LlavaNextForConditionalGeneration", "transformers.models.llava_next.modeling_llava_next")
                           if config.anyres.enabled else
                           ("LlavaForConditionalGeneration", "transformers.models.llava.modeling_llava"))
    adapter_config = {
        "peft_type": "LORA", "task_type": None,
        "auto_mapping": {"base_model_class": base_class, "parent_library": library},
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": lora.rank, "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _target_regex([_module_name(m) for m in _adapted_modules(config)]),
        "exclude_modules": None, "modules_to_save": [PROJECTOR_MODULE], "bias": "none", "lora_bias": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return adapter_config, tensors


def save_peft_adapter(config: Union[Config, ModelConfig], params: dict, out_dir,
                      base_model_name_or_path: Optional[str] = None) -> None:
    """Writes `peft_adapter`'s adapter_config.json + adapter_model.safetensors into `out_dir`
    (`peft.PeftModel.from_pretrained(base_model, out_dir)` loads it)."""
    adapter_config, tensors = peft_adapter(config, params, base_model_name_or_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(out_dir / ADAPTER_CONFIG, "w") as f:
        json.dump(adapter_config, f, indent=2)


def read_peft_adapter(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, tensors) of a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{directory / ADAPTER_CONFIG}: not found; expected a PEFT adapter directory "
                                "(what PeftModel.save_pretrained writes)")
    if not (directory / ADAPTER_WEIGHTS).exists():
        hint = (" (it has adapter_model.bin: re-save with save_pretrained(..., safe_serialization=True))"
                if (directory / "adapter_model.bin").exists() else "")
        raise FileNotFoundError(f"{directory / ADAPTER_WEIGHTS}: not found{hint}")
    with open(directory / ADAPTER_CONFIG) as f:
        adapter_config = json.load(f)
    return adapter_config, load_file(str(directory / ADAPTER_WEIGHTS))


def _adapter(adapter: Adapter) -> tuple[str, dict, dict]:
    """(where, for error messages; adapter_config; tensors)."""
    if isinstance(adapter, tuple):
        return "adapter", adapter[0], adapter[1]
    return str(Path(adapter) / ADAPTER_CONFIG), *read_peft_adapter(adapter)


# adapter_config.json settings with no counterpart in our LoraDense: their value must be the default
_PEFT_DEFAULTS = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                  "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None, "trainable_token_indices": None,
                  "layer_replication": None, "use_qalora": False, "use_bdlora": None}


def _lora_settings(where: str, adapter_config: dict) -> tuple[int, float, float]:
    """(r, lora_alpha, lora_dropout) of a plain LoRA adapter config; ValueError naming the first key we cannot
    reproduce (DoRA, rsLoRA, per-module ranks, trained biases, other modules_to_save, ...)."""
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={adapter_config.get('peft_type')!r}; only LORA adapters are supported")
    for key, default in _PEFT_DEFAULTS.items():
        value = adapter_config.get(key, default)
        if value != default and not (default in ({}, None, False) and not value):
            raise ValueError(f"{where}: {key}={value!r} is not supported (llava-jax LoRA is y = x W + b + "
                             f"(alpha / r) x A B, one r and alpha for every module); expected {default!r}")
    extra = sorted(set(adapter_config.get("modules_to_save") or []) - {PROJECTOR_MODULE})
    if extra:
        raise ValueError(f"{where}: modules_to_save {extra} are not supported; only the projector "
                         f"({PROJECTOR_MODULE!r}) trains alongside the adapters")
    return int(adapter_config["r"]), float(adapter_config["lora_alpha"]), float(adapter_config.get("lora_dropout", 0))


def _split_tensors(config: ModelConfig, where: str, tensors: dict) -> tuple[dict, dict]:
    """Adapter tensors -> ({our module path: {"A": [r, in], "B": [out, r]}}, {our projector path: HF tensor}).
    LoRA on vision layers past the feature layer is dropped (they never run); any other key we have no place for
    raises ValueError naming it. transformers-4.x module names are accepted too."""
    adaptable, projector_names = _adaptable_modules(config), _projector_names(config)
    adapters: dict[str, dict] = {}
    projector: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{where}: tensor {key!r} does not start with {PEFT_PREFIX!r}; expected a PEFT LoRA "
                             "adapter of LlavaForConditionalGeneration")
        name = llava_name(key[len(PEFT_PREFIX):])
        lora_key = _LORA_KEY.fullmatch(name)
        if lora_key and lora_key["module"] in adaptable:
            adapters.setdefault(adaptable[lora_key["module"]], {})[lora_key["matrix"]] = tensors[key]
        elif lora_key and skippable(config, name):
            continue
        elif lora_key:
            raise ValueError(f"{where}: tensor {key!r} adapts {lora_key['module']!r}, which has no LoRA in "
                             f"llava-jax (targets are the kernels {', '.join(LORA_TARGETS)} of the decoder layers "
                             "and, with train.lora.vision, of the vision layers in use)")
        elif name in projector_names:
            projector[projector_names[name]] = tensors[key]
        else:
            raise ValueError(f"{where}: tensor {key!r} is neither a LoRA matrix (lora_A / lora_B) nor a projector "
                             f"weight ({PROJECTOR_MODULE}, modules_to_save); llava-jax has no place for it")
    for module, matrices in adapters.items():
        if set(matrices) != {"A", "B"}:
            missing = ({"A", "B"} - set(matrices)).pop()
            raise ValueError(f"{where}: {_module_name(module)!r} has no lora_{missing}.weight")
    return adapters, projector


def _lora_config(adapter_config: dict, where: str, modules) -> LoraConfig:
    rank, alpha, dropout = _lora_settings(where, adapter_config)
    names = {module.rsplit("/", 1)[1] for module in modules}
    if not names:
        raise ValueError(f"{where}: the adapter holds no LoRA matrices (lora_A / lora_B) for this model")
    return LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=[t for t in LORA_TARGETS if t in names],
                      vision=any(module.startswith("vision_tower/") for module in modules))


def lora_config_from_peft(config: Union[Config, ModelConfig], adapter: Adapter) -> LoraConfig:
    """The train.lora a PEFT adapter needs on this architecture: its r, lora_alpha and lora_dropout, the kernel
    names it adapts (vision: whether it adapts the vision tower)."""
    config = _model_config(config)
    where, adapter_config, tensors = _adapter(adapter)
    adapters, _ = _split_tensors(config, where, tensors)
    return _lora_config(adapter_config, where, adapters)


def _describe(lora: LoraConfig) -> str:
    return f"targets {lora.targets}, vision tower {'included' if lora.vision else 'not included'}"


def params_from_peft(config: Union[Config, ModelConfig], adapter: Adapter) -> dict:
    """A PEFT LoRA adapter -> {"lora": our params["lora"] (scanned when model.scan_layers), "projector": ...}
    (projector only when the adapter saves it), to update a base params tree with. Raises ValueError when the
    adapter's r, lora_alpha or adapted modules differ from config's train.lora, or it holds anything else."""
    config = _model_config(config)
    want = config.lora
    where, adapter_config, tensors = _adapter(adapter)
    adapters, projector = _split_tensors(config, where, tensors)
    found = _lora_config(adapter_config, where, adapters)
    if not want.enabled:
        raise ValueError(f"{where}: the model config has no LoRA (train.lora.rank=0); the adapter needs "
                         f"train.lora.rank={found.rank} train.lora.alpha={found.alpha:g} and {_describe(found)}")
    for key, have, need in (("rank", found.rank, want.rank), ("alpha", found.alpha, float(want.alpha))):
        if have != need:
            peft_key = "r" if key == "rank" else "lora_alpha"
            raise ValueError(f"{where}: the adapter has {peft_key}={have:g}, but train.lora.{key} is {need:g}; set "
                             f"train.lora.{key}={have:g} to load it")
    expected = _adapted_modules(config)
    differing = sorted(set(expected) ^ set(adapters))
    if differing:
        module = differing[0]
        has = "has no adapter on" if module in expected else "adapts"
        raise ValueError(f"{where}: the adapter {has} {_module_name(module)!r}: it has {_describe(found)}, "
                         f"train.lora has {_describe(want)} ({len(differing)} module(s) differ)")
    flat = {}
    for module, (a_shape, b_shape) in expected.items():
        a, b = adapters[module]["A"], adapters[module]["B"]
        for matrix, value, shape in (("A", a, a_shape[::-1]), ("B", b, b_shape[::-1])):
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{where}: {_module_name(module)}.lora_{matrix}.weight has shape "
                                 f"{tuple(value.shape)}, the model needs {tuple(shape)}")
        flat[f"{module}/a"] = np.asarray(a, np.float32).T
        flat[f"{module}/b"] = np.asarray(b, np.float32).T
    lora = unflatten(flat)
    out = {LORA: stack_layers(lora) if config.scan_layers else lora}
    if projector:
        missing = sorted(set(_projector_names(config).values()) - set(projector))
        if missing:
            raise ValueError(f"{where}: the adapter saves the projector without {hf_name(missing[0])!r}")
        for path, value in projector.items():
            expected_shape = hf_shape(per_layer_shapes(config)[path], path, config)
            if tuple(value.shape) != expected_shape:
                raise ValueError(f"{where}: {PEFT_PREFIX}{hf_name(path)} has shape {tuple(value.shape)}, the model "
                                 f"needs {expected_shape}")
        out["projector"] = unflatten({path: from_hf(value, path) for path, value in projector.items()})["projector"]
    return out


def merged_params(config: Union[Config, ModelConfig], params: dict) -> dict:
    """`params` without params["lora"], each adapter folded into its kernel: W + (alpha / r) A B (float32 numpy;
    scanned stacks [L, in, r] x [L, r, out] merge layer by layer)."""
    lora = _model_config(config).lora
    if not lora.enabled or LORA not in params:
        raise ValueError("the model has no LoRA adapters (train.lora.rank=0, no params['lora']): nothing to merge")
    scale = np.float32(lora.alpha / lora.rank)
    params = jax.device_get(params)

    def merge(node: dict, adapters: dict) -> dict:
        out = dict(node)
        for name, adapter in adapters.items():
            if name not in node:
                raise ValueError(f"params['lora'] has an adapter {name!r} with no module of that name in params")
            if set(adapter) == {"a", "b"}:
                kernel = np.asarray(node[name]["kernel"], np.float32)
                update = np.matmul(np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32))
                out[name] = {**node[name], "kernel": kernel + scale * update}
            else:
                out[name] = merge(node[name], adapter)
        return out

    return merge({key: value for key, value in params.items() if key != LORA}, params[LORA])
