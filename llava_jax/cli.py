"""Command-line helpers shared by the entry points: Megatron-LM `pretrain_vlm.py` flags as config aliases.

Public surface: `MEGATRON_FLAGS` (flag -> config key), `add_megatron_flags(parser)`,
`megatron_overrides(args) -> (overrides, workdir)`.
"""
from __future__ import annotations

import argparse

# flag -> (config key, type). Documented in the README ("Megatron flags").
MEGATRON_FLAGS: dict[str, tuple[str, type]] = {
    "--num-layers": ("model.decoder.num_layers", int),
    "--hidden-size": ("model.decoder.hidden_size", int),
    "--num-attention-heads": ("model.decoder.num_heads", int),
    "--num-query-groups": ("model.decoder.num_kv_heads", int),
    "--ffn-hidden-size": ("model.decoder.mlp_dim", int),
    "--seq-length": ("data.max_length", int),
    "--vision-backbone-type": ("model.vision.kind", str),
    "--vision-model-type": ("model.vision.kind", str),
    "--patch-dim": ("model.vision.patch_size", int),
    "--micro-batch-size": ("train.micro_batch_size", int),
    "--global-batch-size": ("train.batch_size", int),
    "--lr": ("train.learning_rate", float),
    "--lr-warmup-iters": ("train.warmup_steps", int),
    "--weight-decay": ("train.weight_decay", float),
    "--clip-grad": ("train.grad_clip_norm", float),
    "--train-iters": ("train.steps", int),
    "--log-interval": ("train.log_every", int),
    "--seed": ("train.seed", int),
    "--tensor-model-parallel-size": ("mesh.tensor", int),
    "--save-interval": ("checkpoint.every_steps", int),
    "--load": ("checkpoint.load_dir", str),
}
IMAGE_SIZE_FLAGS = ("--img-h", "--img-w")


def _dest(flag: str) -> str:
    return "megatron_" + flag.lstrip("-").replace("-", "_").lower()


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Megatron-LM aliases (each sets the config key shown)")
    for flag, (key, kind) in MEGATRON_FLAGS.items():
        group.add_argument(flag, dest=_dest(flag), type=kind, default=None, help=f"= --set {key}=...")
    for flag in IMAGE_SIZE_FLAGS:
        group.add_argument(flag, dest=_dest(flag), type=int, default=None, help="= model.vision.image_size "
                           "(square images: --img-h and --img-w must agree)")
    group.add_argument("--data-path", dest="megatron_data_path", nargs="+", default=None,
                       help="PATH (LLaVA JSON) or WEIGHT PATH [WEIGHT PATH ...] (a weighted mixture)")
    group.add_argument("--freeze-LM", dest="megatron_freeze_lm", action="store_true", help="freeze the language model")
    group.add_argument("--freeze-ViT", dest="megatron_freeze_vit", action="store_true", help="freeze the vision tower")
    group.add_argument("--bf16", dest="megatron_bf16", action="store_true", help="= model.dtype=bfloat16")
    group.add_argument("--save", dest="megatron_save", default=None, help="= --workdir (checkpoints under it)")


def _data_path_overrides(paths: list[str]) -> list[str]:
    if len(paths) == 1:
        return ["data.source=llava_json", f"data.json_path={paths[0]}"]
    if len(paths) % 2:
        raise ValueError(f"--data-path: expected PATH or WEIGHT PATH pairs, got {len(paths)} values")
    entries = ", ".join(f"{{source: llava_json, weight: {w}, json_path: '{p}'}}"
                        for w, p in zip(paths[::2], paths[1::2]))
    return ["data.source=mixture", f"data.mixture=[{entries}]"]


def megatron_overrides(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """Config overrides implied by Megatron flags (applied before --set), and the --save workdir if given."""
    overrides = [f"{key}={getattr(args, _dest(flag))}" for flag, (key, _) in MEGATRON_FLAGS.items()
                 if getattr(args, _dest(flag)) is not None]
    if args.megatron_num_attention_heads is not None and args.megatron_num_query_groups is None:
        overrides.append(f"model.decoder.num_kv_heads={args.megatron_num_attention_heads}")   # Megatron: MHA
    img_h, img_w = (getattr(args, _dest(f)) for f in IMAGE_SIZE_FLAGS)
    if img_h is not None or img_w is not None:
        if img_h is not None and img_w is not None and img_h != img_w:
            raise SystemExit(f"--img-h {img_h} and --img-w {img_w} differ: only square images are supported "
                             "(model.vision.image_size)")
        overrides.append(f"model.vision.image_size={img_h if img_h is not None else img_w}")
    if args.megatron_data_path:
        try:
            overrides += _data_path_overrides(args.megatron_data_path)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    frozen = [name for name, on in (("language", args.megatron_freeze_lm), ("vision", args.megatron_freeze_vit)) if on]
    if frozen:
        overrides.append(f"train.freeze=[{', '.join(frozen)}]")
    if args.megatron_bf16:
        overrides.append("model.dtype=bfloat16")
    return overrides, args.megatron_save
