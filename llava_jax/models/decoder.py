"""LLaMA-family decoder (LLaMA, Vicuna, Mistral, Qwen2). Public surface: `LanguageModel(config)` with
`embed(ids) -> [B, T, E]`, `__call__(embeds, positions, segment_ids) -> hidden [B, T, E]` and
`logits(hidden) -> [B, T, V] float32`.

RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU, optional q/k/v bias, tied or untied output.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import ModelConfig
from llava_jax.models.layers import (Attention, Embed, Mlp, RMSNorm, constrain, dense, make_attention_mask,
                                     make_layer_stack, run_layer_stack)


class DecoderBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array):
        d = self.config.decoder
        dtype = jnp.dtype(self.config.dtype)
        h = RMSNorm(d.rms_norm_eps, dtype, name="input_layernorm")(x)
        x = x + Attention(d.num_heads, d.num_kv_heads, d.head_dim, d.hidden_size, qkv_bias=d.qkv_bias,
                          out_bias=False, rope_theta=d.rope_theta, dtype=dtype, name="self_attn")(h, mask, positions)
        h = RMSNorm(d.rms_norm_eps, dtype, name="post_attention_layernorm")(x)
        x = x + Mlp(d.hidden_size, d.mlp_dim, "silu", gated=True, use_bias=False, dtype=dtype, name="mlp")(h)
        return constrain(x), None


class LanguageModel(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg, d = self.config, self.config.decoder
        dtype = jnp.dtype(cfg.dtype)
        self.embed_tokens = Embed(d.vocab_size, d.hidden_size, dtype)
        self.layers = make_layer_stack(DecoderBlock, d.num_layers, cfg.scan_layers, cfg.remat, config=cfg)
        self.norm = RMSNorm(d.rms_norm_eps, dtype)
        if not d.tie_embeddings:
            self.lm_head = dense(d.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype, name="lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return constrain(self.embed_tokens(input_ids))

    def __call__(self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """embeds [B, T, E], positions [B, T], segment_ids [B, T] (0 = padding) -> final-normed hidden."""
        mask = make_attention_mask(segment_ids, segment_ids, causal=True)
        x = run_layer_stack(self.layers, constrain(embeds), mask, positions)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.decoder.tie_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(jnp.float32),
                                          ("activation_batch", "activation_length", "activation_vocab"))
