"""Converts Hugging Face LLaVA checkpoints to llava-jax model directories and back.

Public surface: `save_converted(out_dir, config, params)`, `load_converted(path) -> (Config, params)` and the CLI
`python -m llava_jax.convert {hf-to-jax,towers,jax-to-hf}`. A converted directory holds `config.yaml` (a full run
config whose `model` section is the converted model; usable as --config) and `params/` (the unboxed params tree,
saved with orbax.checkpoint.StandardCheckpointer). `--set key=value` overrides apply on top of the converted config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import orbax.checkpoint as ocp

from llava_jax.config import (Config, ModelConfig, apply_overrides, config_from_dict, config_to_dict, load_config,
                              save_config)
from llava_jax.hf import conform_params, load_hf_llava, load_hf_towers, save_hf_llava

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"


def save_converted(out_dir, config: Config, params: Any) -> None:
    """Writes OUT/config.yaml and OUT/params/ (refuses to overwrite an existing params directory)."""
    out_dir = Path(out_dir).absolute()
    if (out_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{out_dir / PARAMS_DIR}: already exists; choose a new --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, str(out_dir / CONFIG_FILE))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / PARAMS_DIR, params)
    checkpointer.wait_until_finished()


def load_converted(path, target: Optional[Any] = None) -> tuple[Config, Any]:
    """Reads a directory written by `save_converted`. `target` (a tree of arrays or jax.ShapeDtypeStruct with
    shardings) restores onto that layout; without it the params come back as saved."""
    path = Path(path).absolute()
    config = load_config(str(path / CONFIG_FILE))
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    return config, params


def run_config(model_config: ModelConfig, overrides: Sequence[str] = ()) -> Config:
    """A full run config around `model_config`, with dotted `key=value` overrides applied and validated."""
    return config_from_dict(apply_overrides({"model": config_to_dict(model_config)}, overrides))


def _convert(model_config: ModelConfig, params: Any, overrides: Sequence[str], out_dir: str) -> None:
    config = run_config(model_config, overrides)
    save_converted(out_dir, config, conform_params(params, config.model))


def _hf_to_jax(args: argparse.Namespace) -> None:
    _convert(*load_hf_llava(args.hf), args.set, args.out)


def _towers(args: argparse.Namespace) -> None:
    model_config, params = load_hf_towers(
        args.vision, args.language, projector=args.projector, image_token_id=args.image_token_id,
        vision_feature_layer=args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy, pixel_shuffle=args.pixel_shuffle,
        rng=jax.random.key(args.seed))
    _convert(model_config, params, args.set, args.out)


def _jax_to_hf(args: argparse.Namespace) -> None:
    config, params = load_converted(args.src)
    save_hf_llava(config.model, params, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    set_help = "config override, e.g. model.dtype=bfloat16 (repeatable)"

    hf_to_jax = commands.add_parser("hf-to-jax", help="LlavaForConditionalGeneration directory -> llava-jax")
    hf_to_jax.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    hf_to_jax.set_defaults(run=_hf_to_jax)

    towers = commands.add_parser("towers", help="vision tower + language model directories -> fresh llava-jax")
    towers.add_argument("--vision", required=True, help="CLIPVisionModel / SiglipVisionModel (or CLIP / SigLIP)")
    towers.add_argument("--language", required=True, help="LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM")
    towers.add_argument("--projector", default="mlp2x_gelu", help="linear or mlpNx_gelu")
    towers.add_argument("--pixel-shuffle", action="store_true", help="fold 2x2 vision tokens before the projector")
    towers.add_argument("--image-token-id", type=int, default=None,
                        help="existing token id for images (default: append one token to the vocabulary)")
    towers.add_argument("--vision-feature-layer", type=int, default=-2)
    towers.add_argument("--vision-feature-select-strategy", choices=("default", "full"), default="default")
    towers.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    towers.set_defaults(run=_towers)

    for command in (hf_to_jax, towers):
        command.add_argument("--out", required=True, help="output directory (config.yaml + params/)")
        command.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=set_help)

    jax_to_hf = commands.add_parser("jax-to-hf", help="llava-jax directory -> LlavaForConditionalGeneration")
    jax_to_hf.add_argument("--src", required=True, help="directory written by hf-to-jax / towers")
    jax_to_hf.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
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
