"""The LLaVA-1.5 recipe as the README states it, end to end, on tiny random Hugging Face towers with the presets'
vocabulary (LLaMA-style, 32000 tokens: Mistral's real sentencepiece model from mistral-common) and real photos
(scikit-learn's sample images): `convert towers` -> stage 1 (configs/llava15_7b_stage1.yaml) -> stage 2
(init_from stage 1) -> `convert jax-to-hf` -> transformers' LlavaForConditionalGeneration gives our logits and our
greedy answer. Only sizes are overridden."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          LlavaForConditionalGeneration)

from llava_jax.generate import generate, prompt_example
from llava_jax.model_params import load_model
from llava_jax.models.llava import LlavaModel
from tests.real_tokenizers import SENTENCEPIECE_V1

pytestmark = pytest.mark.slow
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ["model.vision.image_size=56", "model.vision.hidden_size=32", "model.vision.num_layers=3",
         "model.vision.num_heads=4", "model.vision.mlp_dim=64", "model.decoder.hidden_size=64",
         "model.decoder.num_layers=2", "model.decoder.num_heads=4", "model.decoder.num_kv_heads=4",
         "model.decoder.mlp_dim=128", "data.max_length=256", "data.num_threads=2", "train.batch_size=8",
         "train.steps=3", "train.warmup_steps=1", "train.log_every=1", "checkpoint.every_steps=3"]
QUESTION = "What is in the picture?"
NEW_TOKENS = 8


def randomized(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def write_towers(root):
    """hf/clip (CLIPVisionModel) and hf/vicuna (LlamaForCausalLM + tokenizer files, as vicuna-7b-v1.5 ships)."""
    vision = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=64)
    randomized(CLIPVisionModel(vision), 0).save_pretrained(root / "hf" / "clip")
    language = LlamaConfig(vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=128, rms_norm_eps=1e-5,
                           max_position_embeddings=4096)
    randomized(LlamaForCausalLM(language), 1).save_pretrained(root / "hf" / "vicuna")
    shutil.copy(SENTENCEPIECE_V1, root / "hf" / "vicuna" / "tokenizer.model")
    with open(root / "hf" / "vicuna" / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
                   "add_eos_token": False, "pad_token": None, "model_max_length": 4096}, f)


def real_photos(directory, count):
    """Crops of scikit-learn's two sample photos (427x640) at assorted aspect ratios, as JPEG files."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    os.makedirs(directory, exist_ok=True)
    names = []
    for k in range(count):
        photo = photos[k % 2]
        top, left = 13 * k % 200, 29 * k % 300
        crop = photo[top:top + 120 + 37 * (k % 5), left:left + 90 + 61 * (k % 4)]
        names.append(f"photo{k}.jpg")
        Image.fromarray(crop).save(os.path.join(directory, names[-1]), quality=90)
    return names


def write_data(root):
    pretrain = root / "data" / "LLaVA-Pretrain"
    captions = [{"id": f"cap{k}", "image": name, "conversations": [
        {"from": "human", "value": "Give a brief description of the image.\n<image>"},
        {"from": "gpt", "value": f"photo number {k}, {'a temple' if k % 2 == 0 else 'a flower'}"}]}
        for k, name in enumerate(real_photos(pretrain / "images", 16))]
    with open(pretrain / "blip_laion_cc_sbu_558k.json", "w") as f:
        json.dump(captions, f)
    instructions = [{"id": f"vqa{k}", "image": f"coco/{name}", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?" if k % 3 else "What is shown? <image>"},
        {"from": "gpt", "value": "A temple." if k % 2 == 0 else "A flower."},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": f"{k % 7} meters, more or less."}]}
        for k, name in enumerate(real_photos(root / "data" / "coco", 12))]
    instructions += [{"id": f"text{k}", "conversations": [
        {"from": "human", "value": f"Count to {k}."}, {"from": "gpt", "value": " ".join(map(str, range(k + 1)))}]}
        for k in range(4)]
    with open(root / "data" / "llava_v1_5_mix665k.json", "w") as f:
        json.dump(instructions, f)
    return root / "data" / "coco" / "photo1.jpg"


def run(root, *args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO_ROOT, "LLAVA_JAX_KEEP_MALLOC": "1"})
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The README's commands, run in a fresh directory laid out as the presets expect."""
    root = tmp_path_factory.mktemp("recipe")
    write_towers(root)
    image = write_data(root)
    run(root, "-m", "llava_jax.convert", "towers", "--vision", "hf/clip", "--language", "hf/vicuna", "--out",
        "checkpoints/llava15-7b-towers")
    for stage in (1, 2):
        run(root, f"{REPO_ROOT}/train.py", "--config", f"{REPO_ROOT}/configs/llava15_7b_stage{stage}.yaml", "--set",
            *SIZES)
    run(root, "-m", "llava_jax.convert", "jax-to-hf", "--src", "runs/llava15_7b_stage2", "--out", "llava-hf")
    return root, image


def test_convert_towers_writes_what_the_stage1_preset_loads(recipe):
    root, _ = recipe
    tokenizer = AutoTokenizer.from_pretrained(root / "checkpoints" / "llava15-7b-towers" / "tokenizer")
    assert (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token, tokenizer.pad_token_id) == \
        (32000, "<pad>", 32001)
    config, _ = load_model(str(root / "checkpoints" / "llava15-7b-towers"))
    assert (config.model.decoder.vocab_size, config.model.image_token_id) == (32064, 32000)
    for stage in (1, 2):
        with open(root / "runs" / f"llava15_7b_stage{stage}" / "metrics.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
        assert len(losses) == 3 and np.isfinite(losses).all()


def test_exported_stage2_model_gives_our_logits_and_greedy_answer_in_transformers(recipe, monkeypatch):
    root, image = recipe
    monkeypatch.chdir(root)                       # the presets' paths are relative to where the commands ran
    config, params = load_model("runs/llava15_7b_stage2", ["model.dtype=float32"])
    example = prompt_example(config, QUESTION, str(image))
    ids, pixels, image_mask = example["prompt_ids"], example["pixel_values"], example["image_mask"]
    assert (ids == 32000).sum() == config.model.tokens_per_image and ids[0] == 1    # BOS, then LLaVA's prompt

    reference = LlavaForConditionalGeneration.from_pretrained(root / "llava-hf", dtype=torch.float32).eval()
    nchw = torch.tensor(pixels[:1].transpose(0, 3, 1, 2))
    ours = LlavaModel(config.model).apply({"params": params}, ids[None], pixels[None], image_mask=image_mask[None])
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids[None], dtype=torch.long), pixel_values=nchw).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4

    eos, pad = 2, 32001
    answer, = generate(config.model, params, [ids], pixels[None], image_mask[None], NEW_TOKENS, eos, pad)
    with torch.no_grad():
        tokens = reference.generate(input_ids=torch.tensor(ids[None], dtype=torch.long), pixel_values=nchw,
                                    max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                    suppress_tokens=[32000])[0, len(ids):].tolist()
    assert answer == (tokens[:tokens.index(eos)] if eos in tokens else tokens)
    assert len(answer) > 0                        # a real answer, not an immediate end of sequence

    printed = run(root, "-m", "llava_jax.generate", "--workdir", "runs/llava15_7b_stage2", "--image", image,
                  "--prompt", QUESTION, "--max-new-tokens", NEW_TOKENS, "--set", "model.dtype=float32")
    exported_tokenizer = AutoTokenizer.from_pretrained(root / "llava-hf")
    assert printed.rstrip("\n") == exported_tokenizer.decode(answer, skip_special_tokens=True)
