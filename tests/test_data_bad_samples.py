"""Bad input: every kind, under policy skip (replaced by the next valid record and counted) and error (raises)."""
import collections
import json

import pytest
from data_helpers import close, ids_of, image_dataset, write_image

from llava_jax.data.bad_samples import BadDataError, BadSampleMonitor
from llava_jax.data.pipeline import make_eval_examples, make_train_iterator

BAD_INDEX = 3


def set_conversations(value):
    return lambda r, tmp: r.update(conversations=value)


BAD_KINDS = {
    "missing_image": ("missing_image", lambda r, tmp: r.update(image="nope.png")),
    "corrupt_image": ("corrupt_image", lambda r, tmp: (tmp / r["image"]).write_bytes(b"\x89PNG garbage")),
    "zero_byte_image": ("empty_image", lambda r, tmp: (tmp / r["image"]).write_bytes(b"")),
    "missing_conversations": ("malformed_record", lambda r, tmp: r.pop("conversations")),
    "wrong_role": ("malformed_record", lambda r, tmp: r["conversations"][1].update({"from": "bot"})),
    "answer_first": ("malformed_record", lambda r, tmp: r["conversations"].reverse()),
    "empty_answer": ("malformed_record", lambda r, tmp: r["conversations"][1].update(value="  ")),
    "two_placeholders_one_image": ("image_count_mismatch",
                                   lambda r, tmp: r["conversations"][0].update(value="<image> <image> Q?")),
    "image_without_placeholder": ("image_count_mismatch",
                                  lambda r, tmp: r["conversations"][0].update(value="Q?")),
    "too_many_images": ("too_many_images", lambda r, tmp: (write_image(tmp / "second.png"), r.update(
        image=[r["image"], "second.png"]), r["conversations"][0].update(value="<image><image>Q?"))),
    "answer_beyond_max_length": ("too_long", lambda r, tmp: r["conversations"][0].update(value="<image>" + "q" * 80)),
    "image_beyond_max_length": ("too_long", lambda r, tmp: r["conversations"][0].update(value="q" * 60 + "<image>")),
}


def dataset_with_bad_record(tmp_path, kind, num=8):
    path = image_dataset(tmp_path, num)
    records = json.load(open(path))
    BAD_KINDS[kind][1](records[BAD_INDEX], tmp_path)
    json.dump(records, open(path, "w"))
    return path


def config_for(tiny_config, path, *overrides):
    return tiny_config("data.source=llava_json", f"data.json_path={path}", "train.batch_size=4",
                       "data.bad_fraction_min_samples=1", "data.max_bad_fraction=1.0", *overrides)


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_skip_replaces_the_bad_record_by_the_next_valid_one_and_counts_it(tiny_config, tmp_path, kind):
    config = config_for(tiny_config, dataset_with_bad_record(tmp_path, kind))
    iterator = make_train_iterator(config)
    monitor = BadSampleMonitor(config)
    epoch = [next(iterator), next(iterator)]                        # 8 samples = one epoch
    for batch in epoch:
        assert len(batch["input_ids"]) == 4
        monitor.update(batch)
    drawn = collections.Counter(i for batch in epoch for i in ids_of(batch))
    assert drawn["s3"] == 0 and drawn["s4"] == 2 and sum(drawn.values()) == 8
    reason = BAD_KINDS[kind][0]
    assert monitor.counts() == {reason: 1} and monitor.total_seen == 8
    (entry,) = [e for batch in epoch for row in batch["_bad"] for e in json.loads(str(row))]
    assert entry["id"] == "s3" and entry["where"].endswith(f"data.json record {BAD_INDEX}")


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_error_policy_raises_naming_file_record_id_and_reason(tiny_config, tmp_path, kind):
    config = config_for(tiny_config, dataset_with_bad_record(tmp_path, kind), "data.bad_sample_policy=error",
                        "data.num_threads=0", "data.prefetch=0")
    iterator = make_train_iterator(config)
    with pytest.raises(BadDataError, match=rf"data.json record {BAD_INDEX} \(id s3\): {BAD_KINDS[kind][0]}"):
        next(iterator)
        next(iterator)


def test_record_that_is_not_an_object_is_malformed(tiny_config, tmp_path):
    path = image_dataset(tmp_path, 4)
    records = json.load(open(path))
    records[1] = ["not", "a", "record"]
    json.dump(records, open(path, "w"))
    config = config_for(tiny_config, path, "data.bad_sample_policy=error", "data.num_threads=0", "data.prefetch=0")
    with pytest.raises(BadDataError, match=r"record 1 \(id \?\): malformed_record: record is a list"):
        next(make_train_iterator(config))


def test_monitor_stops_training_above_max_bad_fraction_listing_ids_and_reasons(tiny_config, tmp_path):
    path = dataset_with_bad_record(tmp_path, "missing_image")
    config = config_for(tiny_config, path, "data.max_bad_fraction=0.1", "data.bad_fraction_min_samples=8")
    iterator, monitor = make_train_iterator(config), BadSampleMonitor(config)
    batches = [next(iterator), next(iterator)]
    with pytest.raises(BadDataError, match=r"1 of 8 samples were bad[\s\S]*record 3 \(id s3\): missing_image"):
        for batch in batches:
            monitor.update(batch)
    tolerant = BadSampleMonitor(config_for(tiny_config, path, "data.max_bad_fraction=0.2",
                                                  "data.bad_fraction_min_samples=8"))
    for batch in batches:
        tolerant.update(batch)
    assert tolerant.counts() == {"missing_image": 1}


def test_bad_sample_counts_travel_in_batches_from_worker_processes(tiny_config, tmp_path):
    config = config_for(tiny_config, dataset_with_bad_record(tmp_path, "corrupt_image"), "data.num_workers=1")
    iterator, monitor = make_train_iterator(config), BadSampleMonitor(config)
    for _ in range(2):
        monitor.update(next(iterator))
    close(iterator)
    assert monitor.counts() == {"corrupt_image": 1} and monitor.total_seen == 8


def test_bad_eval_examples_are_skipped_or_raise(tiny_config, tmp_path):
    path = dataset_with_bad_record(tmp_path, "empty_answer", num=5)
    examples = make_eval_examples(tiny_config(f"data.eval_json_path={path}"))
    assert [e["id"] for e in examples] == ["s0", "s1", "s2", "s4"]
    with pytest.raises(BadDataError, match=r"record 3 \(id s3\): malformed_record"):
        make_eval_examples(tiny_config(f"data.eval_json_path={path}", "data.bad_sample_policy=error"))
