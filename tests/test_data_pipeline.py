"""Pipeline: batch layout, determinism, exact resume (threads, packing, worker processes, Orbax), process shards."""
import json

import numpy as np
import pytest
from data_helpers import assert_restores_mid_stream, assert_same_batches, ids_of, image_token_counts, take

from llava_jax.data.pipeline import make_eval_examples, make_train_iterator

SYNTHETIC = ["data.synthetic_size=24", "train.batch_size=4"]


def test_batches_have_the_documented_layout(tiny_config):
    config = tiny_config(*SYNTHETIC)
    batch = next(make_train_iterator(config))
    shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items() if not k.startswith("_")}
    assert shapes == {"input_ids": ((4, 64), "int32"), "loss_mask": ((4, 64), "float32"),
                      "segment_ids": ((4, 64), "int32"), "positions": ((4, 64), "int32"),
                      "pixel_values": ((4, 1, 28, 28, 3), "uint8"), "image_mask": ((4, 1), "int32"),
                      "num_samples": ((4,), "int32"), "bad_samples": ((4, 7), "int32")}
    assert image_token_counts(batch, 299).tolist() == (batch["image_mask"].sum(1) * 16).tolist()
    real = batch["segment_ids"] > 0
    assert (batch["input_ids"][~real] == 256).all() and (batch["loss_mask"][~real] == 0).all()
    assert (batch["positions"][real] == np.nonzero(real)[1]).all()
    assert (batch["loss_mask"][:, 0] == 0).all() and (batch["loss_mask"].sum(1) >= 2).all()
    assert batch["num_samples"].tolist() == [1] * 4 and [json.loads(b) for b in batch["_bad"]] == [[]] * 4


def test_same_seed_gives_identical_batches_and_another_seed_does_not(tiny_config):
    first = take(make_train_iterator(tiny_config(*SYNTHETIC)), 3)
    assert_same_batches(first, take(make_train_iterator(tiny_config(*SYNTHETIC)), 3))
    other = take(make_train_iterator(tiny_config(*SYNTHETIC, "train.seed=1")), 3)
    assert [ids_of(b) for b in other] != [ids_of(b) for b in first]


@pytest.mark.parametrize("pack", [False, True])
def test_restoring_the_state_after_k_batches_continues_with_batch_k_plus_1(tiny_config, pack):
    config = tiny_config(*SYNTHETIC, f"data.pack={str(pack).lower()}", "data.max_length=128", "data.max_images=3")
    iterator = make_train_iterator(config)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 3)
    resumed = make_train_iterator(config)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), expected)


def test_restore_with_worker_processes(tiny_config):
    config = tiny_config(*SYNTHETIC, "data.num_workers=2")
    assert_restores_mid_stream(config)


def test_orbax_checkpoint_of_the_iterator(tiny_config, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    config = tiny_config(*SYNTHETIC)
    iterator = make_train_iterator(config)
    take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 2)
        resumed = make_train_iterator(config)
        manager.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches(take(resumed, 2), expected)


def test_two_process_shards_are_disjoint_and_cover_the_data(tiny_config):
    config = tiny_config(*SYNTHETIC)
    shards = [[i for b in take(make_train_iterator(config, p, 2), 6) for i in ids_of(b)] for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 12                   # per-process batch = 4 // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"synthetic-train-{i}" for i in range(24))


def test_epochs_repeat_with_a_new_shuffle(tiny_config):
    ids = [i for b in take(make_train_iterator(tiny_config(*SYNTHETIC)), 12) for i in ids_of(b)]
    first, second = ids[:24], ids[24:]
    assert sorted(first) == sorted(second) and len(set(first)) == 24
    assert first != second


def test_packed_rows_hold_several_samples_and_respect_max_images(tiny_config):
    config = tiny_config(*SYNTHETIC, "data.pack=true", "data.max_length=128", "data.max_images=2")
    for batch in take(make_train_iterator(config), 3):
        assert (batch["num_samples"] == 2).all()                   # ~55-token samples, 2 images per row at most
        assert image_token_counts(batch, 299).tolist() == (batch["image_mask"].sum(1) * 16).tolist()
        starts = batch["positions"] == 0
        assert (batch["loss_mask"][starts] == 0).all()
        assert batch["segment_ids"].max() == 2


def test_rows_longer_than_a_sample_pack_samples_within_max_sample_length(tiny_config):
    """data.max_sample_length: 128-token rows of samples of at most 64 tokens (positions restart per sample), so
    data.max_length may exceed model.decoder.max_position_embeddings; longer samples are counted as too long."""
    config = tiny_config(*SYNTHETIC, "data.pack=true", "data.max_length=128", "data.max_sample_length=64",
                         "data.max_images=2", "model.decoder.max_position_embeddings=64")
    for batch in take(make_train_iterator(config), 2):
        assert batch["input_ids"].shape[1] == 128 and (batch["num_samples"] == 2).all()
        assert batch["positions"].max() < 64
    short = tiny_config(*SYNTHETIC, "data.pack=true", "data.max_length=128", "data.max_sample_length=40",
                        "data.max_images=2")
    with pytest.raises(Exception, match="too_long: .* tokens and no answer token within data.max_sample_length=40"):
        next(make_train_iterator(short))                           # every ~50-token sample is too long
    for overrides, key in ((["data.max_sample_length=200"], "data.max_sample_length"),
                           (["data.max_sample_length=64", "data.pack=false"], "data.max_sample_length"),
                           (["data.max_length=256"], "data.max_length")):
        with pytest.raises(ValueError, match=key):
            tiny_config(*SYNTHETIC, "data.max_length=128", "model.decoder.max_position_embeddings=128", *overrides)


def test_eval_examples_stop_where_the_answer_starts(tiny_config):
    config = tiny_config(*SYNTHETIC)
    examples = make_eval_examples(config, limit=5)
    assert [e["id"] for e in examples] == [f"synthetic-eval-{i}" for i in range(5)]
    example = examples[0]
    assert example["prompt_ids"][0] == 257 and (example["prompt_ids"] == 299).sum() == 16
    assert bytes(example["prompt_ids"][-1:].tolist()) == b"\n"
    assert example["pixel_values"].shape == (1, 28, 28, 3) and example["image_mask"].tolist() == [1]
    assert len(example["answers"]) == 1 and example["answers"][0].isalpha()
    assert len(make_eval_examples(config)) == 500
