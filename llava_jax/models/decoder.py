"""LLaMA-family decoder (LLaMA, Vicuna, Mistral, Qwen2). Public surface: `LanguageModel(config)` with
`embed(ids) -> [B, T, E]`, `__call__(embeds, positions, segment_ids, cache_length=None) -> hidden [B, T, E]` and
`logits(hidden) -> [B, T, V] float32`. With `cache_length` it runs on a static KV cache (see `CacheSlots`).

RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU, optional q/k/v bias, tied or untied output. Attention
runs the `model.attention` kernel, except on the KV cache, which always runs the xla kernel.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import ModelConfig
from llava_jax.models.layers import (Attention, CachedKeys, Embed, Mlp, RMSNorm, constrain, dense, make_layer_stack,
                                     run_layer_stack)


class DecoderBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 cache: Optional[CachedKeys] = None):
        d = self.config.decoder
        dtype = jnp.dtype(self.config.dtype)
        h = RMSNorm(d.rms_norm_eps, dtype, name="input_layernorm")(x)
        attention = Attention(d.num_heads, d.num_kv_heads, d.head_dim, d.hidden_size, qkv_bias=d.qkv_bias,
                              out_bias=False, causal=True, kernel=self.config.attention, rope_theta=d.rope_theta,
                              dtype=dtype, row_sharding=self.config.fsdp_row_kernels, lora=self.config.lora,
                              name="self_attn")
        x = x + attention(h, segment_ids, positions, cache)
        h = RMSNorm(d.rms_norm_eps, dtype, name="post_attention_layernorm")(x)
        x = x + Mlp(d.hidden_size, d.mlp_dim, "silu", gated=True, use_bias=False, dtype=dtype,
                    row_sharding=self.config.fsdp_row_kernels, lora=self.config.lora, name="mlp")(h)
        return constrain(x), None


class CacheSlots(nn.Module):
    """KV-cache bookkeeping shared by all layers ("cache" collection, no params): the segment id and position of
    each of the `length` cache slots and the next slot to write (one index for the whole batch).

    Each call appends its tokens at that index and returns the `CachedKeys` its layers attend to. A query sees the
    slots of its own segment at an earlier or equal position; slots not written yet keep segment 0 (padding),
    so real tokens never see them, and padded prompt rows (segment 0) only ever see padding.
    """

    @nn.compact
    def __call__(self, segment_ids: jax.Array, positions: jax.Array, length: int) -> CachedKeys:
        batch = segment_ids.shape[0]
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        slot_segments = self.variable("cache", "segment_ids", jnp.zeros, (batch, length), jnp.int32)
        slot_positions = self.variable("cache", "positions", jnp.zeros, (batch, length), jnp.int32)
        start = index.value
        slot_segments.value = jax.lax.dynamic_update_slice_in_dim(
            slot_segments.value, segment_ids.astype(jnp.int32), start, axis=1)
        slot_positions.value = jax.lax.dynamic_update_slice_in_dim(
            slot_positions.value, positions.astype(jnp.int32), start, axis=1)
        index.value = start + segment_ids.shape[1]
        return CachedKeys(slot_segments.value, slot_positions.value, start)


class LanguageModel(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg, d = self.config, self.config.decoder
        dtype = jnp.dtype(cfg.dtype)
        self.embed_tokens = Embed(d.vocab_size, d.hidden_size, dtype)
        self.layers = make_layer_stack(DecoderBlock, d.num_layers, cfg.scan_layers, cfg.remat, config=cfg)
        self.norm = RMSNorm(d.rms_norm_eps, dtype)
        self.cache_slots = CacheSlots()
        if not d.tie_embeddings:
            self.lm_head = dense(d.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype, name="lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return constrain(self.embed_tokens(input_ids))

    def __call__(self, embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache_length: Optional[int] = None, accumulator: Optional[dict] = None) -> jax.Array:
        """embeds [B, T, E], positions [B, T], segment_ids [B, T] (0 = padding) -> final-normed hidden.

        `cache_length` (static) switches to KV-cache mode: apply with mutable=["cache"]; the first call creates a
        cache of that many slots (prefill), later calls append to it (decode steps).
        `accumulator`: the layer stack's gradients so far; its weight gradient is added into them in place
        (`layers.run_layer_stack`; training with gradient accumulation only).
        """
        cache = None if cache_length is None else self.cache_slots(segment_ids, positions, cache_length)
        x = run_layer_stack(self.layers, constrain(embeds), segment_ids, positions, cache, accumulator=accumulator,
                            block=DecoderBlock(self.config, parent=None))
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.decoder.tie_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(jnp.float32),
                                          ("activation_batch", "activation_length", "activation_vocab"))
