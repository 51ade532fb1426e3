"""Synthetic shapes VQA: determinism, disjoint splits, balanced answers, faithful images, and the CLI."""
import collections

import numpy as np
import pytest

from llava_jax.data import synthetic
from llava_jax.data.examples import ExampleEncoder
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.synthetic import COLORS, SLOTS, SyntheticSource, render, scene_at, split_of
from llava_jax.data.tokenizers import make_tokenizer


def test_samples_are_deterministic_in_seed_and_index():
    a, b = SyntheticSource("train", 50, 32, seed=3), SyntheticSource("train", 50, 32, seed=3)
    assert a[7].turns == b[7].turns
    assert np.array_equal(np.asarray(a[7].images[0]), np.asarray(b[7].images[0]))
    other = SyntheticSource("train", 50, 32, seed=4)
    assert [a[i].turns for i in range(10)] != [other[i].turns for i in range(10)]


def test_train_and_eval_splits_are_disjoint():
    train = {scene_at(0, "train", i).description() for i in range(3000)}
    held_out = {scene_at(0, "eval", i).description() for i in range(500)}
    assert len(held_out) == 500 and not train & held_out
    assert all(split_of(scene_at(0, "eval", i)) == "eval" for i in range(50))


def test_answers_are_balanced_so_a_blind_model_stays_near_chance():
    answers = collections.defaultdict(collections.Counter)
    for i in range(4000):
        scene = scene_at(0, "train", i)
        answers[scene.kind][scene.answer] += 1
    vocabulary = {"color": 4, "shape": 3, "count": 3, "position": 4}
    for kind, counts in answers.items():
        assert len(counts) == vocabulary[kind]
        assert max(counts.values()) / sum(counts.values()) < 1 / vocabulary[kind] + 0.05, (kind, counts)
    blind = sum(max(c.values()) for c in answers.values()) / 4000     # best answer per question kind
    assert blind < 0.34


@pytest.mark.parametrize("index", range(20))
def test_images_show_each_object_in_its_slot_and_colour(index):
    scene, size = scene_at(0, "train", index), 48
    pixels = np.asarray(render(scene, size)).astype(int)
    cell = size / 3
    for obj in scene.objects:
        column, row = SLOTS[obj.slot]
        x = int((column + 0.5 + obj.dx / 100) * cell)
        y = int((row + 0.5 + obj.dy / 100) * cell + obj.size / 800 * cell)   # a little below the centre
        assert tuple(pixels[y, x]) == COLORS[obj.color], obj
    painted = (pixels != 255).any(axis=-1)
    assert painted[int(cell):int(2 * cell), int(cell):int(2 * cell)].sum() == 0      # centre cell stays empty


def test_cli_writes_llava_json_that_encodes_like_the_in_memory_source(tmp_path, tiny_config):
    synthetic.main(["--out", str(tmp_path), "--num", "6", "--split", "eval", "--image-size", "28", "--seed", "2"])
    from_disk = LlavaJsonSource(str(tmp_path / "eval.json"))
    in_memory = SyntheticSource("eval", 6, 28, seed=2)
    config = tiny_config()
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    for i in range(6):
        disk, memory = encoder.sample(from_disk[i]), encoder.sample(in_memory[i])
        assert disk["_id"] == memory["_id"] == f"synthetic-eval-{i}"
        assert disk["input_ids"].tolist() == memory["input_ids"].tolist()
        np.testing.assert_array_equal(disk["pixel_values"], memory["pixel_values"])
