"""Fixed-shape rows from variable-length samples: truncation, right padding, and packing.

Public surface: `fit_length(ids, mask, max_length, image_token_id, example_id, key)`, `pad_row(sample, ...)` (one
sample per row), `pack_rows(dataset, ..., image_rows=0)` (greedy first-fit of several samples per row, Grain,
resumable) and `offset_feature_ids(...)` (anyres ids of a packed row).
Both produce the same row: input_ids, loss_mask, segment_ids (1..k, 0 = padding), positions (from 0 per
segment) [T]; uint8 pixel_values [I, S, S, 3] (normalised on device by the train step), image_mask [I] (the
row's images in token order, zeros after); num_samples (samples in the row) and bad_samples [len(REASONS)] (bad
records the row's samples replaced, by reason: summed over the global batch by the train step, so every process
sees the same counts); and the host-only "_ids" / "_bad" (JSON lists, for error messages).
With anyres (samples carrying "image_feature_ids"): pixel_values uint8 [I, C, S, S, 3] and image_feature_ids int32
[T] (-1 text and padding, -2 image_newline, else a row of the row's crop table), each sample's ids offset by its
first image slot x `image_rows` (C x tokens_per_image), so every segment reads exactly its own crops.
"""
from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from llava_jax.data.bad_samples import BadSample, bad_sample_vector
from llava_jax.models.anyres_features import TEXT     # image_feature_ids of text and padding


def fit_length(ids: np.ndarray, mask: np.ndarray, max_length: int, image_token_id: int, example_id: str,
               key: str = "data.max_length") -> tuple[np.ndarray, np.ndarray]:
    """Right-truncates to max_length (the config `key` it comes from). Never cuts through image tokens: a sample
    with an image token beyond max_length, or with no supervised token left within it, raises BadSample("too_long")."""
    if len(ids) <= max_length:
        return ids, mask
    if (ids[max_length:] == image_token_id).any():
        last_image = int(np.nonzero(ids == image_token_id)[0][-1])
        raise BadSample("too_long", f"{len(ids)} tokens and its image tokens end at {last_image + 1} > "
                        f"{key}={max_length}", example_id)
    if not mask[:max_length].any():
        raise BadSample("too_long", f"{len(ids)} tokens and no answer token within {key}={max_length}",
                        example_id)
    return ids[:max_length], mask[:max_length]


def pad_row(sample: dict[str, Any], max_length: int, max_images: int, pad_id: int) -> dict[str, Any]:
    """One sample right-padded to a row (segment 1; padding has segment 0, position 0, pad_id)."""
    length, num_images = len(sample["input_ids"]), len(sample["image_mask"])
    input_ids = np.full(max_length, pad_id, np.int32)
    input_ids[:length] = sample["input_ids"]
    loss_mask = np.zeros(max_length, np.float32)
    loss_mask[:length] = sample["loss_mask"]
    segment_ids = np.zeros(max_length, np.int32)
    segment_ids[:length] = 1
    positions = np.zeros(max_length, np.int32)
    positions[:length] = np.arange(length)
    pixel_values = np.zeros((max_images, *sample["pixel_values"].shape[1:]), sample["pixel_values"].dtype)
    pixel_values[:num_images] = sample["pixel_values"]
    image_mask = np.zeros(max_images, np.int32)
    image_mask[:num_images] = 1
    row = {"input_ids": input_ids, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions,
           "pixel_values": pixel_values, "image_mask": image_mask, "_ids": json.dumps([sample["_id"]]),
           "_bad": sample["_bad"], "num_samples": np.int32(1), "bad_samples": bad_sample_vector(sample["_bad"])}
    if "image_feature_ids" in sample:                     # anyres: the sample's ids already start at slot 0
        feature_ids = np.full(max_length, TEXT, np.int32)
        feature_ids[:length] = sample["image_feature_ids"]
        row["image_feature_ids"] = feature_ids
    return row


def offset_feature_ids(feature_ids: np.ndarray, token_segments: np.ndarray, image_segments: np.ndarray,
                       image_rows: int) -> np.ndarray:
    """A packed row's image_feature_ids [T] with each segment's crop rows moved past the image slots of the
    segments before it (image_segments [I]: the segment of each image slot, 0 = empty)."""
    feature_ids = np.array(feature_ids, np.int32)
    for segment in range(1, int(token_segments.max(initial=0)) + 1):
        first_slot = int(((image_segments > 0) & (image_segments < segment)).sum())
        feature_ids[(token_segments == segment) & (feature_ids >= 0)] += first_slot * image_rows
    return feature_ids


class _PackedToRow:
    """Grain map: Grain's packed dict -> the row layout (anyres: image_rows > 0, ids offset per segment)."""

    def __init__(self, image_rows: int = 0):
        self.image_rows = image_rows

    def __call__(self, packed: dict[str, Any]) -> dict[str, Any]:
        bad = [entry for entries in packed["_bad"] for entry in json.loads(entries)]
        row = {"input_ids": packed["input_ids"], "loss_mask": packed["loss_mask"],
               "segment_ids": packed["input_ids_segment_ids"], "positions": packed["input_ids_positions"],
               "pixel_values": packed["pixel_values"], "image_mask": packed["image_mask"],
               "_ids": json.dumps(list(packed["_id"])), "_bad": json.dumps(bad),
               "num_samples": np.int32(len(packed["_id"])), "bad_samples": bad_sample_vector(json.dumps(bad))}
        if self.image_rows:
            row["image_feature_ids"] = offset_feature_ids(packed["image_feature_ids"], packed["input_ids_segment_ids"],
                                                          packed["image_mask_segment_ids"], self.image_rows)
        return row


def pack_rows(dataset: grain.IterDataset, max_length: int, max_images: int, pad_id: int, num_rows: int,
              image_rows: int = 0) -> grain.IterDataset:
    """Greedy first-fit of samples, in stream order, into `num_rows` rows at a time (Grain's FirstFitPack:
    a row is full when its tokens reach max_length or its images reach max_images). A sample's images land in
    its row's image slots in the order its image tokens appear, so each row's images fill its image tokens in
    order. The iterator state is the parent state at the last emitted group plus a row counter: exact resume.
    anyres: `image_rows` = model.crops_per_image x tokens_per_image (the crop-table rows of one image slot); the
    samples carry image_feature_ids, offset here by their first image slot."""
    length_struct = {"input_ids": max_length, "loss_mask": max_length, "pixel_values": max_images,
                     "image_mask": max_images}
    padding_struct = {"input_ids": pad_id, "loss_mask": 0, "pixel_values": 0, "image_mask": 0}
    if image_rows:
        length_struct["image_feature_ids"], padding_struct["image_feature_ids"] = max_length, TEXT
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct=length_struct, num_packing_bins=num_rows, shuffle_bins=False,
        meta_features=("_id", "_bad"), padding_struct=padding_struct)
    return packed.map(_PackedToRow(image_rows))
