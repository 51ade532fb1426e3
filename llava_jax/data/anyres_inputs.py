"""LLaVA-NeXT anyres model inputs on the host: crops, expanded image tokens and the `image_feature_ids` that tell
the model (models/anyres_features.py) which crop feature or image_newline each image token takes.

Public surface: `AnyresSample(token_ids, images, base_only)`; `image_layout(size_hw, config)`;
`image_token_count(size_hw, config, base_only)`; `image_rows(size_hw, config, base_only)`; `image_crops(image, config,
base_only)`; `expand_image_tokens(token_ids, image_sizes_hw, config, base_only)`; `image_feature_ids(input_ids,
image_sizes_hw, config, num_images, first_image, base_only)`; `crop_pixels(images, config, num_images, base_only)`;
`anyres_batch(rows, config, length, num_images, mean, std)` (a row is one sample or several packed ones, whose images
are stacked along the image axis: their ids are only offset by the image slot).
A "base-only" image (OneVision's multi-image mode; data.anyres_multi_image) is its base crop alone: 1 crop,
tokens_per_image tokens (the base crop's rows), then one image_newline, as transformers' pack_image_features does
for an image of a single crop. Crops are padded with black (0), as
LlavaNextImageProcessor pads before normalising.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from llava_jax.config import ModelConfig
from llava_jax.data.anyres import AnyresLayout, anyres_crops, anyres_layout
from llava_jax.data.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, normalize_pixels
from llava_jax.models.anyres_features import NEWLINE, TEXT

_STATS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


@dataclass
class AnyresSample:
    """One sample: token ids whose image tokens are already expanded (`expand_image_tokens`), and its RGB images
    in the order their tokens appear."""
    token_ids: np.ndarray
    images: Sequence[Image.Image] = ()
    base_only: Sequence[bool] = ()        # per image (empty: every image anyres)


def _require_anyres(config: ModelConfig) -> None:
    if not config.anyres.enabled:
        raise ValueError("model.anyres.enabled is false: these inputs are for LLaVA-NeXT anyres models")


def image_layout(size_hw: Sequence[int], config: ModelConfig) -> AnyresLayout:
    """The anyres layout of an image of (height, width) `size_hw` under `config`'s pinpoints and vision tower."""
    _require_anyres(config)
    v = config.vision
    return anyres_layout(size_hw, config.anyres.grid_pinpoints, v.image_size, v.image_size // v.patch_size,
                         config.tokens_per_image)


def _size_hw(image: Image.Image) -> tuple[int, int]:
    return image.size[1], image.size[0]


def _flags(base_only: Optional[Sequence[bool]], count: int) -> list[bool]:
    flags = [False] * count if base_only is None or len(base_only) == 0 else [bool(b) for b in base_only]
    if len(flags) != count:
        raise ValueError(f"base_only has {len(flags)} entries for {count} image(s)")
    return flags


def image_token_count(size_hw: Sequence[int], config: ModelConfig, base_only: bool = False) -> int:
    """LLM tokens of one image: its anyres layout's num_tokens, or tokens_per_image + 1 when base-only (the base
    crop's features, then one image_newline: transformers' pack_image_features for a single crop)."""
    return config.tokens_per_image + 1 if base_only else image_layout(size_hw, config).num_tokens


def image_rows(size_hw: Sequence[int], config: ModelConfig, base_only: bool = False) -> np.ndarray:
    """int32 [image_token_count]: rows of ONE image's crop table ([C * P], crop c / patch p at c * P + p) its tokens
    take in order, NEWLINE for image_newline; a base-only image takes the base crop's rows 0..P-1, then NEWLINE."""
    if base_only:
        _require_anyres(config)
        return np.append(np.arange(config.tokens_per_image, dtype=np.int32), np.int32(NEWLINE))
    return image_layout(size_hw, config).gather_indices(NEWLINE)


def image_crops(image: Image.Image, config: ModelConfig, base_only: bool = False) -> np.ndarray:
    """uint8 [n, S, S, 3]: the RGB image's anyres crops (base first, then the tiles row-major, black padding), or its
    base crop alone (n = 1) when base-only."""
    _require_anyres(config)
    size = config.vision.image_size
    image = image.convert("RGB")
    if base_only:
        return np.asarray(image.resize((size, size), Image.BICUBIC))[None]
    return np.stack([np.asarray(crop) for crop in anyres_crops(image, config.anyres.grid_pinpoints, size)])


def expand_image_tokens(token_ids, image_sizes_hw: Sequence[Sequence[int]], config: ModelConfig,
                        base_only: Optional[Sequence[bool]] = None) -> np.ndarray:
    """int32 ids where the k-th image token (one `<image>` per image) becomes image k's `image_token_count` copies,
    as LlavaNextProcessor expands them."""
    token_ids = np.asarray(token_ids)
    where = np.flatnonzero(token_ids == config.image_token_id)
    if len(where) != len(image_sizes_hw):
        raise ValueError(f"{len(where)} image token(s) (model.image_token_id={config.image_token_id}) for "
                         f"{len(image_sizes_hw)} image(s); put one <image> per image")
    counts = np.ones(len(token_ids), np.int64)
    flags = _flags(base_only, len(image_sizes_hw))
    counts[where] = [image_token_count(size, config, base) for size, base in zip(image_sizes_hw, flags)]
    return np.repeat(token_ids, counts).astype(np.int32)


def image_feature_ids(input_ids, image_sizes_hw: Sequence[Sequence[int]], config: ModelConfig,
                      num_images: int, first_image: int = 0, base_only: Optional[Sequence[bool]] = None
                      ) -> np.ndarray:
    """int32 [T] for one row: -1 (text) off the image tokens; on them, in order, each image's tokens in
    pack_image_features order as rows of the row's crop table (image slot i = first_image + k, crop c, patch p ->
    (i * C + c) * P + p) or -2 (image_newline). `num_images` is the image axis I of pixel_values."""
    input_ids = np.asarray(input_ids)
    crops, tokens = config.crops_per_image, config.tokens_per_image
    if first_image + len(image_sizes_hw) > num_images:
        raise ValueError(f"{first_image + len(image_sizes_hw)} images do not fit the {num_images} image slots "
                         "(the image axis of pixel_values)")
    pieces = []
    for k, (size, base) in enumerate(zip(image_sizes_hw, _flags(base_only, len(image_sizes_hw)))):
        rows = image_rows(size, config, base)
        pieces.append(np.where(rows == NEWLINE, NEWLINE, rows + (first_image + k) * crops * tokens))
    features = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    is_image = input_ids == config.image_token_id
    if int(is_image.sum()) != len(features):
        raise ValueError(f"{int(is_image.sum())} image tokens (model.image_token_id={config.image_token_id}) but the "
                         f"{len(image_sizes_hw)} image(s) of sizes {[tuple(s) for s in image_sizes_hw]} take "
                         f"{len(features)}; expand them with expand_image_tokens (and do not truncate inside one)")
    ids = np.full(input_ids.shape, TEXT, np.int32)
    ids[is_image] = features
    return ids


def crop_pixels(images: Sequence[Image.Image], config: ModelConfig, num_images: int,
                base_only: Optional[Sequence[bool]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [num_images, C, S, S, 3] crops in anyres_crops order, zero-padded; int32 [num_images, C] crop mask)
    of RGB `images` (at most num_images); C = model.crops_per_image."""
    _require_anyres(config)
    if len(images) > num_images:
        raise ValueError(f"{len(images)} images do not fit the {num_images} image slots")
    size, crops = config.vision.image_size, config.crops_per_image
    pixels = np.zeros((num_images, crops, size, size, 3), np.uint8)
    mask = np.zeros((num_images, crops), np.int32)
    for i, (image, base) in enumerate(zip(images, _flags(base_only, len(images)))):
        crops_i = image_crops(image, config, base)
        pixels[i, :len(crops_i)] = crops_i
        mask[i, :len(crops_i)] = 1
    return pixels, mask


def anyres_batch(rows: Sequence[Union[AnyresSample, Sequence[AnyresSample]]], config: ModelConfig, length: int,
                 num_images: int, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
    """Model inputs for `rows` (each one sample, or a list of samples packed into one row): input_ids,
    segment_ids (1.. per sample, 0 = padding), positions (from 0 per sample), attention_mask [B, length];
    pixel_values float32 [B, num_images, C, S, S, 3] normalised with mean / std (default: the tower kind's; padded
    crops are 0), image_mask [B, num_images], image_feature_ids [B, length]."""
    _require_anyres(config)
    default_mean, default_std = _STATS[config.vision.kind]
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    batch = len(rows)
    out = {"input_ids": np.zeros((batch, length), np.int32), "segment_ids": np.zeros((batch, length), np.int32),
           "positions": np.zeros((batch, length), np.int32),
           "image_feature_ids": np.full((batch, length), TEXT, np.int32),
           "image_mask": np.zeros((batch, num_images), np.int32)}
    pixels = []
    for b, row in enumerate(rows):
        samples = [row] if isinstance(row, AnyresSample) else list(row)
        start, images, base_only = 0, [], []
        for segment, sample in enumerate(samples, start=1):
            ids = np.asarray(sample.token_ids, np.int32)
            end = start + len(ids)
            if end > length:
                raise ValueError(f"row {b}: its samples take {end}+ tokens, more than length={length}")
            out["input_ids"][b, start:end] = ids
            out["segment_ids"][b, start:end] = segment
            out["positions"][b, start:end] = np.arange(len(ids))
            flags = _flags(sample.base_only, len(sample.images))
            out["image_feature_ids"][b, start:end] = image_feature_ids(
                ids, [_size_hw(image) for image in sample.images], config, num_images, first_image=len(images),
                base_only=flags)
            images += list(sample.images)
            base_only += flags
            start = end
        row_pixels, crop_mask = crop_pixels(images, config, num_images, base_only)
        pixels.append(np.asarray(normalize_pixels(row_pixels, crop_mask, mean, std)))
        out["image_mask"][b, :len(images)] = 1
    out["pixel_values"] = np.stack(pixels)
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    return out
