"""LLaVA-NeXT anyres on the device: image features placed into the token embeddings by host-built row indices.

Public surface: `TEXT` (-1) / `NEWLINE` (-2), the special values of `image_feature_ids`; `merge_anyres_features(
embeds, features, image_newline, image_feature_ids)`; `check_feature_ids(...)` (host arrays). Every size is in the
ids (llava_jax/data/anyres_inputs.py builds them), so one compiled program serves images of any size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TEXT, NEWLINE = -1, -2


def merge_anyres_features(embeds: jax.Array, features: jax.Array, image_newline: jax.Array,
                          image_feature_ids: jax.Array) -> jax.Array:
    """embeds [B, T, E]; features [B, R, E] (a row's flat crop table: image i, crop c, patch p at (i * C + c) * P + p);
    image_newline [E]; image_feature_ids [B, T] int32 (TEXT: keep the token's embedding, NEWLINE: image_newline,
    k >= 0: features row k) -> [B, T, E]. The table gets image_newline as its last row R."""
    batch, rows, embed = features.shape
    newline = jnp.broadcast_to(image_newline.astype(features.dtype), (batch, 1, embed))
    table = jnp.concatenate([features, newline], axis=1)                                     # [B, R + 1, E]
    index = jnp.where(image_feature_ids == NEWLINE, rows, jnp.clip(image_feature_ids, 0, rows - 1))
    gathered = jnp.take_along_axis(table, index[..., None], axis=1)                          # [B, T, E]
    return jnp.where((image_feature_ids != TEXT)[..., None], gathered.astype(embeds.dtype), embeds)


def check_feature_ids(input_ids, image_feature_ids, table_rows: int, image_token_id: int) -> None:
    """Raises ValueError unless image_feature_ids [B, T] are TEXT exactly off the image tokens and, on them, NEWLINE
    or a row in [0, table_rows) (host arrays; the model calls it before anything runs)."""
    input_ids, ids = np.asarray(input_ids), np.asarray(image_feature_ids)
    if ids.shape != input_ids.shape:
        raise ValueError(f"image_feature_ids has shape {ids.shape}, input_ids {input_ids.shape}; they must agree")
    is_image = input_ids == image_token_id
    wrong = (is_image & ~((ids == NEWLINE) | ((ids >= 0) & (ids < table_rows)))) | (~is_image & (ids != TEXT))
    if wrong.any():
        b, t = (int(i) for i in np.argwhere(wrong)[0])
        raise ValueError(
            f"sample {b}, position {t}: token {int(input_ids[b, t])} has image_feature_id {int(ids[b, t])}; image "
            f"tokens (id {image_token_id}, model.image_token_id) need {NEWLINE} (newline) or a feature row in "
            f"[0, {table_rows}) = images x model.crops_per_image x tokens_per_image, other tokens {TEXT}; build "
            f"them with llava_jax.data.anyres_inputs ({int(wrong.sum())} position(s) wrong)")
