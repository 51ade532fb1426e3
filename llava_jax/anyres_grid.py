"""LLaVA-NeXT anyres grids, pure arithmetic (the config validates with it; `llava_jax.data.anyres` builds on it).

Public surface: `DEFAULT_GRID_PINPOINTS`, `check_pinpoints(pinpoints, crop_size)`,
`select_best_resolution(image_size_hw, pinpoints)`, `max_crops(pinpoints, crop_size)`,
`max_tokens(pinpoints, crop_size, patches_per_side)`.
"""
from __future__ import annotations

from typing import Sequence

# transformers' LlavaNextConfig / LlavaNextImageProcessor default, each (height, width).
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def check_pinpoints(pinpoints: Sequence[Sequence[int]], crop_size: int) -> None:
    """Raises ValueError unless `pinpoints` is a non-empty list of positive (height, width) multiples of crop_size:
    the processor tiles with ceil(side / crop) and the model with side // crop, so other sizes disagree."""
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty; give at least one (height, width), e.g. [[336, 672]]")
    for pinpoint in pinpoints:
        if len(pinpoint) != 2 or any(int(side) != side or side <= 0 for side in pinpoint):
            raise ValueError(f"image_grid_pinpoints entry {list(pinpoint)} is not a (height, width) pair of "
                             "positive integers")
        if any(side % crop_size for side in pinpoint):
            raise ValueError(f"image_grid_pinpoints entry {list(pinpoint)} is not a multiple of the crop size "
                             f"{crop_size} (model.vision.image_size) on both sides")


def select_best_resolution(image_size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most image pixels when the image is fitted inside it; ties go to
    the least padding, then to the first listed (transformers' `select_best_resolution`, same float arithmetic)."""
    original_height, original_width = image_size_hw
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        fitted_width, fitted_height = int(original_width * scale), int(original_height * scale)
        effective = min(fitted_width * fitted_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (int(height), int(width))
    return best_fit


def max_crops(pinpoints: Sequence[Sequence[int]], crop_size: int) -> int:
    """Crops the vision tower sees for one image at most: the base image plus the largest grid's tiles."""
    check_pinpoints(pinpoints, crop_size)
    return 1 + max((height // crop_size) * (width // crop_size) for height, width in pinpoints)


def max_tokens(pinpoints: Sequence[Sequence[int]], crop_size: int, patches_per_side: int) -> int:
    """An upper bound on `AnyresLayout.num_tokens` over all image sizes, reached by images with a grid's aspect:
    the base crop plus the whole grid with one newline per feature row (2928 for the defaults at 336 / 24)."""
    check_pinpoints(pinpoints, crop_size)
    return patches_per_side ** 2 + max(
        (height // crop_size * patches_per_side) * (width // crop_size * patches_per_side + 1)
        for height, width in pinpoints)
