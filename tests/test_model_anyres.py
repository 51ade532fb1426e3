"""LLaVA-NeXT anyres in the model and the Hugging Face conversion, against transformers' (5.24)
LlavaNextForConditionalGeneration: equal logits on batches of images of different sizes, packing, export, one
compiled program for every image size, and the config / input checks.

Reference models are tiny random float32 LlavaNext models built offline (CLIP + LLaMA, SigLIP + Qwen2; 28 px crops of
7 px patches: 4 x 4 features per crop); their pixels come from transformers' LlavaNextImageProcessorPil, ours from
llava_jax.data.anyres_inputs. Images are crops of scikit-learn's bundled sample photos (nothing is downloaded).
"""
import functools
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from sklearn import datasets as sklearn_datasets
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, Qwen2Config,
                          SiglipVisionConfig)

from llava_jax import convert
from llava_jax.config import load_config
from llava_jax.data.anyres_inputs import AnyresSample, anyres_batch, expand_image_tokens, image_layout
from llava_jax.data.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from llava_jax.hf import conform_params, load_hf_llava, load_hf_towers, save_hf_llava
from llava_jax.model_params import load_model
from llava_jax.models.llava import LlavaModel, init_params
from tests.helpers import TINY_MODEL

TOLERANCE = 1e-4
IMAGE_TOKEN = 299
CROP = 28
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
LENGTH = 112                     # text + the most tokens an image takes here (16 + 8 x 9 = 88)
SIZES = [(40, 60), (70, 30)]     # (height, width): a 2 x 2 grid unpadded to 6 x 8 features, a 3 x 1 grid


# ------------------------------------------------------------------------------------------ tiny HF models

def clip_config():
    return CLIPVisionConfig(image_size=CROP, patch_size=7, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64)


def llama_config():
    return LlamaConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-5)


def tiny_llava_next(vision, text, seed: int, **kwargs):
    """Every weight perturbed (HF initialises norms to ones / zeros), so a swapped or dropped tensor shows up."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=IMAGE_TOKEN, **kwargs)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def reference(model, directory, mean, std):
    model.save_pretrained(directory)
    config, params = load_hf_llava(directory)
    return dict(model=model, directory=str(directory), config=config, params=params, mean=mean, std=std)


@pytest.fixture(scope="module")
def clip_llama(tmp_path_factory):
    model = tiny_llava_next(clip_config(), llama_config(), seed=0)
    return reference(model, tmp_path_factory.mktemp("clip_llama_next"), CLIP_MEAN, CLIP_STD)


@pytest.fixture(scope="module")
def siglip_qwen2(tmp_path_factory):
    """SigLIP (feature layer -1, "full") + Qwen2 (q/k/v biases, grouped kv heads, tied embeddings)."""
    vision = SiglipVisionConfig(image_size=CROP, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64)
    text = Qwen2Config(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    model = tiny_llava_next(vision, text, seed=1, vision_feature_layer=-1, vision_feature_select_strategy="full",
                            tie_word_embeddings=True)      # LlavaNext ties by its own flag, not text_config's
    return reference(model, tmp_path_factory.mktemp("siglip_qwen2_next"), SIGLIP_MEAN, SIGLIP_STD)


# ------------------------------------------------------------------------------------------------ inputs

@functools.lru_cache(maxsize=None)
def photos():
    return sklearn_datasets.load_sample_images().images                   # 2 x uint8 [427, 640, 3]


def photo(height: int, width: int, index: int = 0) -> Image.Image:
    return Image.fromarray(photos()[index % 2]).resize((width, height), Image.BICUBIC)


def sample(rng, config, sizes, index: int = 0) -> AnyresSample:
    """Text, then per image one <image> and more text, expanded to each image's anyres token count."""
    parts = [rng.integers(0, IMAGE_TOKEN, 3)]
    for _ in sizes:
        parts += [[IMAGE_TOKEN], rng.integers(0, IMAGE_TOKEN, 4)]
    ids = expand_image_tokens(np.concatenate(parts), sizes, config)
    return AnyresSample(ids, [photo(h, w, index + k) for k, (h, w) in enumerate(sizes)])


def hf_processor(mean, std):
    return LlavaNextImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                      image_grid_pinpoints=PINPOINTS, image_mean=list(mean), image_std=list(std),
                                      resample=3, do_center_crop=True, do_pad=True)


def hf_logits(model, batch, images, mean, std) -> np.ndarray:
    kwargs = {}
    if images:
        processed = hf_processor(mean, std)(images, return_tensors="np")
        kwargs = dict(pixel_values=torch.tensor(processed["pixel_values"]),
                      image_sizes=torch.tensor(processed["image_sizes"]))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(batch["attention_mask"]), **kwargs)
    return out.logits.numpy()


def our_logits(config, params, batch) -> np.ndarray:
    return np.asarray(LlavaModel(config).apply(
        {"params": params}, batch["input_ids"], batch["pixel_values"], image_mask=batch["image_mask"],
        segment_ids=batch["segment_ids"], positions=batch["positions"],
        image_feature_ids=batch["image_feature_ids"]))


def mixed_batch(ref, seed: int = 0, sizes=tuple([size] for size in SIZES), length: int = LENGTH):
    """A sample per list of image sizes (default: two samples with one image each, of different sizes), and a
    text-only sample."""
    rng = np.random.default_rng(seed)
    samples = [sample(rng, ref["config"], sample_sizes, index=k) for k, sample_sizes in enumerate(sizes)]
    samples.append(AnyresSample(rng.integers(0, IMAGE_TOKEN, 9)))
    num_images = max(len(sample_sizes) for sample_sizes in sizes)
    batch = anyres_batch(samples, ref["config"], length, num_images, mean=ref["mean"], std=ref["std"])
    return batch, [image for s in samples for image in s.images]


def logits_error(ref, **kwargs) -> float:
    batch, images = mixed_batch(ref, **kwargs)
    ours = our_logits(ref["config"], ref["params"], batch)
    theirs = hf_logits(ref["model"], batch, images, ref["mean"], ref["std"])
    real = batch["attention_mask"] == 1
    return float(np.abs(ours[real] - theirs[real]).max())


# ------------------------------------------------------------------------------------------- forward parity

@pytest.mark.parametrize("name", ["clip_llama", "siglip_qwen2"])
def test_logits_match_transformers_on_images_of_different_sizes_and_text_only(name, request):
    ref = request.getfixturevalue(name)
    assert ref["config"].anyres.enabled and ref["config"].anyres.grid_pinpoints == PINPOINTS
    error = logits_error(ref)
    print(f"{name}: max |logits - transformers| = {error:.2e}")
    assert error <= TOLERANCE


def test_logits_match_transformers_with_two_images_in_one_sample(clip_llama):
    """Image slot 1 of the first sample is used, the second sample's is padding."""
    error = logits_error(clip_llama, sizes=[[(40, 60), (90, 10)], [(28, 28)]], length=2 * LENGTH)
    print(f"clip_llama, two images in a sample: max |logits - transformers| = {error:.2e}")
    assert error <= TOLERANCE


def test_image_newline_is_loaded(clip_llama):
    expected = clip_llama["model"].model.image_newline.detach().numpy()
    np.testing.assert_array_equal(clip_llama["params"]["image_newline"], expected)


def test_packed_row_equals_each_sample_alone(clip_llama):
    config, params = clip_llama["config"], clip_llama["params"]
    rng = np.random.default_rng(1)
    first, second = sample(rng, config, [SIZES[0]]), sample(rng, config, [SIZES[1]], index=1)
    packed = anyres_batch([[first, second]], config, 2 * LENGTH, num_images=2)
    # The second sample's image is slot 1: its crop rows are offset by one image's crops x tokens.
    ids = packed["image_feature_ids"][0][packed["segment_ids"][0] == 2]
    assert ids[ids >= 0].min() == config.crops_per_image * config.tokens_per_image
    logits = our_logits(config, params, packed)
    for segment, alone_sample in ((1, first), (2, second)):
        alone = anyres_batch([alone_sample], config, LENGTH, num_images=1)
        expected = our_logits(config, params, alone)[0, alone["segment_ids"][0] == 1]
        np.testing.assert_allclose(logits[0, packed["segment_ids"][0] == segment], expected, atol=2e-5, rtol=1e-5)


def test_one_compiled_program_for_every_image_size(clip_llama):
    config, params = clip_llama["config"], clip_llama["params"]
    model = LlavaModel(config)

    @jax.jit
    def forward(batch):
        return model.apply({"params": params}, batch["input_ids"], batch["pixel_values"],
                           segment_ids=batch["segment_ids"], positions=batch["positions"],
                           image_feature_ids=batch["image_feature_ids"])

    rng = np.random.default_rng(2)
    for sizes in ([(40, 60), (70, 30)], [(28, 28), (10, 90)], [(90, 10), (56, 56)]):
        batch = anyres_batch([sample(rng, config, [size]) for size in sizes], config, LENGTH, num_images=1)
        np.testing.assert_allclose(forward(batch), our_logits(config, params, batch), atol=2e-5, rtol=1e-5)
    assert forward._cache_size() == 1


# ---------------------------------------------------------------------------------------- export / layouts

def test_export_reloads_in_transformers_with_equal_logits(clip_llama, tmp_path):
    save_hf_llava(clip_llama["config"], clip_llama["params"], tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_next"
    exported = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch, images = mixed_batch(clip_llama, seed=3)
    real = batch["attention_mask"] == 1
    args = (batch, images, clip_llama["mean"], clip_llama["std"])
    error = np.abs(hf_logits(exported, *args) - hf_logits(clip_llama["model"], *args))[real].max()
    assert error <= TOLERANCE
    config, params = load_hf_llava(tmp_path)
    assert config.anyres == clip_llama["config"].anyres
    np.testing.assert_array_equal(params["image_newline"], clip_llama["params"]["image_newline"])


_V4_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.image_newline", "image_newline"))


def test_transformers_4_key_layout_loads_the_same_params(siglip_qwen2, tmp_path):
    state = load_file(f"{siglip_qwen2['directory']}/model.safetensors")
    renamed = {}
    for name, value in state.items():
        for new, old in _V4_PREFIXES:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        renamed[name] = value
    assert "image_newline" in renamed
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(f"{siglip_qwen2['directory']}/config.json").read())
    _, params = load_hf_llava(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, siglip_qwen2["params"])


def test_convert_cli_round_trip(clip_llama, tmp_path):
    convert.main(["hf-to-jax", "--hf", clip_llama["directory"], "--out", str(tmp_path / "jax")])
    config, params = load_model(str(tmp_path / "jax"))
    assert config.model.anyres == clip_llama["config"].anyres
    convert.main(["jax-to-hf", "--src", str(tmp_path / "jax"), "--out", str(tmp_path / "hf")])
    _, reloaded = load_hf_llava(tmp_path / "hf")
    np.testing.assert_array_equal(reloaded["image_newline"], clip_llama["params"]["image_newline"])


def test_towers_with_pinpoints_start_an_anyres_model(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(clip_config()).save_pretrained(tmp_path / "vision")
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "language")
    config, params = load_hf_towers(tmp_path / "vision", tmp_path / "language", grid_pinpoints=PINPOINTS)
    assert config.anyres.enabled and config.anyres.grid_pinpoints == PINPOINTS
    assert params["image_newline"].shape == (48,) and 0.05 < params["image_newline"].std() < 0.3   # ~ 1 / sqrt(48)
    conform_params(params, config)
    plain_config, plain = load_hf_towers(tmp_path / "vision", tmp_path / "language")
    assert not plain_config.anyres.enabled and "image_newline" not in plain

    out = tmp_path / "cli"
    convert.main(["towers", "--vision", str(tmp_path / "vision"), "--language", str(tmp_path / "language"),
                  "--grid-pinpoints", json.dumps(PINPOINTS), "--out", str(out)])
    cli_config, cli_params = load_model(str(out))
    assert cli_config.model.anyres.enabled and cli_config.model.anyres.grid_pinpoints == PINPOINTS
    assert cli_params["image_newline"].shape == (48,)
    with pytest.raises(SystemExit, match="--grid-pinpoints"):
        convert.main(["towers", "--vision", str(tmp_path / "vision"), "--language", str(tmp_path / "language"),
                      "--grid-pinpoints", "[[28, 56]", "--out", str(tmp_path / "bad")])


# -------------------------------------------------------------------------------------------- config / inputs

def anyres_config(*overrides):
    return load_config(None, TINY_MODEL + ["model.anyres.enabled=true", "data.max_length=128",
                                           f"model.anyres.grid_pinpoints={PINPOINTS}", *overrides]).model


def test_crops_per_image_defaults_to_the_base_crop_plus_the_most_tiles():
    assert anyres_config().crops_per_image == 5
    assert anyres_config("model.anyres.max_crops=7").crops_per_image == 7
    assert anyres_config().max_tokens_per_image == 16 + 8 * 9
    assert load_config(None, TINY_MODEL).model.crops_per_image == 1


@pytest.mark.parametrize("overrides, key", [
    (["model.anyres.grid_pinpoints=[[28, 50]]"], "model.anyres.grid_pinpoints"),
    (["model.anyres.grid_pinpoints=[]"], "model.anyres.grid_pinpoints"),
    (["model.anyres.max_crops=4"], "model.anyres.max_crops"),
    (["model.vision.image_size=56"], "model.anyres.grid_pinpoints"),
    (["model.projector.pixel_shuffle=true"], "model.projector.pixel_shuffle"),
    (["model.vision_feature_select_strategy=full"], "model.vision_feature_select_strategy"),
])
def test_bad_anyres_configs_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        anyres_config(*overrides)


def test_plain_llava_has_no_image_newline():
    assert "image_newline" not in init_params(load_config(None, TINY_MODEL).model, jax.random.key(0))


def test_image_feature_ids_follow_the_layout_with_newlines():
    """A 70 x 30 image: base + a 3 x 1 grid (4 of 5 crops), 12 x 4 features unpadded to 10 x 4."""
    config = anyres_config()
    ids = expand_image_tokens(np.array([5, IMAGE_TOKEN, 6]), [SIZES[1]], config)
    layout = image_layout(SIZES[1], config)
    assert layout.num_crops == 4 and layout.unpadded == (10, 4)
    assert len(ids) == 2 + layout.num_tokens == 2 + 16 + 10 * 5
    batch = anyres_batch([AnyresSample(ids, [photo(*SIZES[1])])], config, 80, num_images=1)
    feature_ids = batch["image_feature_ids"][0]
    assert feature_ids[0] == -1 and feature_ids[1:17].tolist() == list(range(16))
    assert feature_ids[17:22].tolist() == [16 + 4, 16 + 5, 16 + 6, 16 + 7, -2]    # tile 1's 2nd feature row
    assert (feature_ids == -2).sum() == 10 and (feature_ids[len(ids):] == -1).all()
    assert batch["pixel_values"].shape == (1, 1, 5, CROP, CROP, 3)
    assert not batch["pixel_values"][0, 0, 4:].any() and batch["pixel_values"][0, 0, 3].any()


def test_wrong_feature_ids_are_refused_before_running():
    config = anyres_config()
    params = init_params(config, jax.random.key(0))
    ids = expand_image_tokens(np.array([5, IMAGE_TOKEN, 6]), [SIZES[0]], config)
    batch = anyres_batch([AnyresSample(ids, [photo(*SIZES[0])])], config, 80, num_images=1)
    batch["image_feature_ids"][0, 0] = 3                               # a text token asking for a feature row
    with pytest.raises(ValueError, match="image_feature_id"):
        our_logits(config, params, batch)


def test_image_token_count_mismatch_is_refused():
    config = anyres_config()
    ids = expand_image_tokens(np.array([5, IMAGE_TOKEN, 6]), [SIZES[0]], config)[:-3]   # truncated inside the image
    with pytest.raises(ValueError, match="image tokens"):
        anyres_batch([AnyresSample(ids, [photo(*SIZES[0])])], config, 80, num_images=1)
