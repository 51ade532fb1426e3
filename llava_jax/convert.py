"""Converts Hugging Face LLaVA checkpoints to llava-jax model directories and back.

Public surface: `save_converted(out_dir, config, params, tokenizer=None)` and the CLI `python -m llava_jax.convert
{hf-to-jax,towers,jax-to-hf}`. A converted directory holds `config.yaml` (a full run config whose `model` section
is the converted model; usable as --config), `params/` (the unboxed params tree, Orbax StandardCheckpointer) and,
when there is one, `tokenizer/` (transformers files with "<image>", and "<pad>" if the tokenizer had no pad token;
`data.tokenizer` points at it). `--set key=value` overrides apply on top of the converted config. Directories are
read back with `llava_jax.model_params.load_model`, which also reads training runs (jax-to-hf exports either).

LoRA (train.lora; llava_jax.hf.lora): `hf-to-jax --adapter DIR` adds a PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors, its projector from modules_to_save) to the converted base, and config.yaml gets the
matching train.lora. A LoRA model exports only with `jax-to-hf --lora peft` (OUT/ = the base model, its trained
projector included; OUT/adapter/ = the PEFT adapter, loaded with `PeftModel.from_pretrained(base, OUT/adapter)`) or
`--lora merge` (OUT/ = a plain model, W + (alpha / r) A B folded into each adapted kernel).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import orbax.checkpoint as ocp

from llava_jax.anyres_grid import DEFAULT_GRID_PINPOINTS
from llava_jax.config import (Config, LoraConfig, ModelConfig, apply_overrides, config_from_dict, config_to_dict,
                              save_config)
from llava_jax.data.tokenizers import llava_tokenizer
from llava_jax.hf import conform_params, load_hf_llava, load_hf_towers, save_hf_llava
from llava_jax.hf.lora import lora_config_from_peft, merged_params, params_from_peft, save_peft_adapter
from llava_jax.models.layers import LORA
from llava_jax.model_params import CONVERTED_CONFIG, CONVERTED_PARAMS, load_model

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
ADAPTER_DIR = "adapter"      # jax-to-hf --lora peft: OUT/adapter/ holds the PEFT adapter, OUT/ the base model


def save_converted(out_dir, config: Config, params: Any, tokenizer=None) -> None:
    """Writes OUT/config.yaml, OUT/params/ and OUT/tokenizer/ (refuses to overwrite an existing params directory)."""
    out_dir = Path(out_dir).absolute()
    if (out_dir / CONVERTED_PARAMS).exists():
        raise FileExistsError(f"{out_dir / CONVERTED_PARAMS}: already exists; choose a new --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    save_config(config, str(out_dir / CONVERTED_CONFIG))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / CONVERTED_PARAMS, params)
    checkpointer.wait_until_finished()


def run_config(model_config: ModelConfig, overrides: Sequence[str] = (), lora: Optional[LoraConfig] = None) -> Config:
    """A full run config around `model_config` (and `lora` as train.lora), with dotted `key=value` overrides
    applied and validated."""
    values = {"model": config_to_dict(model_config)}
    if lora is not None:
        values["train"] = {"lora": config_to_dict(lora)}
    return config_from_dict(apply_overrides(values, overrides))


def _convert(model_config: ModelConfig, params: Any, overrides: Sequence[str], out_dir: str, tokenizer=None,
             adapter: Optional[str] = None) -> None:
    """Saves the converted model; with `adapter` (a PEFT LoRA directory) its adapters and projector replace the
    base's, and train.lora is set from it (before `overrides`, which must agree with it)."""
    if tokenizer is not None:
        overrides = [f"data.tokenizer={Path(out_dir).absolute() / TOKENIZER_DIR}", *overrides]
    lora = lora_config_from_peft(model_config, adapter) if adapter else None
    config = run_config(model_config, overrides, lora)
    if adapter:
        params = {**params, **params_from_peft(config, adapter)}
    save_converted(out_dir, config, conform_params(params, config.model), tokenizer)


def _tokenizer_source(args: argparse.Namespace) -> Optional[str]:
    """--tokenizer, else the directory given by --hf / --language when it holds tokenizer files."""
    if args.tokenizer:
        return args.tokenizer
    directory = Path(args.hf if args.command == "hf-to-jax" else args.language)
    return str(directory) if any((directory / name).exists() for name in TOKENIZER_FILES) else None


def _hf_to_jax(args: argparse.Namespace) -> None:
    config, params = load_hf_llava(args.hf)
    source = _tokenizer_source(args)
    tokenizer = llava_tokenizer(source) if source else None
    if tokenizer is not None and tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
        raise ValueError(f"the tokenizer of {source} has <image> = {tokenizer.convert_tokens_to_ids('<image>')} "
                         f"but the model's image_token_index is {config.image_token_id}")
    _convert(config, params, args.set, args.out, tokenizer, adapter=args.adapter)


def _towers(args: argparse.Namespace) -> None:
    source = _tokenizer_source(args)
    tokenizer = llava_tokenizer(source) if source else None
    image_token_id = args.image_token_id
    if tokenizer is not None:
        own_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_token_id not in (None, own_id):
            raise ValueError(f"--image-token-id {image_token_id}: the tokenizer of {source} gives <image> the id "
                             f"{own_id}; drop the flag or use --tokenizer with one whose <image> is that id")
        image_token_id = own_id
    model_config, params = load_hf_towers(
        args.vision, args.language, projector=args.projector, image_token_id=image_token_id,
        vocab_size=args.vocab_size, vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy, pixel_shuffle=args.pixel_shuffle,
        rng=jax.random.key(args.seed), min_vocab_size=0 if tokenizer is None else len(tokenizer),
        grid_pinpoints=_grid_pinpoints(args))
    _convert(model_config, params, args.set, args.out, tokenizer)


def _grid_pinpoints(args: argparse.Namespace) -> Optional[list]:
    """--grid-pinpoints '[[h, w], ...]' (implies --anyres), --anyres alone: LLaVA-NeXT's defaults, else None."""
    if args.grid_pinpoints:
        try:
            return json.loads(args.grid_pinpoints)
        except json.JSONDecodeError as e:
            raise ValueError(f"--grid-pinpoints {args.grid_pinpoints!r}: not JSON ({e}); e.g. '[[336, 672], "
                             "[672, 336]]'") from e
    return [list(p) for p in DEFAULT_GRID_PINPOINTS] if args.anyres else None


def _jax_to_hf(args: argparse.Namespace) -> None:
    config, params = load_model(args.src)
    lora = config.train.lora
    if lora.enabled and not args.lora:
        raise ValueError(f"{args.src} has LoRA adapters (train.lora.rank={lora.rank}); the base model alone would "
                         "drop them: add --lora peft (base model + PEFT adapter in OUT/adapter) or --lora merge "
                         "(adapters folded into the weights)")
    if args.lora and not lora.enabled:
        raise ValueError(f"--lora {args.lora}: {args.src} has no LoRA adapters (train.lora.rank=0); drop --lora")
    params = jax.device_get(params)
    base = merged_params(config, params) if args.lora == "merge" else {k: v for k, v in params.items() if k != LORA}
    save_hf_llava(config.model, base, args.out)
    if args.lora == "peft":
        save_peft_adapter(config, params, Path(args.out) / ADAPTER_DIR, str(Path(args.out).absolute()))
        if config.model.anyres.enabled:
            print(f"note: image_newline is no module, so PEFT cannot save it with the adapter; the trained one is in "
                  f"the base model {args.out}", file=sys.stderr)
    if config.data.tokenizer != "byte":
        llava_tokenizer(config.data.tokenizer).save_pretrained(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    set_help = "config override, e.g. model.dtype=bfloat16 (repeatable)"
    tokenizer_help = ("tokenizer directory / tokenizer.json / sentencepiece model written to OUT/tokenizer "
                      "(default: the model directory's own tokenizer files, if any)")

    hf_to_jax = commands.add_parser("hf-to-jax", help="LlavaForConditionalGeneration directory -> llava-jax")
    hf_to_jax.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    hf_to_jax.add_argument("--adapter", default=None, metavar="DIR",
                           help="PEFT LoRA adapter of that model (adapter_config.json + adapter_model.safetensors): "
                                "its adapters and projector are loaded and train.lora set to match")
    hf_to_jax.set_defaults(run=_hf_to_jax)

    towers = commands.add_parser("towers", help="vision tower + language model directories -> fresh llava-jax")
    towers.add_argument("--vision", required=True, help="CLIPVisionModel / SiglipVisionModel (or CLIP / SigLIP)")
    towers.add_argument("--language", required=True, help="LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM")
    towers.add_argument("--projector", default="mlp2x_gelu", help="linear or mlpNx_gelu")
    towers.add_argument("--pixel-shuffle", action="store_true", help="fold 2x2 vision tokens before the projector")
    towers.add_argument("--image-token-id", type=int, default=None,
                        help="token id for images (default: the tokenizer's <image>, added after its tokens; "
                             "without a tokenizer the first id after the language model's vocabulary)")
    towers.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary after growth (default: room for <image> and <pad>, padded to a multiple "
                             "of 64: LLaMA's 32000 -> 32064, as llava-1.5-7b-hf)")
    towers.add_argument("--vision-feature-layer", type=int, default=-2)
    towers.add_argument("--vision-feature-select-strategy", choices=("default", "full"), default="default")
    towers.add_argument("--anyres", action="store_true",
                        help="a LLaVA-NeXT model: anyres images (its default grid pinpoints), a fresh image_newline")
    towers.add_argument("--grid-pinpoints", default=None, metavar="JSON",
                        help="anyres with these (height, width) pinpoints, e.g. '[[336, 672], [672, 336]]'")
    towers.add_argument("--seed", type=int, default=0, help="projector (and image_newline) initialisation seed")
    towers.set_defaults(run=_towers)

    for command in (hf_to_jax, towers):
        command.add_argument("--out", required=True, help="output directory (config.yaml + params/ + tokenizer/)")
        command.add_argument("--tokenizer", default=None, help=tokenizer_help)
        command.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help)

    jax_to_hf = commands.add_parser("jax-to-hf",
                                    help="llava-jax model or training run -> LlavaForConditionalGeneration")
    jax_to_hf.add_argument("--src", required=True, help="directory written by hf-to-jax / towers, a training run "
                           "(its newest checkpoint) or one checkpoint directory")
    jax_to_hf.add_argument("--out", required=True, help="output directory (config.json, model.safetensors and the "
                           "tokenizer files)")
    jax_to_hf.add_argument("--lora", choices=("peft", "merge"), default=None,
                           help="required for a LoRA model: peft writes the base model to OUT and a PEFT adapter to "
                                f"OUT/{ADAPTER_DIR}; merge writes one plain model with the adapters folded in")
    jax_to_hf.set_defaults(run=_jax_to_hf)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
