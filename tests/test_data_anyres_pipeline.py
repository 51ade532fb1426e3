"""anyres (LLaVA-NeXT / OneVision) samples through the data pipeline: each image's own token count, crops and
image_feature_ids equal to data.anyres_inputs' (and so to transformers', tests/test_model_anyres.py), packing by
offsetting ids, fixed shapes and exact resume, truncation as a counted bad sample, base-only multi-image.

Tiny CLIP + LLaMA (28 px crops of 7 px patches: 16 tokens per crop, 5 crops, at most 16 + 8 x 9 = 88 tokens per
image), byte tokenizer; images are real photos (scikit-learn's sample images) resized to odd sizes, and synthetic.
"""
import functools
import json

import grain
import jax
import numpy as np
import pytest
from data_helpers import write_image, write_json
from PIL import Image
from sklearn import datasets as sklearn_datasets

from llava_jax.config import load_config
from llava_jax.data.anyres_inputs import AnyresSample, anyres_batch, image_feature_ids, image_layout
from llava_jax.data.bad_samples import REASONS, BadSample
from llava_jax.data.examples import Example, ExampleEncoder
from llava_jax.data.images import image_size_hw, image_stats, normalize_pixels
from llava_jax.data.pipeline import make_eval_examples, make_train_iterator
from llava_jax.data.sequences import pack_rows, pad_row
from llava_jax.data.tokenizers import make_tokenizer
from llava_jax.models.llava import LlavaModel, init_params
from tests.helpers import TINY_MODEL

PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
IMAGE_TOKEN, CROPS, PER_CROP = 299, 5, 16
SIZES = [(40, 60), (70, 30), (28, 28), (90, 10), (10, 90), (427, 640), (333, 500), (56, 56)]   # (height, width)


def anyres_config(*overrides):
    return load_config(None, TINY_MODEL + ["model.anyres.enabled=true", f"model.anyres.grid_pinpoints={PINPOINTS}",
                                           "data.max_length=256", "data.max_images=2", *overrides])


@functools.lru_cache(maxsize=None)
def photos():
    return sklearn_datasets.load_sample_images().images                   # 2 x uint8 [427, 640, 3]


def photo(height: int, width: int, index: int = 0) -> Image.Image:
    return Image.fromarray(photos()[index % 2]).resize((width, height), Image.BICUBIC)


def synthetic(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def example(example_id, images, question="What is it?", answer="a photo", image_mode=None) -> Example:
    return Example(example_id, [("user", "<image>" * len(images) + question), ("assistant", answer)], list(images),
                   image_mode=image_mode)


@pytest.fixture(scope="module")
def setup():
    config = anyres_config()
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    params = init_params(config.model, jax.random.key(0))
    return config, encoder, params


def logits(config, params, batch) -> np.ndarray:
    return np.asarray(LlavaModel(config.model).apply(
        {"params": params}, batch["input_ids"], batch["pixel_values"], image_mask=batch["image_mask"],
        segment_ids=batch["segment_ids"], positions=batch["positions"],
        image_feature_ids=batch["image_feature_ids"]))


def device_batch(config, rows) -> dict:
    """Stacked pipeline rows with pixels normalised as the train step does (every crop of a real image slot)."""
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0] if not key.startswith("_")}
    mean, std = image_stats(config)
    crop_mask = np.repeat(batch["image_mask"][..., None], config.model.crops_per_image, axis=-1)
    batch["pixel_values"] = np.asarray(normalize_pixels(batch["pixel_values"], crop_mask, mean, std))
    return batch


def as_anyres_sample(sample, images, base_only=()) -> AnyresSample:
    return AnyresSample(sample["input_ids"], [Image.fromarray(np.asarray(i)) if isinstance(i, np.ndarray) else i
                                              for i in images], base_only)


# ------------------------------------------------------------------------------------------ one sample

@pytest.mark.parametrize("size", SIZES)
def test_each_image_expands_to_its_anyres_layout_token_count(setup, size):
    config, encoder, _ = setup
    for k, image in enumerate([photo(*size), synthetic(*size, seed=1)]):
        sample = encoder.sample(example(f"x{k}", [image]))
        layout = image_layout(size, config.model)
        assert (sample["input_ids"] == IMAGE_TOKEN).sum() == layout.num_tokens
        assert sample["pixel_values"].shape == (1, CROPS, 28, 28, 3) and sample["pixel_values"].dtype == np.uint8
        assert sample["pixel_values"][0, :layout.num_crops].any(axis=(1, 2, 3)).all()
        assert not sample["pixel_values"][0, layout.num_crops:].any()
        expected = image_feature_ids(sample["input_ids"], [size], config.model, num_images=1)
        np.testing.assert_array_equal(sample["image_feature_ids"], expected)
        assert (sample["image_feature_ids"] == -2).sum() == layout.unpadded[0]


def test_image_sizes_come_from_the_header_before_decoding(tmp_path):
    path = write_image(tmp_path / "a.png", size=(60, 40))                 # PIL size is (width, height)
    assert image_size_hw(path) == (40, 60) and image_size_hw(open(path, "rb").read()) == (40, 60)
    assert image_size_hw(synthetic(7, 9)) == (7, 9)
    with pytest.raises(BadSample, match="missing_image"):
        image_size_hw(str(tmp_path / "nope.png"))


def test_sample_gives_the_logits_of_anyres_batch(setup):
    config, encoder, params = setup
    images = [photo(40, 60), photo(90, 10, index=1)]
    samples = [encoder.sample(example("a", images[:1])), encoder.sample(example("b", images[1:], "Hm?", "no"))]
    rows = [pad_row({**s, "_bad": "[]"}, 256, 2, pad_id=256) for s in samples]
    ours = device_batch(config, rows)
    reference = anyres_batch([as_anyres_sample(s, [image]) for s, image in zip(samples, images)], config.model,
                             256, num_images=2, mean=image_stats(config)[0], std=image_stats(config)[1])
    np.testing.assert_array_equal(ours["image_feature_ids"], reference["image_feature_ids"])
    np.testing.assert_array_equal(ours["segment_ids"], reference["segment_ids"])
    real = ours["segment_ids"] > 0
    np.testing.assert_array_equal(ours["input_ids"][real], reference["input_ids"][real])
    np.testing.assert_allclose(logits(config, params, ours)[real], logits(config, params, reference)[real],
                               atol=1e-5, rtol=1e-5)


def test_eval_example_has_normalised_crops_and_feature_ids(setup):
    config, encoder, _ = setup
    evaluated = encoder.eval_example(example("e", [photo(70, 30)]))
    assert evaluated["pixel_values"].shape == (2, CROPS, 28, 28, 3) and evaluated["pixel_values"].dtype == np.float32
    assert evaluated["image_mask"].tolist() == [1, 0]
    assert not evaluated["pixel_values"][0, 4:].any() and not evaluated["pixel_values"][1].any()   # 3 x 1 grid
    expected = image_feature_ids(evaluated["prompt_ids"], [(70, 30)], config.model, num_images=2)
    np.testing.assert_array_equal(evaluated["image_feature_ids"], expected)


# ------------------------------------------------------------------------------------------ multi-image

def test_several_images_are_base_only_by_default(setup):
    config, encoder, params = setup
    images = [photo(40, 60), photo(70, 30, index=1)]
    sample = encoder.sample(example("m", images))
    ids = sample["image_feature_ids"]
    assert (sample["input_ids"] == IMAGE_TOKEN).sum() == 2 * (PER_CROP + 1) and (ids == -2).sum() == 2
    image_ids = ids[ids != -1].tolist()      # each image: its base crop's rows, then one newline (transformers)
    assert image_ids == [*range(PER_CROP), -2, *range(CROPS * PER_CROP, CROPS * PER_CROP + PER_CROP), -2]
    assert sample["pixel_values"][:, 0].any() and not sample["pixel_values"][:, 1:].any()
    np.testing.assert_array_equal(sample["pixel_values"][1, 0], np.asarray(images[1].resize((28, 28), Image.BICUBIC)))
    batch = device_batch(config, [pad_row({**sample, "_bad": "[]"}, 256, 2, pad_id=256)])
    reference = anyres_batch([as_anyres_sample(sample, images, base_only=[True, True])], config.model, 256, 2,
                             *image_stats(config))
    np.testing.assert_array_equal(batch["image_feature_ids"], reference["image_feature_ids"])
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(logits(config, params, batch)[real], logits(config, params, reference)[real],
                               atol=1e-5, rtol=1e-5)


def test_image_mode_of_a_record_and_the_config_choose_base_or_anyres(setup):
    config, encoder, _ = setup
    tokens = [image_layout(size, config.model).num_tokens for size in ((40, 60), (70, 30))]
    two = [photo(40, 60), photo(70, 30)]
    assert (encoder.sample(example("a", two, image_mode="anyres"))["input_ids"] == IMAGE_TOKEN).sum() == sum(tokens)
    assert (encoder.sample(example("b", two[:1], image_mode="base"))["input_ids"] == IMAGE_TOKEN).sum() == PER_CROP + 1
    config_anyres = anyres_config("data.anyres_multi_image=anyres", "data.max_length=320")
    anyres_encoder = ExampleEncoder(config_anyres, make_tokenizer(config_anyres.data, config_anyres.model))
    assert (anyres_encoder.sample(example("c", two))["input_ids"] == IMAGE_TOKEN).sum() == sum(tokens)
    with pytest.raises(BadSample, match="malformed_record.*image_mode"):
        encoder.sample(example("d", two, image_mode="tiles"))


# ------------------------------------------------------------------------------------------ rows and packing

def test_packed_row_is_each_sample_alone_with_offset_ids_and_logits(setup):
    config, encoder, params = setup
    images = [[photo(40, 60)], [photo(70, 30, index=1)], []]
    samples = [{**encoder.sample(example(f"p{k}", ims, answer="yes" * (k + 1))), "_bad": "[]"}
               for k, ims in enumerate(images)]
    dataset = grain.MapDataset.source(samples).to_iter_dataset()
    row = next(iter(pack_rows(dataset, 256, 2, pad_id=256, num_rows=1, image_rows=CROPS * PER_CROP)))
    assert row["num_samples"] == 3 and row["image_feature_ids"].shape == (256,)
    assert row["pixel_values"].shape == (2, CROPS, 28, 28, 3) and row["image_mask"].tolist() == [1, 1]
    for slot, sample in enumerate(samples[:2]):
        np.testing.assert_array_equal(row["pixel_values"][slot], sample["pixel_values"][0])
    for segment, sample in enumerate(samples, start=1):
        ids = row["image_feature_ids"][row["segment_ids"] == segment]
        offset = np.where(sample["image_feature_ids"] >= 0, (segment - 1 if segment < 3 else 0) * CROPS * PER_CROP, 0)
        np.testing.assert_array_equal(ids, sample["image_feature_ids"] + offset)
    assert (row["image_feature_ids"][row["segment_ids"] == 0] == -1).all()
    reference = anyres_batch([[as_anyres_sample(s, ims) for s, ims in zip(samples, images)]], config.model, 256, 2)
    np.testing.assert_array_equal(row["image_feature_ids"], reference["image_feature_ids"][0])
    packed = logits(config, params, device_batch(config, [row]))[0]
    for segment, sample in enumerate(samples, start=1):
        alone = device_batch(config, [pad_row(sample, 256, 2, pad_id=256)])
        expected = logits(config, params, alone)[0, alone["segment_ids"][0] == 1]
        np.testing.assert_allclose(packed[row["segment_ids"] == segment], expected, atol=2e-5, rtol=1e-5)


def test_rows_without_anyres_have_no_new_keys(tiny_config):
    config = tiny_config("data.synthetic_size=8", "train.batch_size=2")
    assert "image_feature_ids" not in next(make_train_iterator(config))


# ------------------------------------------------------------------------------------------ the pipeline

def mixed_dataset(tmp_path, extra=()):
    """12 records: photos / noise of mixed sizes, one text-only, one with two images; plus `extra` records."""
    records = []
    for k in range(12):
        height, width = SIZES[k % len(SIZES)]
        image = photo(height, width, k) if k % 2 else Image.fromarray(synthetic(height, width, k))
        image.save(tmp_path / f"i{k}.png")
        question = "<image>\nWhat is this?" if k != 5 else "No picture?"
        record = {"id": f"r{k}", "conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": f"answer {k}"}]}
        if k != 5:
            record["image"] = f"i{k}.png"
        records.append(record)
    records[7]["conversations"][0]["value"] = "<image><image>\nCompare."
    records[7]["image"] = ["i7.png", "i0.png"]
    return write_json(tmp_path / "data.json", records + list(extra))


def pipeline_config(path, *overrides):
    return anyres_config("data.source=llava_json", f"data.json_path={path}", "train.batch_size=3",
                         "data.bad_fraction_min_samples=1", "data.max_bad_fraction=1.0", *overrides)


@pytest.mark.parametrize("pack", [False, True])
def test_train_iterator_has_fixed_shapes_over_mixed_sizes_and_resumes_exactly(tmp_path, pack):
    config = pipeline_config(mixed_dataset(tmp_path), f"data.pack={str(pack).lower()}")
    iterator = make_train_iterator(config)
    batches = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    for batch in batches + expected:
        shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items() if not k.startswith("_")}
        assert shapes == {"input_ids": ((3, 256), "int32"), "loss_mask": ((3, 256), "float32"),
                          "segment_ids": ((3, 256), "int32"), "positions": ((3, 256), "int32"),
                          "pixel_values": ((3, 2, CROPS, 28, 28, 3), "uint8"), "image_mask": ((3, 2), "int32"),
                          "image_feature_ids": ((3, 256), "int32"), "num_samples": ((3,), "int32"),
                          "bad_samples": ((3, len(REASONS)), "int32")}
        is_image = batch["input_ids"] == IMAGE_TOKEN
        assert ((batch["image_feature_ids"] != -1) == is_image).all()
        ids = batch["image_feature_ids"]
        slots = np.where(ids >= 0, ids // (CROPS * PER_CROP), -1)
        for b in range(3):                                                        # ids only name real slots
            assert set(slots[b][slots[b] >= 0].tolist()) == set(np.flatnonzero(batch["image_mask"][b]).tolist())
    if pack:
        assert max(int(b["num_samples"].max()) for b in batches + expected) >= 2
    resumed = make_train_iterator(config)
    resumed.set_state(state)
    for got, want in zip([next(resumed) for _ in range(3)], expected):
        assert got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_an_image_cut_by_max_length_is_a_counted_bad_sample(tmp_path):
    long_question = {"id": "long", "image": "i7.png", "conversations": [
        {"from": "human", "value": "q" * 40 + "<image>"}, {"from": "gpt", "value": "a"}]}   # 56 x 56: 88 tokens
    path = mixed_dataset(tmp_path, [long_question])
    config = pipeline_config(path, "data.max_length=120", "data.max_images=1")
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    record = Example("long", [("user", "q" * 40 + "<image>"), ("assistant", "a")], [str(tmp_path / "i7.png")])
    with pytest.raises(BadSample, match="too_long.*image tokens end at") as info:
        encoder.sample(record)
    assert info.value.example_id == "long"
    iterator = make_train_iterator(config)
    counts = sum(next(iterator)["bad_samples"].sum(axis=0) for _ in range(5))    # 15 draws of 13 records
    bad = dict(zip(REASONS, counts.tolist()))
    assert bad["too_long"] >= 1 and bad["too_many_images"] >= 1                   # record r7 has two images
    assert sum(bad.values()) == bad["too_long"] + bad["too_many_images"]


def test_eval_examples_through_the_pipeline(tmp_path):
    config = pipeline_config("unused.json", f"data.eval_json_path={mixed_dataset(tmp_path)}")
    examples = make_eval_examples(config, limit=4)
    assert [e["pixel_values"].shape for e in examples] == [(2, CROPS, 28, 28, 3)] * 4
    assert all(len(e["image_feature_ids"]) == len(e["prompt_ids"]) for e in examples)


def test_config_checks_max_length_against_the_largest_anyres_image():
    with pytest.raises(ValueError, match="data.max_length.*max_tokens_per_image=88"):
        anyres_config("data.max_length=80", "data.max_images=1")
    anyres_config("data.max_length=96", "data.max_images=2")                       # 2 base-only images: 34
    with pytest.raises(ValueError, match="data.max_length.*176 image tokens"):
        anyres_config("data.max_length=96", "data.max_images=2", "data.anyres_multi_image=anyres")


def test_a_llava_json_record_carries_its_image_mode(tmp_path):
    from llava_jax.data.sources import LlavaJsonSource
    records = [{"id": "a", "image": ["x.png", "y.png"], "image_mode": "anyres",
                "conversations": [{"from": "human", "value": "<image><image>?"}, {"from": "gpt", "value": "ok"}]},
               {"id": "b", "image": "x.png",
                "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "ok"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    source = LlavaJsonSource(str(tmp_path / "data.json"), str(tmp_path))
    assert [source[0].image_mode, source[1].image_mode] == ["anyres", None]
