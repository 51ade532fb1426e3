"""KV-cache generation: cached decoding equals full recomputation, sampling filters, EOS, padding, the CLI."""
import os

import jax
import numpy as np
import pytest

from llava_jax.generate import (Sampling, generate, generate_answers, generate_tokens, left_pad, main,
                                prompt_example, sample_logits)
from llava_jax.model_params import load_model
from llava_jax.models.llava import LlavaModel, init_params
from tests.run_helpers import write_image, write_tiny_run

IMAGE_TOKEN = 299
PAD = 0
NO_EOS = -1          # an id that never occurs: every row runs to max_new_tokens
NEW_TOKENS = 5


def confident_params(config, seed: int = 0):
    """Random params scaled up so logits are peaked and depend visibly on the image."""
    params = init_params(config, jax.random.key(seed))
    return jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, params)


def prompts_and_images(config, seed: int = 0):
    """Three prompts of different lengths (text, one image's tokens, text) and one image per row."""
    rng = np.random.default_rng(seed)
    prompts = [np.concatenate([rng.integers(0, 256, before), np.full(config.tokens_per_image, IMAGE_TOKEN),
                               rng.integers(0, 256, after)]).astype(np.int32)
               for before, after in [(2, 3), (6, 11), (1, 1)]]
    pixels = rng.standard_normal((3, 1, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    return prompts, pixels, np.ones((3, 1), np.int32)


def full_forward_greedy(config, params, prompts, tokens, pixels) -> np.ndarray:
    """[rows, NEW_TOKENS]: each step's argmax (the image token excluded, as in generation) by a full LlavaModel
    forward without a cache over the prompt and the tokens before it. One causal forward over prompt + tokens gives
    every step at once (position p sees only positions <= p, so right-padding the rows changes nothing)."""
    sequences = [np.concatenate([prompt, row[:-1]]) for prompt, row in zip(prompts, tokens)]
    length = max(map(len, sequences))
    ids = np.stack([np.pad(s, (0, length - len(s)), constant_values=PAD) for s in sequences]).astype(np.int32)
    logits = np.array(jax.jit(LlavaModel(config).apply)({"params": params}, ids, pixels))
    logits[..., IMAGE_TOKEN] = -np.inf
    return np.stack([logits[r, len(p) - 1:len(p) - 1 + NEW_TOKENS].argmax(-1) for r, p in enumerate(prompts)])


@pytest.mark.parametrize("scan", [True, False])
def test_cached_greedy_tokens_equal_argmax_of_full_recomputation(tiny_config, scan):
    config = tiny_config(f"model.scan_layers={str(scan).lower()}").model
    params = confident_params(config)
    prompts, pixels, image_mask = prompts_and_images(config)
    tokens = generate_tokens(config, params, prompts, pixels, image_mask, NEW_TOKENS, NO_EOS, PAD)
    assert tokens.shape == (3, NEW_TOKENS)
    np.testing.assert_array_equal(tokens, full_forward_greedy(config, params, prompts, tokens, pixels))


def test_prompts_are_left_padded_with_per_row_positions():
    padded = left_pad([np.array([5, 6, 7], np.int32), np.array([8], np.int32)], pad_id=PAD)
    length = padded.input_ids.shape[1]
    assert length % 16 == 0
    np.testing.assert_array_equal(padded.input_ids[:, -3:], [[5, 6, 7], [PAD, PAD, 8]])
    np.testing.assert_array_equal(padded.segment_ids.sum(axis=1), [3, 1])
    np.testing.assert_array_equal(padded.positions[:, -3:], [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(padded.lengths, [3, 1])


def test_top_k_sampling_only_ever_draws_the_top_k_tokens():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    keys = jax.random.split(jax.random.key(1), 300)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Sampling(temperature=1.0, top_k=3)))(keys))
    top3 = np.argsort(-np.asarray(logits), axis=1)[:, :3]
    for row in range(4):
        assert set(draws[:, row]) <= set(top3[row])
        assert len(set(draws[:, row])) > 1


def test_top_p_sampling_draws_from_the_smallest_set_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 300)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Sampling(temperature=1.0, top_p=0.7)))(keys))
    assert set(draws[:, 0]) == {0, 1}


def test_temperature_near_zero_sampling_equals_greedy(tiny_config):
    config = tiny_config().model
    params = confident_params(config)
    prompts, pixels, image_mask = prompts_and_images(config)
    greedy = generate_tokens(config, params, prompts, pixels, image_mask, NEW_TOKENS, NO_EOS, PAD)
    sampled = generate_tokens(config, params, prompts, pixels, image_mask, NEW_TOKENS, NO_EOS, PAD,
                              temperature=1e-6, rng=jax.random.key(3))
    np.testing.assert_array_equal(sampled, greedy)


def test_sampling_needs_an_explicit_rng(tiny_config):
    config = tiny_config().model
    prompts, pixels, image_mask = prompts_and_images(config)
    with pytest.raises(ValueError, match="explicit rng"):
        generate_tokens(config, None, prompts, pixels, image_mask, NEW_TOKENS, NO_EOS, PAD, temperature=0.7)


def test_eos_stops_its_row_which_then_emits_pad(tiny_config):
    config = tiny_config().model
    params = confident_params(config)
    prompts, pixels, image_mask = prompts_and_images(config)
    free = generate_tokens(config, params, prompts, pixels, image_mask, NEW_TOKENS, NO_EOS, PAD)
    eos = int(free[0, 2])
    stopped = generate_tokens(config, params, prompts, pixels, image_mask, NEW_TOKENS, eos, PAD)
    for row in range(3):
        end = list(free[row]).index(eos) + 1 if eos in free[row] else NEW_TOKENS
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == PAD).all()
    assert stopped[0, 2] == eos
    answers = generate(config, params, prompts, pixels, image_mask, NEW_TOKENS, eos, PAD)
    assert answers[0] == free[0, :2].tolist()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config, params = write_tiny_run(workdir, step=3)
    return workdir, config, params


def test_load_model_restores_the_saved_config_and_params(tiny_run):
    workdir, config, params = tiny_run
    for path in (workdir, os.path.join(workdir, "checkpoints", "3")):
        loaded_config, loaded_params = load_model(path, ["data.synthetic_eval_size=2"])
        assert loaded_config.model == config.model and loaded_config.data.synthetic_eval_size == 2
        jax.tree.map(np.testing.assert_array_equal, loaded_params, jax.device_get(params))


def test_load_model_refuses_params_of_another_model(tiny_run):
    workdir, _, _ = tiny_run                                    # untied: a saved lm_head the tied model has no place for
    with pytest.raises(ValueError, match="does not hold exactly this model's params .*lm_head"):
        load_model(workdir, ["model.decoder.tie_embeddings=true"])


def test_prompt_plus_new_tokens_beyond_the_position_table_is_refused(tiny_config):
    config = tiny_config("model.decoder.max_position_embeddings=64").model
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="40 tokens \\+ max_new_tokens=30 goes beyond .*max_position_embeddings=64"):
        generate_tokens(config, params, [np.ones(40, np.int32)], None, None, 30, 2, 0)


def test_generate_cli_prints_the_greedy_answer_of_the_checkpoint(tiny_run, tmp_path, capsys):
    workdir, config, params = tiny_run
    image = write_image(str(tmp_path / "image.png"))
    prompt = "What color is the shape?"
    main(["--checkpoint", os.path.join(workdir, "checkpoints", "3"), "--image", image, "--prompt", prompt,
          "--max-new-tokens", "4"])
    expected, = generate_answers(config, params, [prompt_example(config, prompt, image)], max_new_tokens=4)
    assert capsys.readouterr().out == expected + "\n"
