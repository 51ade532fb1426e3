"""Sources: LLaVA JSON / JSONL, TFDS (array_record, no TensorFlow), mixtures, and malformed JSON files."""
import collections
import json

import numpy as np
import pytest
from data_helpers import build_tfds, ids_of, record, write_image, write_json

from llava_jax.data.pipeline import make_eval_examples, make_train_iterator
from llava_jax.data.sources import LlavaJsonSource, TfdsSource, eval_sources


def test_llava_json_list_and_jsonl_give_the_same_examples(tmp_path):
    records = [record("a"), record("b", image=["x/1.png"]), record("c", image=None)]
    for path, jsonl in ((tmp_path / "d.json", False), (tmp_path / "d.jsonl", True)):
        source = LlavaJsonSource(write_json(path, records, jsonl), image_root="/images")
        assert len(source) == 3
        a, b, c = source[0], source[1], source[2]
        assert (a.id, a.turns, a.images) == ("a", [("user", "<image>\nWhat color is it?"), ("assistant", "red")],
                                             ["/images/img.png"])
        assert b.images == ["/images/x/1.png"] and c.images == []
    assert source.describe(2) == f"{tmp_path / 'd.jsonl'} line 3"


def test_llava_json_images_are_read_lazily_relative_to_the_json_directory(tmp_path):
    source = LlavaJsonSource(write_json(tmp_path / "d.json", [record("a", image="not/yet.png")]))
    assert source[0].images == [str(tmp_path / "not/yet.png")]            # no file needed to index


def test_malformed_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]')
    with pytest.raises(ValueError, match=r"broken.json:3:14: malformed JSON"):
        LlavaJsonSource(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(record("a")) + "\n\n" + '{"id": "b", oops}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:3:\d+: malformed JSON line"):
        LlavaJsonSource(str(path))


def test_json_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text('{"id": "a"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        LlavaJsonSource(str(path))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build_tfds(data_dir)
    return str(data_dir)


def test_tfds_source_reads_image_question_answer(tfds_dir):
    source = TfdsSource("tiny_vqa", tfds_dir, "train", "image", "question", "answer")
    assert len(source) == 6
    examples = [source[i] for i in range(len(source))]
    numbers = sorted(int(e.turns[1][1].split()[1]) for e in examples)
    assert numbers == list(range(6))
    example = examples[0]
    assert example.turns[0][1].startswith("<image>\nQuestion ") and isinstance(example.images[0], bytes)
    assert example.id == "tiny_vqa/train/0"


def test_tfds_caption_mode_and_unknown_feature_key(tfds_dir):
    captions = TfdsSource("tiny_vqa", tfds_dir, "test", "image", None, "answer")
    assert captions[0].turns[0] == ("user", "<image>")
    with pytest.raises(ValueError, match="data.tfds_answer_key: 'caption' is not a feature"):
        TfdsSource("tiny_vqa", tfds_dir, "train", "image", "question", "caption")


def test_tfds_train_batches_and_eval_split(tiny_config, tfds_dir):
    config = tiny_config("data.source=tfds", "data.tfds_name=tiny_vqa", f"data.tfds_data_dir={tfds_dir}",
                         "train.batch_size=3", "data.num_threads=0", "data.prefetch=0")
    batch = next(make_train_iterator(config))
    assert batch["pixel_values"].shape == (3, 1, 28, 28, 3) and batch["image_mask"].tolist() == [[1]] * 3
    examples = make_eval_examples(config)
    assert len(examples) == 3 and all(e["id"].startswith("tiny_vqa/test/") for e in examples)
    assert sorted(e["answers"][0] for e in examples) == ["answer 100", "answer 101", "answer 102"]


def test_mixture_draws_sources_by_weight(tiny_config, tmp_path):
    write_image(tmp_path / "img.png")
    json_path = write_json(tmp_path / "d.json", [record(f"j{i}") for i in range(10)])
    config = tiny_config("data.source=mixture", "train.batch_size=8", "data.synthetic_size=10",
                         f"data.mixture=[{{source: llava_json, json_path: {json_path}, weight: 3}}, "
                         "{source: synthetic, weight: 1}]")
    iterator = make_train_iterator(config)
    origins = collections.Counter(i[0] for _ in range(5) for i in ids_of(next(iterator)))
    assert origins == {"j": 30, "s": 10}
    assert [type(s).__name__ for s in eval_sources(config)] == ["SyntheticSource"]


def test_eval_json_path_wins_for_evaluation(tiny_config, tmp_path):
    write_image(tmp_path / "img.png")
    eval_path = write_json(tmp_path / "eval.json", [dict(record("e0"), answers=["red", "crimson"])])
    config = tiny_config(f"data.eval_json_path={eval_path}")
    (example,) = make_eval_examples(config)
    assert example["id"] == "e0" and example["answers"] == ["red", "crimson"]
    assert example["prompt_ids"].dtype == np.int32 and example["image_mask"].tolist() == [1]
