"""Sequences: truncation never cuts image tokens, right padding, and packing boundaries / images per row."""
import json

import grain
import numpy as np
import pytest

from llava_jax.data.bad_samples import REASONS, BadSample
from llava_jax.data.sequences import fit_length, pack_rows, pad_row

IMAGE, PAD = 99, 0


def test_fit_length_keeps_short_sequences_and_truncates_text_on_the_right():
    ids = np.array([1, IMAGE, IMAGE, 5, 6, 7, 8], np.int32)
    mask = np.array([0, 0, 0, 0, 1, 1, 1], np.float32)
    assert fit_length(ids, mask, 7, IMAGE, "x")[0].tolist() == ids.tolist()
    cut_ids, cut_mask = fit_length(ids, mask, 5, IMAGE, "x")
    assert cut_ids.tolist() == [1, IMAGE, IMAGE, 5, 6] and cut_mask.tolist() == [0, 0, 0, 0, 1]


def test_fit_length_never_cuts_through_image_tokens():
    ids = np.array([1, 2, IMAGE, IMAGE, IMAGE, 5, 6], np.int32)
    mask = np.array([0, 0, 0, 0, 0, 1, 1], np.float32)
    with pytest.raises(BadSample, match="too_long.*image tokens end at 5 > data.max_length=4") as info:
        fit_length(ids, mask, 4, IMAGE, "sample-7")
    assert info.value.example_id == "sample-7"


def test_fit_length_rejects_samples_whose_answer_does_not_fit():
    ids = np.array([1, 2, 3, 4, 5, 6], np.int32)
    mask = np.array([0, 0, 0, 0, 1, 1], np.float32)
    with pytest.raises(BadSample, match="too_long.*no answer token"):
        fit_length(ids, mask, 4, IMAGE, "x")


def make_sample(sample_id, length, num_images, image_tokens=2):
    """Sample with `num_images` image runs first, then text; loss on the last two tokens."""
    image_ids = np.full(num_images * image_tokens, IMAGE)
    ids = np.concatenate([image_ids, 10 + np.arange(length - len(image_ids))])
    mask = np.zeros(length, np.float32)
    mask[-2:] = 1
    pixels = np.stack([np.full((2, 2, 3), 10 * sample_id + k, np.uint8) for k in range(num_images)]
                      ) if num_images else np.zeros((0, 2, 2, 3), np.uint8)
    return {"input_ids": ids.astype(np.int32), "loss_mask": mask, "pixel_values": pixels,
            "image_mask": np.ones(num_images, np.int32), "_id": f"s{sample_id}", "_bad": "[]"}


def test_pad_row_layout():
    row = pad_row(make_sample(3, 5, 1), max_length=8, max_images=2, pad_id=PAD)
    assert row["input_ids"].tolist() == [IMAGE, IMAGE, 10, 11, 12, PAD, PAD, PAD]
    assert row["segment_ids"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert row["loss_mask"].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert row["image_mask"].tolist() == [1, 0] and row["pixel_values"][:, 0, 0, 0].tolist() == [30, 0]
    assert json.loads(row["_ids"]) == ["s3"] and row["num_samples"] == 1


def packed(samples, max_length, max_images, num_rows=2):
    dataset = grain.MapDataset.source(samples).to_iter_dataset()
    return list(pack_rows(dataset, max_length, max_images, PAD, num_rows))


def test_packing_segments_positions_and_loss_masks_at_boundaries():
    rows = packed([make_sample(0, 4, 1), make_sample(1, 3, 0), make_sample(2, 5, 1)], max_length=8, max_images=2)
    first = rows[0]                                                  # s0 (4 tokens) + s1 (3 tokens)
    assert json.loads(first["_ids"]) == ["s0", "s1"] and first["num_samples"] == 2
    assert first["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert first["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert first["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1, 1, 0]  # segment starts are never targets
    assert first["input_ids"].tolist() == [IMAGE, IMAGE, 10, 11, 10, 11, 12, PAD]
    assert first["image_mask"].tolist() == [1, 0]
    assert json.loads(rows[1]["_ids"]) == ["s2"]


def test_packing_respects_max_images_and_keeps_images_in_token_order():
    samples = [make_sample(i, 4, 1) for i in range(5)]
    rows = packed(samples, max_length=32, max_images=2, num_rows=3)
    for row in rows:
        ids = json.loads(row["_ids"])
        assert len(ids) <= 2
        assert (row["input_ids"] == IMAGE).sum() == 2 * row["image_mask"].sum()
        owners = [int(value) // 10 for value in row["pixel_values"][row["image_mask"] == 1, 0, 0, 0]]
        assert [f"s{owner}" for owner in owners] == ids             # image k belongs to segment k
    assert sorted(i for row in rows for i in json.loads(row["_ids"])) == [f"s{i}" for i in range(5)]


def test_packing_reports_bad_samples_of_every_segment():
    samples = [make_sample(0, 3, 0), make_sample(1, 3, 0)]
    samples[1]["_bad"] = json.dumps([{"id": "x", "reason": "too_long", "where": "f", "detail": "d"}])
    (row,) = packed(samples, max_length=8, max_images=0, num_rows=1)
    assert [entry["id"] for entry in json.loads(row["_bad"])] == ["x"]
    assert dict(zip(REASONS, row["bad_samples"].tolist())) == {reason: int(reason == "too_long") for reason in REASONS}
