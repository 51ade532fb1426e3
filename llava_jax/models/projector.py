"""Projector from vision features to LLM embeddings. Public surface: `Projector(config)(features) -> embeds`.

`linear` is one Dense; `mlpNx_gelu` is N Dense layers with exact GELU between them (transformers' linear_1,
act, linear_2), with biases unless `projector.bias` is false. With `pixel_shuffle` each 2x2 block of tokens is
first folded into one token of 4x width.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.config import ModelConfig
from llava_jax.models.layers import ACTIVATIONS, dense


def pixel_shuffle(x: jax.Array) -> jax.Array:
    """[N, s*s, C] (row-major grid) -> [N, (s/2)*(s/2), 4C]: each 2x2 neighbourhood becomes one token."""
    n, tokens, c = x.shape
    side = int(round(tokens ** 0.5))
    x = x.reshape(n, side // 2, 2, side // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (side // 2) ** 2, 4 * c)


class Projector(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.config.projector
        dtype = jnp.dtype(self.config.dtype)
        if p.pixel_shuffle:
            x = pixel_shuffle(x)
        x = x.astype(dtype)
        for i in range(p.num_linear):
            if i > 0:
                x = ACTIVATIONS["gelu"](x)
            axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            x = dense(self.config.decoder.hidden_size, axes, use_bias=p.bias, dtype=dtype, name=f"linear_{i + 1}")(x)
        return x
