"""Images as LLaVA-1.5 makes them: our uint8 pixels are bit-identical to LLaVA's expand2square + transformers'
CLIPImageProcessor, and our normalised float32 pixels match the processor's pixel_values within 1e-6.

The photos are real: scikit-learn's two bundled sample images (`sklearn.datasets.load_sample_images()`: china.jpg
and flower.jpg, 427 x 640, shipped inside the sklearn package, so nothing is downloaded), cropped to odd shapes.
The reference processor is `CLIPImageProcessorPil`, the PIL/numpy backend (in transformers 5 `CLIPImageProcessor`
is the torchvision one), built from an openai/clip-vit-large-patch14-336 style preprocessor config dict.
"""
import functools

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sklearn_datasets
from transformers import CLIPImageProcessorPil

from llava_jax.data.images import CLIP_MEAN, CLIP_STD, ImageProcessor

# name -> (top, left, height, width) of a crop of a 427 x 640 photo; odd (side - short side) differences check the
# // 2 of the paste offset, "exact_side" is 336 wide (no resize at 336), "tiny" ones are upscaled a lot.
CROPS = {
    "whole_photo": (0, 0, 427, 640),
    "wide_3_to_1": (100, 20, 201, 600),
    "tall": (0, 200, 427, 150),
    "square": (50, 100, 300, 300),
    "exact_side": (90, 150, 201, 336),
    "tiny_tall": (10, 300, 211, 37),
    "tiny_wide": (300, 7, 36, 211),
}
SIZES = (336, 224)                                         # CLIP ViT-L/14-336, and a smaller tower


@functools.lru_cache(maxsize=None)
def photos():
    return {name: image for name, image in zip(("china", "flower"), sklearn_datasets.load_sample_images().images)}


def crop(photo, crop_name):
    top, left, height, width = CROPS[crop_name]
    return Image.fromarray(photos()[photo][top:top + height, left:left + width])


def expand2square(pil_img, background_color):
    """Verbatim from haotian-liu/LLaVA llava/mm_utils.py (independent of our code)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@functools.lru_cache(maxsize=None)
def clip_processor(size):
    return CLIPImageProcessorPil.from_dict({
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}, "resample": 3,
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True})


def reference(image, size):
    """(uint8 [S, S, 3] before rescaling, float32 pixel_values as [S, S, 3]) from the CLIP processor."""
    processor = clip_processor(size)
    raw = processor(image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    normalized = processor(image, return_tensors="np")["pixel_values"][0]
    assert raw.dtype == np.uint8 and normalized.dtype == np.float32
    return raw.transpose(1, 2, 0), normalized.transpose(1, 2, 0)      # [3, S, S] -> [S, S, 3]


def tower_config(tiny_config, aspect, size):
    """The tiny config with an S px tower; 112 px patches keep its image tokens (9 or 4) inside data.max_length."""
    return tiny_config(f"data.image_aspect={aspect}", f"model.vision.image_size={size}", "model.vision.patch_size=112")


def ours(config, image):
    processor = ImageProcessor(config)
    pixels = processor(image)
    return pixels, processor.normalize(pixels[None], np.ones(1, np.int32))[0]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("crop_name", list(CROPS))
@pytest.mark.parametrize("photo", ["china", "flower"])
def test_pad_aspect_is_bit_identical_to_llava_expand2square_and_clip_processor(tiny_config, photo, crop_name, size):
    image = crop(photo, crop_name)
    pixels, normalized = ours(tower_config(tiny_config, "pad", size), image)
    llava_pad = tuple(int(x * 255) for x in clip_processor(size).image_mean)      # as llava/train/train.py
    expected_pixels, expected_normalized = reference(expand2square(image, llava_pad), size)
    assert pixels.dtype == np.uint8 and pixels.shape == (size, size, 3)
    assert np.array_equal(pixels, expected_pixels)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized, expected_normalized, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("crop_name", list(CROPS))
def test_center_crop_aspect_is_bit_identical_to_the_clip_processor_alone(tiny_config, crop_name, size):
    """LLaVA without `pad` feeds the photo straight to the processor: short side to S, long side truncated."""
    image = crop("china", crop_name)
    pixels, normalized = ours(tower_config(tiny_config, "center_crop", size), image)
    expected_pixels, expected_normalized = reference(image, size)
    assert np.array_equal(pixels, expected_pixels)
    np.testing.assert_allclose(normalized, expected_normalized, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides, pad_color", [
    ((), (122, 116, 104)),                                 # int(255 * CLIP mean); rounding would give (123, 117, 104)
    (("model.vision.kind=siglip",), (127, 127, 127)),      # int(255 * 0.5) = int(127.5)
])
def test_pad_colour_is_the_mean_truncated_to_uint8_as_llava_does(tiny_config, overrides, pad_color):
    processor = ImageProcessor(tiny_config("data.image_aspect=pad", *overrides))        # 28 px tower
    assert processor.pad_color == pad_color
    pixels = processor(Image.new("RGB", (28, 14), (255, 0, 0)))        # 28 wide: padded to 28 x 28, no resize
    assert pixels[0, 0].tolist() == pixels[27, 27].tolist() == list(pad_color)       # rows 0-6 and 21-27 are pad
    assert pixels[7, 0].tolist() == pixels[20, 27].tolist() == [255, 0, 0]
