"""Images: RGB conversion of every PIL mode, aspect handling, normalisation stats, and bad image files."""
import numpy as np
import pytest
from data_helpers import write_image
from PIL import Image

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.images import (CLIP_MEAN, CLIP_STD, ImageProcessor, image_stats, normalize_pixels, open_image,
                                   to_rgb)


def pixel(image):
    return tuple(int(v) for v in np.asarray(image)[0, 0])


@pytest.mark.parametrize("mode, color, rgb", [
    ("L", 100, (100, 100, 100)),
    ("LA", (100, 0), (255, 255, 255)),                    # fully transparent -> white background
    ("LA", (100, 255), (100, 100, 100)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("I;16", 65535, (255, 255, 255)),                     # 16 bit is scaled, not clipped
    ("I;16", 32896, (128, 128, 128)),
    ("I", 257 * 40, (40, 40, 40)),
])
def test_to_rgb_converts_every_mode(mode, color, rgb):
    converted = to_rgb(Image.new(mode, (2, 2), color))
    assert converted.mode == "RGB" and pixel(converted) == rgb


def test_palette_images_with_and_without_transparency():
    palette = Image.new("RGB", (2, 2), (0, 200, 0)).convert("P", palette=Image.ADAPTIVE)
    assert pixel(to_rgb(palette)) == (0, 200, 0)
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert pixel(to_rgb(palette)) == (255, 255, 255)


def test_sixteen_bit_png_file_decodes_to_scaled_rgb(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(path)
    assert pixel(open_image(str(path))) == (255, 255, 255)


def normalized(config, image):
    processor = ImageProcessor(config)
    return processor.normalize(processor(image)[None], np.ones(1, np.int32))[0]


def test_pad_aspect_pads_with_the_mean_colour(tiny_config):
    wide = Image.new("RGB", (56, 28), (255, 0, 0))
    out = normalized(tiny_config("data.image_aspect=pad"), wide)        # 28 px tower, CLIP stats
    assert out.shape == (28, 28, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 14], 0.0, atol=0.03)               # mean colour normalises to ~0
    np.testing.assert_allclose(out[14, 14], (np.array([1, 0, 0]) - CLIP_MEAN) / CLIP_STD, atol=1e-5)


def test_resize_aspect_stretches_and_center_crop_keeps_the_middle(tiny_config):
    image = Image.new("RGB", (84, 28), (0, 0, 255))
    image.paste((0, 255, 0), (28, 0, 56, 28))                            # middle third green
    stretched = ImageProcessor(tiny_config("data.image_aspect=resize"))(image)
    cropped = ImageProcessor(tiny_config("data.image_aspect=center_crop"))(image)
    assert stretched.shape == cropped.shape == (28, 28, 3) and stretched.dtype == np.uint8
    assert stretched[14, 1].tolist() == [0, 0, 255]                      # the blue left third survives
    assert (cropped == [0, 255, 0]).all()


def test_normalisation_stats_follow_the_tower_kind_unless_overridden(tiny_config):
    assert image_stats(tiny_config()) == (CLIP_MEAN, CLIP_STD)
    assert image_stats(tiny_config("model.vision.kind=siglip")) == ((0.5,) * 3, (0.5,) * 3)
    config = tiny_config("model.vision.kind=siglip", "data.image_mean=[0.1,0.2,0.3]", "data.image_std=[1,2,3]")
    assert image_stats(config) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    out = normalized(config, Image.new("RGB", (28, 28), (255, 255, 255)))
    np.testing.assert_allclose(out[0, 0], [0.9, 0.4, 0.7 / 3], atol=1e-6)


def test_normalize_zeroes_the_slots_without_an_image(tiny_config):
    processor = ImageProcessor(tiny_config())
    pixels = np.full((2, 3, 28, 28, 3), 200, np.uint8)                  # [batch, images, S, S, 3]
    out = processor.normalize(pixels, np.array([[1, 1, 0], [1, 0, 0]]))
    assert out.dtype == np.float32 and (out[0, 2] == 0).all() and (out[1, 1:] == 0).all()
    np.testing.assert_allclose(out[1, 0, 5, 5], (200 / 255 - np.array(CLIP_MEAN)) / CLIP_STD, rtol=1e-5)


def test_normalize_pixels_inside_jit_matches_the_formula_and_the_host_path(tiny_config):
    """The train step normalises uint8 batches on device with the function evaluation uses on the host."""
    import jax
    config = tiny_config()
    mean, std = image_stats(config)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 28, 28, 3), dtype=np.uint8)
    image_mask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
    on_device = np.asarray(jax.jit(lambda p, m: normalize_pixels(p, m, mean, std))(pixels, image_mask))
    expected = (pixels / 255.0 - np.array(mean)) / np.array(std) * image_mask[..., None, None, None]
    assert on_device.dtype == np.float32 and not on_device[image_mask == 0].any()
    np.testing.assert_allclose(on_device, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ImageProcessor(config).normalize(pixels, image_mask), on_device, rtol=1e-6, atol=1e-6)


def test_bad_image_files_raise_bad_sample_with_reason(tmp_path):
    jpeg = write_image(tmp_path / "ok.jpg", (32, 32), fmt="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(open(jpeg, "rb").read()[:200])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {"missing.png": "missing_image", "truncated.jpg": "corrupt_image", "garbage.png": "corrupt_image",
             "empty.png": "empty_image"}
    for name, reason in cases.items():
        with pytest.raises(BadSample) as info:
            open_image(str(tmp_path / name))
        assert info.value.reason == reason and name in info.value.detail
    with pytest.raises(BadSample, match="empty_image"):
        open_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(BadSample, match="corrupt_image"):
        open_image(b"x")
