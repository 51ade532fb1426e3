"""CLIP / SigLIP vision tower. Public surface: `VisionTower(config)(pixels [N, H, W, C]) -> [N, tokens, hidden]`.

Returns transformers' `hidden_states[vision_feature_layer]` after the select strategy ("default" drops token 0,
"full" keeps all). Only the encoder layers up to the selected one are built; post-layernorm is never applied.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import ModelConfig
from llava_jax.models.layers import (Attention, LayerNorm, Mlp, constrain, dense, make_layer_stack,
                                     run_layer_stack)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x)). Full (non-causal) attention."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, _unused=None):
        v = self.config.vision
        dtype = jnp.dtype(self.config.dtype)
        heads = v.num_heads
        lora = self.config.lora if self.config.lora.vision else None
        h = LayerNorm(v.layer_norm_eps, dtype, name="layer_norm1")(x)
        x = x + Attention(heads, heads, v.hidden_size // heads, v.hidden_size, qkv_bias=True, out_bias=True,
                          causal=False, kernel=self.config.attention, dtype=dtype,
                          row_sharding=self.config.fsdp_row_kernels, lora=lora, name="self_attn")(h)
        h = LayerNorm(v.layer_norm_eps, dtype, name="layer_norm2")(x)
        x = x + Mlp(v.hidden_size, v.mlp_dim, v.act, gated=False, use_bias=True, dtype=dtype,
                    row_sharding=self.config.fsdp_row_kernels, lora=lora, name="mlp")(h)
        return constrain(x), None


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """[N, H, W, C] -> [N, (H/p)*(W/p), p*p*C], patches row-major, each flattened as (ph, pw, C)."""
    n, h, w, c = pixels.shape
    x = pixels.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class VisionTower(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg, v = self.config, self.config.vision
        dtype = jnp.dtype(cfg.dtype)
        is_clip = v.kind == "clip"
        self.patch_embed = dense(v.hidden_size, ("patch", "embed"), use_bias=not is_clip, dtype=dtype,
                                 name="patch_embed")
        num_positions = v.num_patches + int(v.has_class_token)
        self.position_embedding = self.param(
            "position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (num_positions, v.hidden_size), jnp.float32)
        if is_clip:
            self.class_embedding = self.param(
                "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (v.hidden_size,), jnp.float32)
            self.pre_layernorm = LayerNorm(v.layer_norm_eps, dtype)
        self.layers = make_layer_stack(EncoderBlock, cfg.vision_layers_used, cfg.scan_layers, cfg.remat,
                                       config=cfg)

    def __call__(self, pixels: jax.Array, accumulator: Optional[dict] = None) -> jax.Array:
        """`accumulator`: see `LanguageModel.__call__`."""
        cfg, v = self.config, self.config.vision
        dtype = jnp.dtype(cfg.dtype)
        x = self.patch_embed(patchify(pixels.astype(dtype), v.patch_size))     # [N, patches, hidden]
        if v.has_class_token:
            cls = jnp.broadcast_to(self.class_embedding.astype(dtype), (x.shape[0], 1, v.hidden_size))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding.astype(dtype)[None]
        if v.has_class_token:
            x = self.pre_layernorm(x)
        x = run_layer_stack(self.layers, constrain(x), None, accumulator=accumulator,
                            block=EncoderBlock(cfg, parent=None))
        return x[:, 1:] if cfg.vision_feature_select_strategy == "default" else x
