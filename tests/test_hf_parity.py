"""Numerical parity with transformers' LlavaForConditionalGeneration, and Hugging Face checkpoint import / export.

Every reference model is a tiny random float32 model built offline; logits are compared at real tokens only.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

from llava_jax.hf import load_hf_llava, load_hf_towers, model_config_from_hf, save_hf_llava, unstack_layers
from llava_jax.model_params import load_model
from llava_jax.models.llava import LlavaModel, init_params

TOLERANCE = 1e-4
IMAGE_TOKEN = 299
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ tiny HF models

def clip_vision_config():
    return CLIPVisionConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64)


def llama_config():
    return LlamaConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-5)


def randomized(model, seed: int):
    """HF initialises norms to ones / zeros; perturb every weight so a swapped or dropped tensor shows up."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def tiny_llava(vision_config, text_config, seed: int, **kwargs):
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN, **kwargs)
    return randomized(LlavaForConditionalGeneration(config), seed)


def saved(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return str(directory)


def edited_copy(source, directory, edit_config=None, edit_state=None):
    """A copy of the saved model in `source` with its config.json dict and / or its {name: array} weights edited
    in place by the given functions."""
    directory.mkdir()
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    if edit_config:
        edit_config(config)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)
    state = load_file(os.path.join(source, "model.safetensors"))
    if edit_state:
        edit_state(state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def clip_llama(tmp_path_factory):
    """CLIP (feature layer -2, "default") + LLaMA (multi-head attention)."""
    model = tiny_llava(clip_vision_config(), llama_config(), seed=0)
    return model, saved(model, tmp_path_factory.mktemp("clip_llama"))


@pytest.fixture(scope="module")
def siglip_qwen2(tmp_path_factory):
    """SigLIP (feature layer -1, "full") + Qwen2 (q/k/v biases, 4 query heads over 2 kv heads, tied embeddings)."""
    vision = SiglipVisionConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64)
    text = Qwen2Config(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    model = tiny_llava(vision, text, seed=1, vision_feature_layer=-1, vision_feature_select_strategy="full")
    return model, saved(model, tmp_path_factory.mktemp("siglip_qwen2"))


# ------------------------------------------------------------------------------------------------ inputs

def sequence(rng, num_images: int, tokens_per_image: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Text, then per image its image tokens followed by text, right-padded to `length` -> (ids, attention_mask)."""
    parts = [rng.integers(0, IMAGE_TOKEN, 3)]
    for _ in range(num_images):
        parts += [np.full(tokens_per_image, IMAGE_TOKEN), rng.integers(0, IMAGE_TOKEN, 4)]
    ids = np.concatenate(parts)
    mask = np.zeros(length, np.int32)
    mask[:len(ids)] = 1
    return np.pad(ids, (0, length - len(ids))).astype(np.int32), mask


def images(rng, count: int) -> np.ndarray:
    """[count, 3, 28, 28] float32 (NCHW, as transformers takes them)."""
    return rng.standard_normal((count, 3, 28, 28)).astype(np.float32)


def hf_logits(model, input_ids, pixel_values=None, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long),
                    pixel_values=None if pixel_values is None else torch.tensor(pixel_values),
                    attention_mask=None if attention_mask is None else torch.tensor(attention_mask))
    return out.logits.numpy()


def our_logits(config, params, input_ids, pixel_values=None, attention_mask=None, image_mask=None) -> np.ndarray:
    """pixel_values here are ours: [B, I, H, W, 3]."""
    return np.asarray(LlavaModel(config).apply({"params": params}, input_ids, pixel_values,
                                               attention_mask=attention_mask, image_mask=image_mask))


def nhwc(pixel_values: np.ndarray) -> np.ndarray:
    return pixel_values.transpose(0, 2, 3, 1)


def max_error(ours, theirs, attention_mask=None) -> float:
    diff = np.abs(np.asarray(ours) - np.asarray(theirs))
    return float(diff.max() if attention_mask is None else diff[attention_mask == 1].max())


def one_image_logits_error(model, directory) -> float:
    config, params = load_hf_llava(directory)
    rng = np.random.default_rng(0)
    ids, _ = sequence(rng, 1, config.tokens_per_image, 24)
    pixels = images(rng, 1)
    return max_error(our_logits(config, params, ids[None], nhwc(pixels)[None]), hf_logits(model, ids[None], pixels))


# ------------------------------------------------------------------------------------------- forward parity

def test_clip_llama_logits_match_transformers(clip_llama):
    assert one_image_logits_error(*clip_llama) <= TOLERANCE


def test_siglip_qwen2_logits_match_transformers(siglip_qwen2):
    config, _ = load_hf_llava(siglip_qwen2[1])
    assert (config.vision.kind, config.decoder.qkv_bias, config.decoder.num_kv_heads) == ("siglip", True, 2)
    assert config.decoder.tie_embeddings and config.vision_layers_used == 2
    assert one_image_logits_error(*siglip_qwen2) <= TOLERANCE


def test_projector_without_biases_loads_and_matches_transformers(tmp_path):
    model = tiny_llava(clip_vision_config(), llama_config(), seed=7, multimodal_projector_bias=False)
    assert model.model.multi_modal_projector.linear_1.bias is None
    directory = saved(model, tmp_path / "no_bias")
    config, params = load_hf_llava(directory)
    assert not config.projector.bias
    assert {name: sorted(layer) for name, layer in params["projector"].items()} == {
        "linear_1": ["kernel"], "linear_2": ["kernel"]}
    assert one_image_logits_error(model, directory) <= TOLERANCE


def test_padded_batch_with_two_images_in_one_sample_matches(clip_llama):
    model, directory = clip_llama
    config, params = load_hf_llava(directory)
    rng = np.random.default_rng(1)
    first, first_mask = sequence(rng, 2, config.tokens_per_image, 48)
    second, second_mask = sequence(rng, 1, config.tokens_per_image, 48)
    ids, attention_mask = np.stack([first, second]), np.stack([first_mask, second_mask])
    real = images(rng, 3)                                              # sample 0: images 0, 1; sample 1: image 2
    ours_pixels = np.zeros((2, 2, 28, 28, 3), np.float32)
    ours_pixels[0] = nhwc(real[:2])
    ours_pixels[1, 0] = nhwc(real[2:])[0]
    ours = our_logits(config, params, ids, ours_pixels, attention_mask, image_mask=np.array([[1, 1], [1, 0]]))
    assert max_error(ours, hf_logits(model, ids, real, attention_mask), attention_mask) <= TOLERANCE


def test_text_only_sample_matches(clip_llama):
    model, directory = clip_llama
    config, params = load_hf_llava(directory)
    ids = np.random.default_rng(2).integers(0, IMAGE_TOKEN, (1, 20)).astype(np.int32)
    assert max_error(our_logits(config, params, ids), hf_logits(model, ids)) <= TOLERANCE


@pytest.mark.parametrize("fixture", ["clip_llama", "siglip_qwen2"])
def test_image_features_match_get_image_features(fixture, request):
    model, directory = request.getfixturevalue(fixture)
    config, params = load_hf_llava(directory)
    pixels = images(np.random.default_rng(3), 2)
    ours = LlavaModel(config).apply({"params": params}, nhwc(pixels), method=LlavaModel.image_features)
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output   # list, one per image
    assert max_error(ours, torch.stack(theirs).numpy()) <= TOLERANCE


# ------------------------------------------------------------------------------------------ checkpoint import

def test_loaded_params_are_the_float32_tree_init_params_builds(clip_llama):
    config, params = load_hf_llava(clip_llama[1])
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    assert params["vision_tower"]["layers"]["mlp"]["fc1"]["kernel"].shape[0] == 2       # 2 of the 3 HF layers


def test_sharded_checkpoint_loads_the_same_params(clip_llama, tmp_path):
    model, directory = clip_llama
    sharded = saved(model, tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert_same_params(load_hf_llava(sharded)[1], load_hf_llava(directory)[1])


def transformers4_name(name: str) -> str:
    for new, old in (("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    raise AssertionError(f"unmapped key {name}")


def test_transformers4_key_layout_loads_the_same_params(clip_llama, tmp_path):
    model, directory = clip_llama
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(os.path.join(directory, "config.json"), legacy)
    state = {name: value.numpy() for name, value in model.state_dict().items()}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in state and "lm_head.weight" in state
    save_file({transformers4_name(name): value for name, value in state.items()}, str(legacy / "model.safetensors"),
              metadata={"format": "pt"})
    assert_same_params(load_hf_llava(legacy)[1], load_hf_llava(directory)[1])


def set_tied(tied: bool):
    def edit(config):
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = tied
    return edit


def test_tied_config_with_a_different_lm_head_raises(clip_llama, tmp_path):
    """clip_llama's lm_head is its own matrix: a config claiming tied embeddings contradicts the weights."""
    directory = edited_copy(clip_llama[1], tmp_path / "tied", edit_config=set_tied(True))
    with pytest.raises(ValueError, match=r"tie_word_embeddings=true.*lm_head\.weight.*differs"):
        load_hf_llava(directory)


def weight_named(state, suffix: str) -> str:
    """The one name in `state` ending in `suffix` (save_pretrained may write the 4.x or the 5.x key layout)."""
    names = [name for name in state if name.endswith(suffix)]
    assert len(names) == 1, names
    return names[0]


def drop_lm_head(state):
    del state[weight_named(state, "lm_head.weight")]


def test_tied_model_saved_with_a_copy_of_its_embeddings_as_lm_head_loads(siglip_qwen2, tmp_path):
    def add_head(state):
        embedding = weight_named(state, "embed_tokens.weight")
        head = "language_model.lm_head.weight" if embedding.startswith("language_model.") else "lm_head.weight"
        state[head] = state[embedding].copy()
    directory = edited_copy(siglip_qwen2[1], tmp_path / "with_head", edit_state=add_head)
    assert_same_params(load_hf_llava(directory)[1], load_hf_llava(siglip_qwen2[1])[1])


def test_untied_config_without_lm_head_raises_naming_the_flag(clip_llama, tmp_path):
    directory = edited_copy(clip_llama[1], tmp_path / "headless", edit_state=drop_lm_head)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=false.*no 'lm_head\.weight'"):
        load_hf_llava(directory)


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("vision, text", [("clip_vision_model", {"model_type": "llama"}),
                                          ("siglip_vision_model", {"model_type": "qwen2"}),
                                          ("clip_vision_model", {"model_type": "mistral", "sliding_window": None})])
def test_config_defaults_match_transformers(vision, text):
    """Hub config.json files leave out values equal to transformers' defaults; we must fill in the same ones."""
    ours = model_config_from_hf({"model_type": "llava", "vision_config": {"model_type": vision}, "text_config": text,
                                 "image_token_index": 7})
    theirs = LlavaConfig(vision_config={"model_type": vision}, text_config=text, image_token_index=7)
    v, t, d = theirs.vision_config, theirs.text_config, ours.decoder
    assert (ours.vision.image_size, ours.vision.patch_size, ours.vision.hidden_size, ours.vision.num_layers,
            ours.vision.num_heads, ours.vision.mlp_dim, ours.vision.layer_norm_eps) == (
        v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
        v.layer_norm_eps)
    assert v.hidden_act == {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}[ours.vision.act]
    assert (d.vocab_size, d.hidden_size, d.mlp_dim, d.num_layers, d.num_heads, d.num_kv_heads, d.rms_norm_eps,
            d.rope_theta, d.max_position_embeddings, d.tie_embeddings) == (
        t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
        t.num_key_value_heads, t.rms_norm_eps, t.rope_parameters["rope_theta"], t.max_position_embeddings,
        t.tie_word_embeddings)
    assert (ours.image_token_id, ours.vision_feature_layer, ours.vision_feature_select_strategy) == (
        theirs.image_token_id, theirs.vision_feature_layer, theirs.vision_feature_select_strategy)


@pytest.mark.parametrize("key, value", [
    ("text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("text_config.rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    ("vision_feature_layer", [-2, -1]),
    ("projector_hidden_act", "relu"),
    ("text_config.model_type", "gemma"),
    ("vision_config.model_type", "dinov2"),
    ("text_config.hidden_act", "gelu"),
])
def test_unsupported_config_raises_naming_the_key(clip_llama, tmp_path, key, value):
    with open(os.path.join(clip_llama[1], "config.json")) as f:
        config = json.load(f)
    *parents, name = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_hf_llava(tmp_path)


def test_active_sliding_window_raises(clip_llama, tmp_path):
    with open(os.path.join(clip_llama[1], "config.json")) as f:
        config = json.load(f)
    config["text_config"].update(model_type="mistral", sliding_window=16, max_position_embeddings=4096)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"text_config\.sliding_window"):
        load_hf_llava(tmp_path)


# ------------------------------------------------------------------------------------------ export round trip

@pytest.mark.parametrize("overrides", [
    (),                                                     # CLIP (3 layers, 2 used: feature layer -2) + LLaMA
    ("model.vision.kind=siglip", "model.vision_feature_layer=-1", "model.vision_feature_select_strategy=full",
     "model.decoder.qkv_bias=true", "model.decoder.tie_embeddings=true"),                   # SigLIP + tied Qwen2
    ("model.projector.bias=false",),                        # multimodal_projector_bias=false
])
def test_exported_model_loads_in_transformers_with_identical_logits(tiny_config, tmp_path, overrides):
    config = tiny_config(*overrides).model
    params = init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    save_hf_llava(config, params, tmp_path)
    model, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    rng = np.random.default_rng(4)
    ids, _ = sequence(rng, 1, config.tokens_per_image, 24)
    pixels = images(rng, 1)
    ours = our_logits(config, params, ids[None], nhwc(pixels)[None])
    assert max_error(ours, hf_logits(model.eval(), ids[None], pixels)) <= TOLERANCE
    reloaded_config, reloaded = load_hf_llava(tmp_path)
    assert max_error(our_logits(reloaded_config, reloaded, ids[None], nhwc(pixels)[None]), ours) <= TOLERANCE


# ------------------------------------------------------------------------------------- towers and the CLI

@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A CLIP vision model and a LLaMA (vocabulary 300, untied lm_head), each saved on its own."""
    torch.manual_seed(5)
    vision = randomized(CLIPVisionModel(clip_vision_config()), seed=5)
    language = randomized(LlamaForCausalLM(llama_config()), seed=6)
    directory = tmp_path_factory.mktemp("towers")
    return vision, language, saved(vision, directory / "vision"), saved(language, directory / "language")


def language_logits(language, ids) -> np.ndarray:
    with torch.no_grad():
        return language(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_towers_reproduce_their_source_models(towers):
    vision, language, vision_dir, language_dir = towers
    config, params = load_hf_towers(vision_dir, language_dir, rng=jax.random.key(0))
    # As llava-1.5-7b-hf grows LLaMA's 32000: <image> = 300, room for <pad> at 301, padded to a multiple of 64.
    assert (config.image_token_id, config.decoder.vocab_size) == (300, 320)

    pixels = images(np.random.default_rng(5), 2)
    ours = LlavaModel(config).apply({"params": params}, nhwc(pixels), method=lambda m, x: m.vision_tower(x))
    with torch.no_grad():
        theirs = vision(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
    assert max_error(ours, theirs.numpy()) <= TOLERANCE

    ids = np.random.default_rng(6).integers(0, 300, (1, 16)).astype(np.int32)
    logits = our_logits(config, params, ids)
    reference = language_logits(language, ids)
    assert max_error(logits[..., :300], reference) <= TOLERANCE
    # The new lm_head columns are the mean of the others, so each new logit is their mean.
    assert max_error(logits[..., 300:], np.repeat(reference.mean(-1, keepdims=True), 20, -1)) <= TOLERANCE
    embedding = params["language_model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(embedding[300:], np.repeat(embedding[:300].mean(0, keepdims=True), 20, 0), rtol=1e-6)


@pytest.mark.parametrize("vocab_size, image_token_id, expected", [
    (300, 7, (300, 7)),                # no new token: an existing one carries the images
    (304, None, (304, 300)),           # the first new token is the image token
    (None, 301, (320, 301)),           # beyond the original 300 tokens, inside the grown vocabulary
])
def test_towers_take_an_explicit_vocab_size_and_image_token(towers, vocab_size, image_token_id, expected):
    _, language, vision_dir, language_dir = towers
    config, params = load_hf_towers(vision_dir, language_dir, image_token_id=image_token_id, vocab_size=vocab_size)
    assert (config.decoder.vocab_size, config.image_token_id) == expected
    assert params["language_model"]["lm_head"]["kernel"].shape[1] == expected[0]
    ids = np.random.default_rng(7).integers(0, 300, (1, 8)).astype(np.int32)
    assert max_error(our_logits(config, params, ids)[..., :300], language_logits(language, ids)) <= TOLERANCE


@pytest.mark.parametrize("vocab_size, image_token_id, argument", [
    (299, None, "vocab_size=299"),     # smaller than the language model's vocabulary
    (300, None, "image_token_id"),     # no new token and no existing one named
    (None, 320, "image_token_id=320"),
    (310, 310, "image_token_id=310"),
    (None, -1, "image_token_id=-1"),
])
def test_towers_refuse_a_vocabulary_without_room_for_the_image_token(towers, vocab_size, image_token_id,
                                                                      argument):
    _, _, vision_dir, language_dir = towers
    with pytest.raises(ValueError, match=argument):
        load_hf_towers(vision_dir, language_dir, image_token_id=image_token_id, vocab_size=vocab_size)


@pytest.mark.parametrize("tied, edit_state, message", [
    (True, None, r"tie_word_embeddings=true.*differs"),
    (False, drop_lm_head, r"tie_word_embeddings=false.*no 'lm_head\.weight'"),
])
def test_towers_check_the_tied_flag_against_the_language_model_weights(towers, tmp_path, tied, edit_state,
                                                                       message):
    def set_flag(config):
        config["tie_word_embeddings"] = tied
    language_dir = edited_copy(towers[3], tmp_path / "language", edit_config=set_flag, edit_state=edit_state)
    with pytest.raises(ValueError, match=message):
        load_hf_towers(towers[2], language_dir)


def convert_cli(*args):
    subprocess.run([sys.executable, "-m", "llava_jax.convert", *map(str, args)], cwd=REPO_ROOT, check=True,
                   capture_output=True)


def test_convert_cli_round_trip(clip_llama, tmp_path):
    _, directory = clip_llama
    convert_cli("hf-to-jax", "--hf", directory, "--out", tmp_path / "jax", "--set", "model.scan_layers=false",
                "train.steps=7")
    config, params = load_model(tmp_path / "jax")
    assert (config.model.scan_layers, config.train.steps) == (False, 7)
    assert_same_params(params, unstack_layers(load_hf_llava(directory)[1]))

    convert_cli("jax-to-hf", "--src", tmp_path / "jax", "--out", tmp_path / "hf")
    assert_same_params(load_hf_llava(tmp_path / "hf")[1], load_hf_llava(directory)[1])
