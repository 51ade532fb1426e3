"""Attention over an anyres (LLaVA-NeXT) image's tokens, mapped back onto the image for plotting (notebooks/inspect).

Public surface: `AnyresAttention(base, tiles, newlines)`; `anyres_attention_grid(token_attention, layout)` (one image's
token attention -> the base crop's grid and the tiles' grid on the padded image); `tile_mosaic(crops, layout)` (the
tiles put back together into the padded image [rows * S, cols * S, 3]).
Token order is transformers' pack_image_features (data.anyres.AnyresLayout): the base crop's patches row-major, then
the unpadded tile feature grid row by row, each row followed by one image_newline.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from llava_jax.data.anyres import AnyresLayout


class AnyresAttention(NamedTuple):
    base: np.ndarray       # [pps, pps]: the base crop's patches (the whole image squashed to one crop)
    tiles: np.ndarray      # [rows * pps, cols * pps]: the tiles' patches on the padded image, NaN where unpadded away
    newlines: np.ndarray   # [h']: the image_newline after each kept feature row


def anyres_attention_grid(token_attention, layout: AnyresLayout) -> AnyresAttention:
    """Splits one image's token attention [layout.num_tokens] (in its token order) into the base crop's patch grid,
    the tile patch grid over the whole padded image (tile (r, c) at rows r * pps.., cols c * pps..) and the
    newline column."""
    token_attention = np.asarray(token_attention, np.float32)
    if token_attention.shape != (layout.num_tokens,):
        raise ValueError(f"token_attention has shape {token_attention.shape}; this image's layout takes "
                         f"{layout.num_tokens} tokens ({layout.base_tokens} base + {layout.unpadded[0]} x "
                         f"({layout.unpadded[1]} + 1) tile tokens and newlines)")
    side = layout.patches_per_side
    base = token_attention[:layout.base_tokens].reshape(side, side)
    kept_rows, kept_cols = layout.unpadded
    kept = token_attention[layout.base_tokens:].reshape(kept_rows, kept_cols + 1)      # [h', w' + 1]
    tiles = np.full((layout.grid[0] * side, layout.grid[1] * side), np.nan, np.float32)
    top, left = layout.unpadded_offset
    tiles[top:top + kept_rows, left:left + kept_cols] = kept[:, :kept_cols]
    return AnyresAttention(base, tiles, kept[:, kept_cols])


def tile_mosaic(crops, layout: AnyresLayout) -> np.ndarray:
    """The tiles (crops 1.. of [num_crops or more, S, S, ch], base first) put back row-major: [rows * S, cols * S, ch],
    the resized and padded image the tiles were cut from."""
    crops = np.asarray(crops)
    rows, cols = layout.grid
    tiles = crops[1:1 + rows * cols]
    size, channels = tiles.shape[1], tiles.shape[3]
    return tiles.reshape(rows, cols, size, size, channels).transpose(0, 2, 1, 3, 4).reshape(
        rows * size, cols * size, channels)
