"""Honest FLOPs per train step and MFU.

Public surface: `PEAK_FLOPS_PER_DEVICE`, `peak_flops(device_kind)`, `train_step_flops(config, frozen)`.

Formula (matmul FLOPs only; elementwise ops, norms and softmax are ignored):
  forward FLOPs of a part = 2 x (weights touched per token) x tokens + attention scores/values
  attention per layer      = 4 x L_q x L_k x (heads x head_dim)   (QK^T and PV), halved for causal self-attention
  vision tokens            = (patches + class token) per crop x B x I x crops (blank slots are computed too;
                             crops = model.crops_per_image: 1, or with anyres every crop slot, padded ones too)
  decoder tokens           = B x T (padding is computed too); the LM head counts as V x E weights
"Real" FLOPs count only non-padding tokens and real images (metrics real_flops_per_s / real_mfu): the weight
FLOPs scale with the real tokens, attention with the real tokens x T (an upper bound for packed rows, whose
segments attend within themselves); with anyres a real image counts all its crop slots (an upper bound: a small
image has fewer tiles than the largest grid).
Training multiplies each part's forward cost by
  1 (forward) + 1 if the part is trained (weight gradients)
              + 1 if gradients must flow through its activations (it is trained or a trained part is upstream).
So a trained part costs 3x, a frozen language model under a trained projector 2x, and a frozen vision tower
(stop_gradient) 1x. Attention (no weights) costs 3x where gradients flow through it, else 1x.
"""
from __future__ import annotations

from typing import Optional

from llava_jax.config import Config

# Dense bf16 peak FLOP/s per chip (matmul units), from vendor datasheets.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,        # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of one device of this kind, or None (e.g. CPU) when unknown."""
    for name in sorted(PEAK_FLOPS_PER_DEVICE, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS_PER_DEVICE[name]
    return None


def _part_forward_flops(config: Config, real_tokens: Optional[float], real_images: Optional[float]
                        ) -> dict[str, tuple[float, float]]:
    """Per global batch: {part: (weight matmul FLOPs, attention FLOPs)} of one forward pass."""
    m, d, v = config.model, config.model.decoder, config.model.vision
    batch, length, images = config.train.batch_size, config.data.max_length, config.data.max_images
    vision_tokens = v.num_patches + int(v.has_class_token)
    layer_weights = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.mlp_dim
    vision_weights = v.patch_size ** 2 * v.num_channels * v.hidden_size + m.vision_layers_used * layer_weights
    num_images = (batch * images if real_images is None else real_images) * m.crops_per_image
    tokens = batch * length if real_tokens is None else real_tokens
    vision = (2 * vision_weights * vision_tokens * num_images,
              m.vision_layers_used * 4 * vision_tokens ** 2 * v.hidden_size * num_images)

    projector_in = m.vision.hidden_size * (4 if m.projector.pixel_shuffle else 1)
    projector_weights = projector_in * d.hidden_size + (m.projector.num_linear - 1) * d.hidden_size ** 2
    projector = (2 * projector_weights * m.tokens_per_image * num_images, 0.0)

    q_width, kv_width = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    decoder_layer = 2 * d.hidden_size * q_width + 2 * d.hidden_size * kv_width + 3 * d.hidden_size * d.mlp_dim
    decoder_weights = d.num_layers * decoder_layer + d.vocab_size * d.hidden_size
    language = (2 * decoder_weights * tokens, d.num_layers * 4 * length * q_width * tokens / 2)
    return {"vision_tower": vision, "projector": projector, "language_model": language}


def train_step_flops(config: Config, frozen: tuple[str, ...], real_tokens: Optional[float] = None,
                     real_images: Optional[float] = None) -> float:
    """Matmul FLOPs of one full train step (all accumulation micro-batches) over the global batch: of every
    position and image slot, or (`real_tokens`, `real_images`: a batch's non-padding tokens and real images) of the
    real ones only."""
    total, upstream_trained = 0.0, False
    for part, (weights, attention) in _part_forward_flops(config, real_tokens, real_images).items():
        trained = part not in frozen
        grads_flow = trained or upstream_trained
        total += weights * (1 + int(trained) + int(grads_flow)) + attention * (3 if grads_flow else 1)
        upstream_trained = upstream_trained or trained
    return total
