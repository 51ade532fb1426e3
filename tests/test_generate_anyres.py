"""Generation and evaluation on LLaVA-NeXT anyres models, and the anyres attention view of notebooks/inspect.

Greedy generation of a converted tiny random LlavaNext model (tests/test_model_anyres.py's CLIP + LLaMA) equals
transformers' (5.24) LlavaNextForConditionalGeneration.generate(do_sample=False) token for token on a batch of two
images of different sizes; HF's pixels come from LlavaNextImageProcessorPil, ours from llava_jax.data.anyres_inputs.
The evaluate / generate CLIs and notebooks/inspect.ipynb run on its `convert hf-to-jax` directory.
"""
import json
import os

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from llava_jax import convert
from llava_jax.attention_view import anyres_attention_grid, tile_mosaic
from llava_jax.data.anyres import anyres_layout
from llava_jax.data.anyres_inputs import AnyresSample, anyres_batch, expand_image_tokens, image_crops, image_layout
from llava_jax.data.images import CLIP_MEAN, CLIP_STD
from llava_jax.evaluate import main as evaluate_main
from llava_jax.generate import generate, left_pad_feature_ids
from llava_jax.generate import main as generate_main
from llava_jax.hf import load_hf_llava
from tests.run_helpers import write_image
from tests.test_notebook import CELL_TIMEOUT_S, NOTEBOOK
from tests.test_model_anyres import (IMAGE_TOKEN, PINPOINTS, SIZES, clip_config, hf_processor, llama_config, photo,
                                     tiny_llava_next)

MAX_NEW_TOKENS = 8
EOS = 2
PAD = 0


@pytest.fixture(scope="module")
def clip_llama_next(tmp_path_factory):
    model = tiny_llava_next(clip_config(), llama_config(), seed=0)
    directory = tmp_path_factory.mktemp("clip_llama_next_generate")
    model.save_pretrained(directory)
    config, params = load_hf_llava(str(directory))
    return dict(model=model, directory=str(directory), config=config, params=params)


def prompts_with_images(config, seed: int = 0):
    """Per image size one prompt: 3 text tokens, <image>, then 4 + k text tokens (so the prompts differ in length),
    image tokens expanded; the images are the sample photos resized."""
    rng = np.random.default_rng(seed)
    samples = []
    for k, size in enumerate(SIZES):
        ids = np.concatenate([rng.integers(3, IMAGE_TOKEN, 3), [IMAGE_TOKEN], rng.integers(3, IMAGE_TOKEN, 4 + k)])
        samples.append(AnyresSample(expand_image_tokens(ids, [size], config), [photo(*size, index=k)]))
    return samples


def our_greedy(config, params, samples) -> list[list[int]]:
    rows = [anyres_batch([s], config, len(s.token_ids), num_images=1, mean=CLIP_MEAN, std=CLIP_STD) for s in samples]
    return generate(config, params, [s.token_ids for s in samples], np.concatenate([r["pixel_values"] for r in rows]),
                    np.concatenate([r["image_mask"] for r in rows]), MAX_NEW_TOKENS, EOS, PAD,
                    image_feature_ids_list=[r["image_feature_ids"][0] for r in rows])


def hf_greedy(model, samples) -> list[list[int]]:
    """transformers' greedy generate on the left-padded batch (the image token suppressed, as ours never samples
    it); each row's new tokens up to its EOS."""
    length = max(len(s.token_ids) for s in samples)
    input_ids = np.full((len(samples), length), PAD, np.int64)
    attention_mask = np.zeros((len(samples), length), np.int64)
    for row, s in enumerate(samples):
        input_ids[row, length - len(s.token_ids):] = s.token_ids
        attention_mask[row, length - len(s.token_ids):] = 1
    processed = hf_processor(CLIP_MEAN, CLIP_STD)([s.images[0] for s in samples], return_tensors="np")
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                             pixel_values=torch.tensor(processed["pixel_values"]),
                             image_sizes=torch.tensor(processed["image_sizes"]), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, eos_token_id=EOS, pad_token_id=PAD, suppress_tokens=[IMAGE_TOKEN])
    new = out[:, length:].numpy().tolist()
    return [row[:row.index(EOS)] if EOS in row else row for row in new]


def test_greedy_generation_matches_transformers_on_two_image_sizes_batched(clip_llama_next):
    samples = prompts_with_images(clip_llama_next["config"])
    assert len({len(s.token_ids) for s in samples}) == 2
    theirs = hf_greedy(clip_llama_next["model"], samples)
    ours = our_greedy(clip_llama_next["config"], clip_llama_next["params"], samples)
    print(f"transformers: {theirs}\nours:         {ours}")
    assert ours == theirs
    assert all(len(row) == MAX_NEW_TOKENS for row in ours), "an early EOS would test fewer decode steps"
    assert len({tuple(row) for row in ours}) == 2 and any(len(set(row)) > 1 for row in ours), "degenerate logits"


def test_batched_generation_equals_each_prompt_alone(clip_llama_next):
    config, params = clip_llama_next["config"], clip_llama_next["params"]
    samples = prompts_with_images(config, seed=1)
    assert our_greedy(config, params, samples) == [our_greedy(config, params, [s])[0] for s in samples]


def test_anyres_generation_without_feature_ids_is_refused(clip_llama_next):
    config, params = clip_llama_next["config"], clip_llama_next["params"]
    sample, = prompts_with_images(config)[:1]
    row = anyres_batch([sample], config, len(sample.token_ids), num_images=1)
    with pytest.raises(ValueError, match="image_feature_ids_list"):
        generate(config, params, [sample.token_ids], row["pixel_values"], row["image_mask"], 2, EOS, PAD)


def test_feature_ids_are_left_padded_with_text():
    padded = left_pad_feature_ids([np.array([-1, 0, 1, -2]), np.array([-1])], 6)
    np.testing.assert_array_equal(padded, [[-1, -1, -1, 0, 1, -2], [-1] * 6])


# ------------------------------------------------------------------------------------- CLIs on a converted run

@pytest.fixture(scope="module")
def converted(clip_llama_next, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "jax"
    convert.main(["hf-to-jax", "--hf", clip_llama_next["directory"], "--out", str(out)])
    return str(out)


def test_evaluate_runs_on_an_anyres_checkpoint(converted, capsys):
    evaluate_main(["--checkpoint", converted, "--set", "data.synthetic_eval_size=3", "--limit", "3",
                   "--batch-size", "2", "--max-new-tokens", "3"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3
    for key in ("accuracy", "blind_accuracy", "majority_accuracy"):
        assert 0.0 <= result[key] <= 1.0


def test_generate_cli_answers_about_an_image_on_an_anyres_checkpoint(converted, tmp_path, capsys):
    image = write_image(str(tmp_path / "image.png"), size=45)
    generate_main(["--checkpoint", converted, "--image", image, "--prompt", "what is it?", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.endswith("\n")   # one answer line (random tokens may decode to little)


# --------------------------------------------------------------------------------- attention on the image

def test_attention_grid_places_tiles_on_the_padded_image():
    """(40, 60) -> a 2 x 2 grid of 4 x 4-feature tiles [8, 8], unpadded to feature rows 1..6 (6 x 8), then one
    newline per row: 16 base tokens + 6 x 9."""
    layout = anyres_layout((40, 60), PINPOINTS, 28, 4, 16)
    assert (layout.grid, layout.unpadded, layout.unpadded_offset, layout.num_tokens) == ((2, 2), (6, 8), (1, 0), 70)
    attention = np.arange(70, dtype=np.float32)
    view = anyres_attention_grid(attention, layout)
    np.testing.assert_array_equal(view.base, np.arange(16).reshape(4, 4))
    assert view.tiles.shape == (8, 8)
    assert np.isnan(view.tiles[0]).all() and np.isnan(view.tiles[7]).all()
    np.testing.assert_array_equal(view.tiles[1], 16 + np.arange(8))          # first kept row: tokens 16..23
    np.testing.assert_array_equal(view.tiles[6], 16 + 5 * 9 + np.arange(8))  # the 6th kept row
    np.testing.assert_array_equal(view.newlines, 16 + 8 + 9 * np.arange(6))
    # every token lands once: base, kept tiles, newlines
    placed = np.concatenate([view.base.ravel(), view.tiles[~np.isnan(view.tiles)], view.newlines])
    np.testing.assert_array_equal(np.sort(placed), attention)


def test_attention_grid_agrees_with_the_token_layout(clip_llama_next):
    """Each tile cell holds the attention of the token whose crop-table row is that tile's patch."""
    config = clip_llama_next["config"]
    layout = image_layout((70, 30), config)
    rows = layout.gather_indices(-2)                                             # token -> crop-table row
    view = anyres_attention_grid(rows.astype(np.float32), layout)
    side, cols = layout.patches_per_side, layout.grid[1]
    for r, c in zip(*np.nonzero(~np.isnan(view.tiles))):
        crop = 1 + (r // side) * cols + c // side
        assert view.tiles[r, c] == crop * layout.tokens_per_crop + (r % side) * side + c % side


def test_tile_mosaic_rebuilds_the_padded_image(clip_llama_next):
    config = clip_llama_next["config"]
    image = photo(40, 60)
    crops = image_crops(image, config)
    mosaic = tile_mosaic(crops, image_layout((40, 60), config))
    assert mosaic.shape == (56, 56, 3)
    np.testing.assert_array_equal(mosaic[28:, :28], crops[3])                     # tile (1, 0)
    np.testing.assert_array_equal(mosaic[:28, 28:], crops[2])                     # tile (0, 1)


def test_attention_grid_refuses_the_wrong_token_count():
    layout = anyres_layout((40, 60), PINPOINTS, 28, 4, 16)
    with pytest.raises(ValueError, match="70 tokens"):
        anyres_attention_grid(np.zeros(69), layout)


def test_inspect_notebook_draws_the_anyres_attention_view(converted):
    """notebooks/inspect.ipynb on the converted anyres model: its anyres cells run and draw a figure."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {**{k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "LLAVA_IMAGE", "LLAVA_QUESTION")},
           "LLAVA_RUN": converted, "JAX_PLATFORMS": "cpu"}
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute(env=env)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "anyres (LLaVA-NeXT)" in printed
    assert any("image/png" in output.get("data", {}) for output in outputs), "the notebook drew no figure"
