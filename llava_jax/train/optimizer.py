"""Which model parts train, and the optimizer over them.

Public surface: `GROUPS`, `STAGE_FROZEN`, `frozen_groups(train_config)`, `split_params`, `merge_params`,
`learning_rate_schedule(train_config, base_lr)`, `make_optimizer(train_config, trainable_params)`.

The params tree has three top-level groups: `vision_tower`, `projector`, `language_model` (+ LLaVA-NeXT's
`image_newline`, which belongs to the projector: it trains, freezes and takes its learning rate with it, as in
LLaVA-NeXT's mm_mlp_adapter). Frozen groups are left out of the optimizer entirely (no Adam moments, no weight
gradients); only the trainable subtree is differentiated and updated.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from llava_jax.config import TrainConfig
from llava_jax.train.adamw import clipped_adamw

GROUPS = {"vision": "vision_tower", "projector": "projector", "language": "language_model"}
GROUP_MEMBERS = {"projector": ("projector", "image_newline")}   # top-level params that go with a group
STAGE_FROZEN = {
    "pretrain": ("vision", "language"),   # LLaVA stage 1: projector only
    "finetune": ("vision",),              # LLaVA stage 2: projector + language model
    "full": (),
}
NO_DECAY_LEAVES = ("bias", "scale", "class_embedding")


def frozen_groups(train_config: TrainConfig) -> tuple[str, ...]:
    """Frozen param groups (top-level param keys): `train.freeze` if set, else the `train.stage` preset; with
    train.lora both towers are frozen (their adapters, params["lora"], train; so does the projector unless
    train.freeze names it)."""
    names = train_config.freeze if train_config.freeze is not None else STAGE_FROZEN[train_config.stage]
    if train_config.lora.enabled:
        names = sorted(set(names) | {"vision", "language"})
        return tuple(key for n in names for key in GROUP_MEMBERS.get(GROUPS[n], (GROUPS[n],)))
    if set(names) == set(GROUPS):
        raise ValueError("train.freeze: every part is frozen (vision, projector, language); nothing would train")
    return tuple(key for n in names for key in GROUP_MEMBERS.get(GROUPS[n], (GROUPS[n],)))


def split_params(params: dict, frozen: tuple[str, ...]) -> tuple[dict, dict]:
    trainable = {k: v for k, v in params.items() if k not in frozen}
    return trainable, {k: v for k, v in params.items() if k in frozen}


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**trainable, **frozen}


def learning_rate_schedule(t: TrainConfig, base_lr: float) -> optax.Schedule:
    """Linear warmup from 0 to `base_lr` over `warmup_steps`, then cosine decay to `min_learning_rate_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=base_lr * t.min_learning_rate_ratio)


def _group_learning_rate(t: TrainConfig, group: str) -> float:
    override = {"vision_tower": t.vision_learning_rate, "projector": t.projector_learning_rate,
                "image_newline": t.projector_learning_rate, "language_model": t.language_learning_rate,
                "lora": t.lora.learning_rate}[group]
    return t.learning_rate if override is None else override


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only: not on norms, biases or the class token."""
    def decays(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY_LEAVES
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: TrainConfig, trainable: dict) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping, then AdamW per group (each group may have its own learning rate), fused into one
    elementwise update per parameter (`llava_jax.train.adamw`); `update` takes the step's `grad_norm=`. The
    moments are stored in `train.optimizer_state_dtype`."""
    learning_rates = {g: learning_rate_schedule(t, _group_learning_rate(t, g)) for g in trainable}
    return clipped_adamw(learning_rates, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay,
                         decay_mask=_decay_mask, max_norm=t.grad_clip_norm, moment_dtype=t.optimizer_state_dtype)
