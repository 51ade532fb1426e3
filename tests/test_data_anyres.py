"""LLaVA-NeXT anyres on the host equals transformers (checked against 5.24.0; the unpad rounding changed across
versions, see /work/shared/anyres-notes.md): best resolution, crop pixels, token counts and token order.

References are built offline from config dicts: `LlavaNextImageProcessorPil` (the PIL/numpy backend; the plain class
is the torchvision one), `LlavaNextProcessor` with a two-word in-memory tokenizer, and a tiny random
`LlavaNextForConditionalGeneration` (CLIP 28 px / patch 7: 4 x 4 features per crop) whose `pack_image_features`
reveals its order on features that hold their own flat-table row. The photos are real: scikit-learn's two bundled
sample images (`sklearn.datasets.load_sample_images()`: china.jpg and flower.jpg, 427 x 640, shipped inside the
sklearn package, so nothing is downloaded), cropped to each size's aspect and resized to it.
"""
import functools

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import datasets as sklearn_datasets
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from llava_jax.data.anyres import (DEFAULT_GRID_PINPOINTS, anyres_crops, anyres_layout, check_pinpoints, max_crops,
                                   max_tokens, select_best_resolution, unpadded_grid)
from llava_jax.data.images import CLIP_MEAN, CLIP_STD, normalize_pixels

CROP = 336                                                  # CLIP ViT-L/14-336: 24 x 24 features per crop
PATCHES = 24
PINPOINTS = [list(p) for p in DEFAULT_GRID_PINPOINTS]

# (height, width): squares incl. the full tie (-> (336, 672), the first listed), extreme portrait / landscape,
# odd sizes, tiny images, exact pinpoints and one pixel off them, and lines too thin for any pinpoint to keep a pixel
# (every effective resolution is 0, the first listed wins; unpadded to 0 rows, or to 0 columns and only newlines).
SIZES = [(336, 336), (224, 224), (1, 1), (7, 9), (9, 7), (2, 3), (1080, 1920), (1920, 1080), (300, 1200),
         (1200, 300), (20, 2000), (2000, 20), (480, 640), (640, 480), (427, 640), (1000, 1000), (333, 667),
         (481, 333), (999, 1001), (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008), (337, 673),
         (335, 671), (100, 300), (300, 100), (1344, 1344), (4000, 3000), (517, 1511), (33, 1000), (700, 350),
         (350, 700), (5, 4000), (4000, 5), (1, 5000), (5000, 1)]
# For pixels (8+ of SIZES): square, the tie cases, extreme portrait / landscape, odd, tiny, an exact pinpoint.
PHOTO_SIZES = [(336, 336), (224, 224), (1080, 1920), (300, 1200), (1200, 300), (20, 2000), (481, 333), (7, 9),
               (1000, 1000), (336, 672), (517, 1511)]
# /work/shared/anyres-notes.md's table (default pinpoints, CLIP-336/14 "default").
NOTES_TOKENS = {(480, 640): 2340, (640, 480): 2352, (1080, 1920): 1948, (300, 1200): 1890, (1200, 300): 1944,
                (336, 336): 1176, (224, 224): 1176, (1000, 1000): 2928}


# ------------------------------------------------------------------------------------------------ references

@functools.lru_cache(maxsize=None)
def photos():
    return sklearn_datasets.load_sample_images().images                   # 2 x uint8 [427, 640, 3]


def photo(height: int, width: int, index: int = 0) -> Image.Image:
    """The centre of a sample photo cut to height:width's aspect, resized (Lanczos) to width x height."""
    image = photos()[index % 2]
    rows, cols = image.shape[:2]
    if cols / rows > width / height:
        keep = max(1, round(rows * width / height))
        image = image[:, (cols - keep) // 2:(cols - keep) // 2 + keep]
    else:
        keep = max(1, round(cols * height / width))
        image = image[(rows - keep) // 2:(rows - keep) // 2 + keep]
    return Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.LANCZOS)


@functools.lru_cache(maxsize=None)
def hf_image_processor():
    """llava-hf/llava-v1.6-*'s preprocessor_config.json values."""
    return LlavaNextImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                      image_grid_pinpoints=PINPOINTS, image_mean=list(CLIP_MEAN),
                                      image_std=list(CLIP_STD), resample=3, do_center_crop=True, do_pad=True)


@functools.lru_cache(maxsize=None)
def hf_processor():
    """LlavaNextProcessor as llava-hf ships it (patch 14, "default", +1 for CLIP's class token)."""
    vocab = {"<unk>": 0, "<image>": 1, "hello": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                        unk_token="<unk>", additional_special_tokens=["<image>"])
    return LlavaNextProcessor(image_processor=hf_image_processor(), tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


TINY_CROP, TINY_PATCHES = 28, 4                            # CLIP 28 px / patch 7
TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


@functools.lru_cache(maxsize=None)
def tiny_llava_next():
    vision = CLIPVisionConfig(image_size=TINY_CROP, patch_size=7, hidden_size=8, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=16)
    text = LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=16)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=TINY_PINPOINTS,
                             image_token_index=31)
    return LlavaNextForConditionalGeneration(config).eval()


def hf_packed_rows(size_hw, tokens_per_crop: int, newline_index: int) -> np.ndarray:
    """transformers' pack_image_features order for one image: each feature holds its own flat-table row."""
    num_crops = image_size_to_num_patches(size_hw, TINY_PINPOINTS, TINY_CROP)
    table = torch.arange(num_crops * tokens_per_crop, dtype=torch.float64)
    features = table.reshape(num_crops, tokens_per_crop, 1)                 # [crops, tokens, embed=1]
    packed, lengths = tiny_llava_next().model.pack_image_features(
        [features], torch.tensor([size_hw]), "default", image_newline=torch.tensor([float(newline_index)]))
    assert lengths.tolist() == [packed[0].shape[0]]
    return packed[0][:, 0].numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------- best resolution

@pytest.mark.parametrize("size_hw", SIZES)
def test_best_resolution_equals_transformers(size_hw):
    assert select_best_resolution(size_hw, PINPOINTS) == tuple(hf_select_best_resolution(size_hw, PINPOINTS))


def test_squares_tie_and_go_to_the_first_listed_pinpoint():
    assert select_best_resolution((336, 336), DEFAULT_GRID_PINPOINTS) == (336, 672)
    assert select_best_resolution((224, 224), DEFAULT_GRID_PINPOINTS) == (336, 672)
    assert select_best_resolution((224, 224), DEFAULT_GRID_PINPOINTS[1:]) == (672, 336)


# ---------------------------------------------------------------------------------------------- crop pixels

def test_crop_pixels_equal_transformers_processor():
    """One batch of all photos: transformers pads the crop axis to the batch's most crops with zeros."""
    images = [photo(h, w, i) for i, (h, w) in enumerate(PHOTO_SIZES)]
    reference = hf_image_processor()(images, return_tensors="np")
    pixel_values = reference["pixel_values"]                           # [images, max crops, 3, S, S]
    assert reference["image_sizes"].tolist() == [list(size) for size in PHOTO_SIZES]
    for index, image in enumerate(images):
        crops = anyres_crops(image, PINPOINTS, CROP)
        assert len(crops) == anyres_layout(PHOTO_SIZES[index], PINPOINTS, CROP, PATCHES, PATCHES ** 2).num_crops
        assert all(crop.size == (CROP, CROP) and crop.mode == "RGB" for crop in crops)
        pixels = np.stack([np.asarray(crop) for crop in crops])          # uint8 [crops, S, S, 3]
        ours = np.asarray(normalize_pixels(pixels[None], np.ones(1), CLIP_MEAN, CLIP_STD))[0]
        theirs = pixel_values[index, :len(crops)].transpose(0, 2, 3, 1)  # -> [crops, S, S, 3]
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=f"size {PHOTO_SIZES[index]}")
        # Their uint8 values before normalisation, recovered, are ours bit for bit.
        recovered = np.rint((theirs * np.float64(CLIP_STD) + np.float64(CLIP_MEAN)) * 255)
        np.testing.assert_array_equal(recovered, pixels, err_msg=f"size {PHOTO_SIZES[index]}")
        assert not pixel_values[index, len(crops):].any()                # the batch's crop-axis padding


def test_tiles_are_row_major_after_the_base_image():
    """A 2 x 1 grid image (672 x 336 pinpoint) with a red top and a blue bottom: base first, then top, bottom."""
    image = Image.new("RGB", (336, 672), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 336, 336))
    base, top, bottom = anyres_crops(image, PINPOINTS, CROP)
    assert (np.asarray(top) == [255, 0, 0]).all() and (np.asarray(bottom) == [0, 0, 255]).all()
    assert np.asarray(base)[0, 0].tolist() == [255, 0, 0] and np.asarray(base)[-1, 0].tolist() == [0, 0, 255]


def test_padding_colour_is_black_unless_asked():
    wide = Image.new("RGB", (1000, 100), (255, 255, 255))               # -> 336 x 1008, padded above and below
    assert np.asarray(anyres_crops(wide, PINPOINTS, CROP)[1])[0, 0].tolist() == [0, 0, 0]
    grey = anyres_crops(wide, PINPOINTS, CROP, pad_color=(122, 116, 104))
    assert np.asarray(grey[1])[0, 0].tolist() == [122, 116, 104]


# ---------------------------------------------------------------------------------------------- token counts

def test_token_counts_equal_transformers_processor():
    counts = hf_processor()._get_num_multimodal_tokens(image_sizes=SIZES)["num_image_tokens"]
    ours = [anyres_layout(size, PINPOINTS, CROP, PATCHES, PATCHES ** 2).num_tokens for size in SIZES]
    assert ours == counts


def test_token_count_equals_the_image_tokens_the_processor_writes():
    processor = hf_processor()
    for index, (height, width) in enumerate([(427, 640), (300, 1200), (7, 9)]):
        inputs = processor(text="hello <image> hello", images=photo(height, width, index), return_tensors="np")
        written = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert written == anyres_layout((height, width), PINPOINTS, CROP, PATCHES, PATCHES ** 2).num_tokens


@pytest.mark.parametrize("size_hw, tokens", NOTES_TOKENS.items())
def test_token_counts_equal_the_notes_table(size_hw, tokens):
    assert anyres_layout(size_hw, PINPOINTS, CROP, PATCHES, PATCHES ** 2).num_tokens == tokens


def test_most_crops_and_tokens_of_the_default_pinpoints():
    assert max_crops(DEFAULT_GRID_PINPOINTS, CROP) == 5
    assert max_tokens(DEFAULT_GRID_PINPOINTS, CROP, PATCHES) == 2928
    assert max(anyres_layout(size, PINPOINTS, CROP, PATCHES, PATCHES ** 2).num_tokens for size in SIZES) <= 2928


# ---------------------------------------------------------------------------------------------- token order

# The unpad edge cases on the tiny model (pinpoints of 28 px crops, 4 x 4 features each):
EDGE_SIZES = {
    "exact_half_wide": (3, 16),        # new height 1.5 -> int(round(1.5, 7)) = 1, odd padding difference
    "exact_half_tall": (16, 5),        # new width 2.5 -> 2
    "float_just_below_8": (49, 49),    # 49 * (8 / 49) = 7.999999999999999 -> 8 (plain int() would give 7)
    "float_just_below_4": (98, 49),
    "float_just_below_3_wide": (47, 188),
    "extreme_wide": (1, 500),          # a single feature row survives
    "extreme_tall": (500, 1),
    "no_tile_row_survives": (1, 2000),  # unpadded to 0 x 8: only the base crop's tokens
    "only_newlines_survive": (2000, 1),  # unpadded to 4 x 0: the base crop's tokens, then 4 newlines
    "tie_square": (28, 28),            # -> 28 x 56, the first listed
    "exact_grid": (56, 84),
    "tiny": (1, 1),
}


@pytest.mark.parametrize("size_hw", EDGE_SIZES.values(), ids=EDGE_SIZES.keys())
def test_gather_indices_equal_transformers_pack_image_features_on_edge_cases(size_hw):
    newline = max_crops(TINY_PINPOINTS, TINY_CROP) * TINY_PATCHES ** 2
    layout = anyres_layout(size_hw, TINY_PINPOINTS, TINY_CROP, TINY_PATCHES, TINY_PATCHES ** 2)
    indices = layout.gather_indices(newline)
    assert indices.dtype == np.int32 and indices.shape == (layout.num_tokens,)
    np.testing.assert_array_equal(indices, hf_packed_rows(size_hw, TINY_PATCHES ** 2, newline))


def test_gather_indices_equal_transformers_pack_image_features_on_a_sweep_of_sizes():
    """Every (height, width) in 1..70 step 3 and a band around the 2:1 / 1:3 pinpoint aspects."""
    sizes = [(h, w) for h in range(1, 71, 3) for w in range(1, 71, 3)]
    sizes += [(h, 2 * h + d) for h in range(10, 60, 7) for d in (-1, 0, 1)]
    sizes += [(3 * w + d, w) for w in range(5, 40, 6) for d in (-1, 0, 1)]
    newline = 999
    for size in sizes:
        layout = anyres_layout(size, TINY_PINPOINTS, TINY_CROP, TINY_PATCHES, TINY_PATCHES ** 2)
        np.testing.assert_array_equal(layout.gather_indices(newline), hf_packed_rows(size, TINY_PATCHES ** 2, newline),
                                      err_msg=f"size {size}")


def test_layout_describes_the_grid():
    layout = anyres_layout((1080, 1920), PINPOINTS, CROP, PATCHES, PATCHES ** 2)
    assert (layout.best_resolution_hw, layout.grid, layout.num_crops) == ((672, 672), (2, 2), 5)
    assert layout.unpadded == (28, 48) and layout.unpadded_offset == (10, 0)
    assert unpadded_grid((1080, 1920), (48, 48)) == ((28, 48), (10, 0))
    indices = layout.gather_indices(5 * 576)
    assert indices[:576].tolist() == list(range(576))                            # the base crop first
    assert indices[576 + 48] == 5 * 576 and (indices == 5 * 576).sum() == 28     # a newline after each row


# -------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("tokens_per_crop", [TINY_PATCHES ** 2 + 1, TINY_PATCHES ** 2 - 1],
                         ids=["full_with_class_token", "default_without_class_token"])
def test_crops_that_are_not_a_square_feature_grid_are_refused_like_transformers(tokens_per_crop):
    """CLIP with "full" keeps the class token (17 per crop here), SigLIP with "default" drops a patch (15):
    transformers' pack_image_features cannot lay those out as a 4 x 4 grid and fails; we say why."""
    with pytest.raises(RuntimeError):
        hf_packed_rows((40, 60), tokens_per_crop, 999)
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        anyres_layout((40, 60), TINY_PINPOINTS, TINY_CROP, TINY_PATCHES, tokens_per_crop)


def test_newline_index_inside_the_image_rows_is_refused():
    layout = anyres_layout((40, 60), TINY_PINPOINTS, TINY_CROP, TINY_PATCHES, TINY_PATCHES ** 2)
    with pytest.raises(ValueError, match="newline_index"):
        layout.gather_indices(3)


@pytest.mark.parametrize("pinpoints, message", [([], "empty"), ([[336, 500]], "multiple of the crop size"),
                                                ([[336]], "pair of positive integers")])
def test_bad_pinpoints_are_refused_naming_the_key(pinpoints, message):
    with pytest.raises(ValueError, match=f"image_grid_pinpoints.*{message}"):
        check_pinpoints(pinpoints, CROP)
