"""data.synthetic_question_kinds: only the chosen question kinds in both splits; null keeps today's scenes."""
import collections
import json

import pytest

from llava_jax.data import synthetic
from llava_jax.data.pipeline import make_eval_examples
from llava_jax.data.sources import eval_sources, train_sources
from llava_jax.data.synthetic import QUESTION_KINDS, SyntheticSource, scene_at, split_of


@pytest.mark.parametrize("split", ["train", "eval"])
def test_only_the_chosen_kinds_are_asked_in_either_split(split):
    kinds = collections.Counter(scene_at(0, split, i, ["count", "color"]).kind for i in range(300))
    assert set(kinds) == {"color", "count"}
    assert min(kinds.values()) > 100                  # both kinds drawn about equally often


def test_a_single_kind_gives_only_that_kind_with_balanced_answers():
    answers = collections.Counter()
    for i in range(400):
        scene = scene_at(0, "train", i, ["position"])
        assert scene.kind == "position" and scene.question.startswith("Where is the")
        answers[scene.answer] += 1
    assert set(answers) == {"top", "bottom", "left", "right"}
    assert max(answers.values()) / 400 < 0.25 + 0.06


def test_all_kinds_in_any_order_give_exactly_the_default_scenes():
    every_kind = list(reversed(QUESTION_KINDS))
    for split in ("train", "eval"):
        for i in range(200):
            assert scene_at(0, split, i, every_kind) == scene_at(0, split, i) == scene_at(0, split, i, None)


def test_default_source_is_unchanged_by_the_new_argument():
    default, explicit = SyntheticSource("train", 20, 32, seed=1), SyntheticSource("train", 20, 32, 1, None)
    assert [default[i].turns for i in range(20)] == [explicit[i].turns for i in range(20)]
    assert repr(default) == "SyntheticSource(split=train, size=20, image_size=32, seed=1)"


def test_splits_stay_disjoint_with_chosen_kinds():
    train = {scene_at(0, "train", i, ["shape"]).description() for i in range(1500)}
    held_out = {scene_at(0, "eval", i, ["shape"]).description() for i in range(200)}
    assert not train & held_out
    assert all(split_of(scene_at(0, "eval", i, ["shape"])) == "eval" for i in range(50))


def test_the_config_key_reaches_train_and_eval_sources(tiny_config):
    config = tiny_config("data.synthetic_question_kinds=[color, shape, count]", "data.synthetic_size=40",
                         "data.synthetic_eval_size=30")
    (train_source, _), = train_sources(config)
    eval_source, = eval_sources(config)
    for source in (train_source, eval_source):
        assert source.question_kinds == ("color", "shape", "count")
        assert not any(source[i].turns[0][1].split("\n")[1].startswith("Where") for i in range(len(source)))


def test_eval_examples_of_a_held_out_kind_answer_with_positions(tiny_config):
    config = tiny_config("data.synthetic_question_kinds=[position]", "data.synthetic_eval_size=12")
    examples = make_eval_examples(config)
    assert len(examples) == 12
    assert {answer for example in examples for answer in example["answers"]} <= set(synthetic.SLOTS)


@pytest.mark.parametrize("kinds", [[], ["size"]])
def test_an_empty_or_unknown_kind_list_is_an_error_naming_the_key(kinds):
    with pytest.raises(ValueError, match="data.synthetic_question_kinds"):
        SyntheticSource("train", 10, 32, question_kinds=kinds)


def test_cli_writes_only_the_chosen_kinds(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--num", "8", "--image-size", "24", "--kinds", "count"])
    records = json.loads((tmp_path / "train.json").read_text())
    assert all(r["conversations"][0]["value"].endswith("How many shapes are there?") for r in records)
    assert all(r["conversations"][1]["value"] in synthetic.COUNT_WORDS for r in records)
