"""Evaluation: answer normalisation and scoring, the blind (blank-image) and majority baselines, the CLI."""
import json

import jax
import numpy as np
import pytest

import llava_jax.evaluate as evaluate_module
import llava_jax.generate as generate_module
from llava_jax.evaluate import (answer_score, blank_images, evaluate_examples, main, majority_answer,
                                normalize_answer)
from llava_jax.generate import generate_answers
from llava_jax.models.llava import init_params
from tests.run_helpers import write_tiny_run

IMAGE_TOKEN = 299


@pytest.mark.parametrize("text, normalized", [
    ("Red.", "red"),
    ("  The   big\tcircle ", "big circle"),
    ("an apple, a pear", "apple pear"),
    ("Two", "2"),
    ("Don't know!", "dont know"),
    ("3.5 cm", "3.5 cm"),
    ("1,000", "1000"),
    ("left-right", "left right"),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_number_words_and_digits_match():
    assert answer_score("two", ["2"]) == 1.0
    assert answer_score("There are 3.", ["three"]) == 0.0
    assert answer_score("3", ["Three."]) == 1.0


def test_single_reference_is_exact_match():
    assert answer_score("The circle", ["circle"]) == 1.0
    assert answer_score("circles", ["circle"]) == 0.0


def test_several_references_give_vqa_accuracy():
    references = ["yes"] * 2 + ["no"] * 8
    assert answer_score("yes", references) == pytest.approx(2 / 3)
    assert answer_score("no", references) == 1.0
    assert answer_score("maybe", references) == 0.0


def test_majority_answer_counts_normalised_references():
    assert majority_answer([["Red"], ["red."], ["blue"], ["The blue"], ["blue"]]) == "blue"


def examples_for(config, count: int = 4, seed: int = 0):
    """Hand-made evaluation examples: a byte-text question around one image, random image pixels."""
    rng = np.random.default_rng(seed)
    size = config.model.vision.image_size
    return [{"id": f"ex{k}",
             "prompt_ids": np.concatenate([[257], np.full(config.model.tokens_per_image, IMAGE_TOKEN),
                                           rng.integers(97, 123, 5 + k)]).astype(np.int32),
             "pixel_values": rng.standard_normal((1, size, size, 3)).astype(np.float32),
             "image_mask": np.ones(1, np.int32), "answers": [answer]}
            for k, answer in enumerate(["red", "blue", "red", "two"][:count])]


def test_blind_run_passes_blank_pixels_to_the_model(tiny_config, monkeypatch):
    seen = []

    def fake_generate(model_config, params, prompts, pixel_values, *args, **kwargs):
        seen.append(np.array(pixel_values))
        return [[] for _ in prompts]

    monkeypatch.setattr(generate_module, "generate", fake_generate)
    config = tiny_config()
    evaluate_examples(config, None, examples_for(config), batch_size=4, max_new_tokens=2)
    real, blind = seen
    assert np.abs(real).min() > 0
    assert blind.shape == real.shape and not blind.any()


def test_a_model_that_looks_at_the_image_answers_differently_when_blind(tiny_config):
    config = tiny_config()
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, init_params(config.model, jax.random.key(0)))
    examples = examples_for(config)
    seeing = generate_answers(config, params, examples, max_new_tokens=6)
    blind = generate_answers(config, params, blank_images(examples), max_new_tokens=6)
    assert seeing != blind


def test_evaluate_scores_answers_and_both_baselines(tiny_config, monkeypatch):
    """Answers with images: 3 of 4 right; blind: always "red" (2 of 4); the majority answer is "red"."""
    def fake_answers(config, params, examples, max_new_tokens, batch_size):
        if examples[0]["pixel_values"].any():
            return ["Red.", "blue", "green", "2"]
        return ["red"] * len(examples)

    monkeypatch.setattr(evaluate_module, "generate_answers", fake_answers)
    config = tiny_config()
    result = evaluate_examples(config, None, examples_for(config))
    assert result == {"n": 4, "accuracy": 0.75, "blind_accuracy": 0.5, "majority_accuracy": 0.5,
                      "majority_answer": "red"}


def test_evaluate_cli_prints_one_json_object(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    write_tiny_run(workdir)
    main(["--workdir", workdir, "--set", "data.synthetic_eval_size=3", "--limit", "2", "--max-new-tokens", "3"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2
    for key in ("accuracy", "blind_accuracy", "majority_accuracy"):
        assert 0.0 <= result[key] <= 1.0
