"""LLaVA-NeXT "anyres" on the host (numpy / PIL only), exactly as transformers 5.24 implements it: which grid an
image gets, its crops (base image first, then the tiles row-major), and the order of its image tokens.

Public surface: `DEFAULT_GRID_PINPOINTS`, `check_pinpoints`, `select_best_resolution`, `max_crops`, `max_tokens`,
`anyres_crops(image, pinpoints, crop_size, pad_color)`, `unpadded_grid(original_hw, grid_hw)`,
`anyres_layout(image_size_hw, pinpoints, crop_size, patches_per_side, tokens_per_crop) -> AnyresLayout`, whose
`gather_indices(newline_index)` picks, from a flat [crops * tokens_per_crop + newline] feature table, the rows in
`LlavaNextModel.pack_image_features` order (tests/test_data_anyres.py checks all of it against transformers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.anyres_grid import (DEFAULT_GRID_PINPOINTS, check_pinpoints, max_crops,  # noqa: F401 (re-exported)
                                   max_tokens, select_best_resolution)


def _fitted_size(image_size_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: the limiting side becomes the target's, the other
    min(ceil(side * scale), target)."""
    original_height, original_width = image_size_hw
    target_height, target_width = target_hw
    scale_width, scale_height = target_width / original_width, target_height / original_height
    if scale_width < scale_height:
        return min(math.ceil(original_height * scale_width), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_height), target_width)


def anyres_crops(image: Image.Image, pinpoints: Sequence[Sequence[int]], crop_size: int,
                 pad_color: tuple[int, int, int] = (0, 0, 0)) -> list[Image.Image]:
    """RGB image -> [base, tiles...], each crop_size x crop_size RGB. The base is the whole image squashed (bicubic,
    aspect not kept); the tiles cut, row-major, the image resized keeping its aspect to the best pinpoint (bicubic)
    and centred on a `pad_color` canvas (an odd remainder goes bottom / right), as LlavaNextImageProcessor does.
    transformers pads with 0 (black) before normalising: keep the default to match it."""
    check_pinpoints(pinpoints, crop_size)
    width, height = image.size
    target_height, target_width = select_best_resolution((height, width), pinpoints)
    fitted_height, fitted_width = _fitted_size((height, width), (target_height, target_width))
    canvas = Image.new("RGB", (target_width, target_height), tuple(pad_color))
    canvas.paste(image.resize((fitted_width, fitted_height), Image.BICUBIC),
                 ((target_width - fitted_width) // 2, (target_height - fitted_height) // 2))
    tiles = [canvas.crop((left, top, left + crop_size, top + crop_size))
             for top in range(0, target_height, crop_size) for left in range(0, target_width, crop_size)]
    return [image.resize((crop_size, crop_size), Image.BICUBIC)] + tiles


def unpadded_grid(original_hw: Sequence[int], grid_hw: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rows, cols) kept, (first row, first col)) of a [grid_h, grid_w] feature grid once the padding around an
    image of original (height, width) is cut off: transformers' `unpad_image`, with its `int(round(x, 7))` and its
    symmetric cut of (grid - new) // 2 on both sides (so an odd difference keeps one padded row / column)."""
    original_height, original_width = original_hw
    current_height, current_width = grid_hw
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return (current_height - 2 * padding, current_width), (padding, 0)
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return (current_height, current_width - 2 * padding), (0, padding)


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's tokens come from. Crop 0 is the base image, crops 1.. the grid's tiles row-major; each
    crop gives a patches_per_side x patches_per_side feature grid, `tokens_per_crop` (= its square) rows of the
    flat table, crop k's token j at row k * tokens_per_crop + j."""
    image_size_hw: tuple[int, int]
    best_resolution_hw: tuple[int, int]
    grid: tuple[int, int]                 # tiles (rows, cols)
    patches_per_side: int
    tokens_per_crop: int
    unpadded: tuple[int, int]             # feature rows / cols kept of the [rows * pps, cols * pps] tile features
    unpadded_offset: tuple[int, int]      # first feature row / col kept

    @property
    def num_crops(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def base_tokens(self) -> int:
        return self.tokens_per_crop

    @property
    def num_tokens(self) -> int:
        """base_tokens + h' * (w' + 1): the kept tile features with an image_newline after each feature row."""
        rows, cols = self.unpadded
        return self.base_tokens + rows * (cols + 1)

    def gather_indices(self, newline_index: int) -> np.ndarray:
        """int32 [num_tokens]: table rows in pack_image_features order (base crop's tokens, then the kept feature
        grid row by row, each row followed by `newline_index`, the table's image_newline row)."""
        if 0 <= newline_index < self.num_crops * self.tokens_per_crop:
            raise ValueError(f"newline_index {newline_index} is one of this image's feature rows "
                             f"[0, {self.num_crops * self.tokens_per_crop}); put image_newline after the crops")
        side = self.patches_per_side
        rows = self.unpadded_offset[0] + np.arange(self.unpadded[0])            # [h'] feature rows of the grid
        cols = self.unpadded_offset[1] + np.arange(self.unpadded[1])            # [w']
        crop = 1 + (rows // side)[:, None] * self.grid[1] + (cols // side)[None, :]            # [h', w']
        token = (rows % side)[:, None] * side + (cols % side)[None, :]                          # [h', w']
        tiles = crop * self.tokens_per_crop + token
        tiles = np.concatenate([tiles, np.full((len(rows), 1), newline_index)], axis=1)         # [h', w' + 1]
        return np.concatenate([np.arange(self.base_tokens), tiles.reshape(-1)]).astype(np.int32)


def anyres_layout(image_size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], crop_size: int,
                  patches_per_side: int, tokens_per_crop: int) -> AnyresLayout:
    """The layout of an image of (height, width) image_size_hw. `tokens_per_crop` is what the tower + strategy hand
    the projector per crop; transformers views every crop's features as a patches_per_side-square grid, so it must
    be patches_per_side ** 2 (its pack_image_features fails on "full" with CLIP's class token: 577 at 336 / 14)."""
    check_pinpoints(pinpoints, crop_size)
    if tokens_per_crop != patches_per_side ** 2:
        raise ValueError(
            f"anyres needs {patches_per_side}^2 = {patches_per_side ** 2} tokens per crop, the tower gives "
            f"{tokens_per_crop}: set model.vision_feature_select_strategy to 'default' for a tower with a class "
            "token (CLIP), 'full' for one without (SigLIP), as transformers' LlavaNext only handles these")
    height, width = (int(side) for side in image_size_hw)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size (height, width) = {(height, width)} must be positive")
    best_height, best_width = select_best_resolution((height, width), pinpoints)
    grid = (best_height // crop_size, best_width // crop_size)
    unpadded, offset = unpadded_grid((height, width), (grid[0] * patches_per_side, grid[1] * patches_per_side))
    return AnyresLayout(image_size_hw=(height, width), best_resolution_hw=(best_height, best_width), grid=grid,
                        patches_per_side=patches_per_side, tokens_per_crop=tokens_per_crop, unpadded=unpadded,
                        unpadded_offset=offset)
