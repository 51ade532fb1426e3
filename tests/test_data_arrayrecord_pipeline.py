"""ArrayRecord sources in the training pipeline: the JSON source's batches, exact resume, disjoint process shares,
mixtures with other sources, and evaluation from data.eval_arrayrecord_path."""
import collections
import json

import numpy as np
import pytest
from data_helpers import (assert_restores_mid_stream, assert_same_batches, ids_of, image_dataset, record, take,
                          write_image, write_json)

from llava_jax.data.pipeline import make_eval_examples, make_train_iterator
from llava_jax.data.sources import eval_sources, train_sources
from llava_jax.data.to_arrayrecord import convert

FAST = ["data.num_threads=2", "data.prefetch=0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(LLaVA JSON file of 24 one-image records "s0".."s23", its conversion into 3 ArrayRecord shards)."""
    directory = tmp_path_factory.mktemp("arrayrecord")
    json_path = image_dataset(directory, 24)
    out = directory / "converted"
    convert(json_path, None, str(out), shards=3, progress=False, workers=2)
    return json_path, str(out)


def arrayrecord_config(tiny_config, path, *overrides):
    return tiny_config("data.source=arrayrecord", f"data.arrayrecord_path={path}", "train.batch_size=4", *FAST,
                       *overrides)


def test_arrayrecord_batches_equal_the_json_sources(tiny_config, converted):
    json_path, out = converted
    from_json = take(make_train_iterator(tiny_config("data.source=llava_json", f"data.json_path={json_path}",
                                                     "train.batch_size=4", *FAST)), 7)
    from_shards = take(make_train_iterator(arrayrecord_config(tiny_config, out)), 7)
    assert_same_batches(from_shards, from_json)                  # 28 samples: past the end of the first epoch


@pytest.mark.parametrize("pack", [False, True])
def test_restoring_the_state_after_k_batches_continues_with_batch_k_plus_1(tiny_config, converted, pack):
    config = arrayrecord_config(tiny_config, converted[1], f"data.pack={str(pack).lower()}", "data.max_length=128",
                                "data.max_images=3")
    iterator = make_train_iterator(config)
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 4)                                 # crosses the epoch boundary (24 records)
    resumed = make_train_iterator(config)
    resumed.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
    assert_same_batches(take(resumed, 4), expected)


def test_restore_with_worker_processes(tiny_config, converted):
    config = arrayrecord_config(tiny_config, converted[1], "data.num_workers=2")
    assert_restores_mid_stream(config)


def test_two_process_shares_are_disjoint_and_cover_the_data(tiny_config, converted):
    config = arrayrecord_config(tiny_config, converted[1])
    shares = [[i for b in take(make_train_iterator(config, p, 2), 12) for i in ids_of(b)] for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == 24                # 2 epochs, per-process batch = 4 // 2
    first_epoch = [shares[0][:12], shares[1][:12]]
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert sorted(first_epoch[0] + first_epoch[1]) == sorted(f"s{i}" for i in range(24))
    assert sorted(shares[0][12:] + shares[1][12:]) == sorted(f"s{i}" for i in range(24))


def test_mixture_of_arrayrecord_and_synthetic_draws_by_weight_and_resumes(tiny_config, converted):
    config = tiny_config("data.source=mixture", "train.batch_size=8", "data.synthetic_size=10", *FAST,
                         f"data.mixture=[{{source: arrayrecord, arrayrecord_path: {converted[1]}, weight: 3}}, "
                         "{source: synthetic, weight: 1}]")
    assert [type(s).__name__ for s, _ in train_sources(config)] == ["ArrayRecordSource", "SyntheticSource"]
    iterator = make_train_iterator(config)
    batches = take(iterator, 5)
    origins = collections.Counter(i[0] for b in batches for i in ids_of(b))
    assert origins == {"s": 40}                                  # "s0".. and "synthetic-train-.." both start with s
    kinds = collections.Counter("synthetic" if i.startswith("synthetic") else "arrayrecord"
                                for b in batches for i in ids_of(b))
    assert kinds == {"arrayrecord": 30, "synthetic": 10}
    state = iterator.get_state()
    expected = take(iterator, 2)
    resumed = make_train_iterator(config)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 2), expected)
    assert [type(s).__name__ for s in eval_sources(config)] == ["SyntheticSource"]


def test_eval_arrayrecord_path_gives_the_eval_examples(tiny_config, tmp_path):
    write_image(tmp_path / "img.png")
    json_path = write_json(tmp_path / "eval.jsonl", [dict(record(f"e{i}"), answers=["red", "crimson"])
                                                     for i in range(3)], jsonl=True)
    convert(json_path, None, str(tmp_path / "eval"), progress=False, workers=1)
    config = tiny_config(f"data.eval_arrayrecord_path={tmp_path / 'eval'}")
    examples = make_eval_examples(config)
    from_json = make_eval_examples(tiny_config(f"data.eval_json_path={json_path}"))
    assert [e["id"] for e in examples] == ["e0", "e1", "e2"] and examples[0]["answers"] == ["red", "crimson"]
    for a, b in zip(examples, from_json):
        np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_eval_needs_a_path_when_every_training_source_is_arrayrecord(tiny_config, converted):
    with pytest.raises(ValueError, match="data.eval_json_path or data.eval_arrayrecord_path: required"):
        eval_sources(arrayrecord_config(tiny_config, converted[1]))
