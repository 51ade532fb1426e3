"""Images: decode (file path, encoded bytes, array or PIL image) -> RGB -> square -> tower size -> normalised.

Public surface: `open_image(ref) -> PIL RGB image` (raises BadSample), `image_size_hw(ref)` (header only: anyres
counts an image's tokens before decoding it), `to_rgb(image)`, `image_stats(config)`,
`normalize_pixels(pixels, image_mask, mean, std)` (THE normalisation: jitted train step, evaluation, generation),
`ImageProcessor(config)`: `(ref) -> uint8 [S, S, 3]` and `.normalize(pixels, image_mask) -> float32`.
A path with a URI scheme (gs://, s3://, ...) is read whole through etils.epath; local paths are opened directly.
Training batches carry uint8 pixels (4x less to copy on the host and to send to devices); the train step
normalises them on device.
Aspect (data.image_aspect), pixel for pixel as LLaVA-1.5 makes them (tests/test_data_images_llava_parity.py):
`pad`: LLaVA's expand2square with `int(255 * mean)` (truncated), then CLIPImageProcessor's bicubic resize to S;
`center_crop`: CLIPImageProcessor alone (shortest side to S, long side `int(S * long / short)`, centre crop);
`resize`: stretch to S x S (bicubic).
"""
from __future__ import annotations

import io
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from llava_jax.data.bad_samples import BadSample
from llava_jax.paths import is_remote

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_STATS_BY_KIND = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)


def image_stats(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the vision tower's kind, unless data.image_mean / data.image_std override them."""
    mean, std = _STATS_BY_KIND[config.model.vision.kind]
    return tuple(config.data.image_mean or mean), tuple(config.data.image_std or std)


def normalize_pixels(pixels, image_mask, mean, std) -> jnp.ndarray:
    """uint8 pixels [..., I, S, S, 3] (anyres: [..., I, C, S, S, 3]) -> float32 (pixels / 255 - mean) / std per
    channel; image slots whose image_mask [..., I] (or crops whose [..., I, C] mask) is 0 become exactly 0. Works
    inside jit and on host (numpy) arrays."""
    scale = jnp.asarray(1.0 / (255.0 * np.asarray(std, np.float64)), jnp.float32)         # [3]
    offset = jnp.asarray(-np.asarray(mean, np.float64) / np.asarray(std, np.float64), jnp.float32)
    normalized = jnp.asarray(pixels).astype(jnp.float32) * scale + offset
    image_mask = jnp.asarray(image_mask)
    has_image = image_mask.reshape(image_mask.shape + (1,) * (normalized.ndim - image_mask.ndim)) != 0
    return jnp.where(has_image, normalized, 0.0)


_normalize_pixels_jit = jax.jit(normalize_pixels, static_argnums=(2, 3))   # one fused pass (eager: ~20x slower)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha is composited onto white, 16-bit grey is scaled (not clipped) to 8 bit."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):                    # "I;16", "I;16B", "I" (16-bit PNGs open as one of these)
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_image_bytes(path: Any) -> bytes:
    """The bytes of an image file, local or remote (etils.epath: gs://, s3://, ...); BadSample if it is missing,
    empty or unreadable."""
    from etils import epath
    try:
        data = epath.Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_image", f"{path}: no such file") from None
    except OSError as e:
        raise BadSample("corrupt_image", f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if not data:
        raise BadSample("empty_image", f"{path}: file has 0 bytes")
    return data


def _decode(ref: Any, load: bool = True) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, np.ndarray):
        if ref.size == 0:
            raise BadSample("empty_image", f"image array has shape {ref.shape}")
        return Image.fromarray(ref.squeeze(-1) if ref.ndim == 3 and ref.shape[-1] == 1 else ref)
    if isinstance(ref, (bytes, bytearray)):
        if not ref:
            raise BadSample("empty_image", "encoded image has 0 bytes")
        image = Image.open(io.BytesIO(ref))
    else:
        path = os.fspath(ref)
        if is_remote(path):                            # gs://, s3://, ...: the whole file's bytes through epath
            image = Image.open(io.BytesIO(read_image_bytes(path)))
        else:
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise BadSample("missing_image", f"{path}: no such file") from None
            if size == 0:
                raise BadSample("empty_image", f"{path}: file has 0 bytes")
            image = Image.open(path)
    if load:
        image.load()
    return image


def _bad_image(ref: Any, error: Exception) -> BadSample:
    where = f"{os.fspath(ref)}: " if isinstance(ref, (str, os.PathLike)) else ""
    return BadSample("corrupt_image", f"{where}cannot decode image ({type(error).__name__}: {error})")


def image_size_hw(ref: Any) -> tuple[int, int]:
    """(height, width) of `ref` from its header alone (PIL opens lazily; arrays and PIL images as they are);
    raises BadSample as `open_image` does for missing, empty or unreadable images. The pixels may still turn out
    corrupt when `open_image` decodes them."""
    if isinstance(ref, np.ndarray) and ref.size and ref.ndim >= 2:
        return int(ref.shape[0]), int(ref.shape[1])
    try:
        image = _decode(ref, load=False)
        size = image.size
        if image is not ref:
            image.close()
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise _bad_image(ref, e) from None
    if size[0] == 0 or size[1] == 0:
        raise BadSample("empty_image", f"image has size {size[0]}x{size[1]}")
    return size[1], size[0]


def open_image(ref: Any) -> Image.Image:
    """Decodes `ref` (path, encoded bytes, uint8 array or PIL image) to RGB; raises BadSample for bad images."""
    try:
        image = _decode(ref)
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise _bad_image(ref, e) from None
    if image.width == 0 or image.height == 0:
        raise BadSample("empty_image", f"image has size {image.width}x{image.height}")
    return to_rgb(image)


class ImageProcessor:
    """`processor(ref)` -> uint8 [S, S, 3] (decoded, squared, resized); `processor.normalize(pixels, image_mask)`
    -> float32 numpy via `normalize_pixels` (evaluation and generation; training normalises on device)."""

    def __init__(self, config):
        self.size = config.model.vision.image_size
        self.aspect = config.data.image_aspect
        self.mean, self.std = image_stats(config)
        # LLaVA-1.5 (llava/train/train.py) pads with `tuple(int(x * 255) for x in image_processor.image_mean)`:
        # truncated, not rounded, so CLIP's mean is (122, 116, 104) and SigLIP's 0.5 is (127, 127, 127).
        self.pad_color = tuple(int(255 * m) for m in self.mean)

    def square(self, image: Image.Image) -> Image.Image:
        """RGB image -> S x S RGB image (data.image_aspect; see the module docstring)."""
        width, height = image.size
        if self.aspect == "pad" and width != height:
            image = self._pad_to_square(image)
        elif self.aspect == "center_crop" and width != height:
            return self._shortest_side_then_crop(image)
        if image.size != (self.size, self.size):              # PIL would copy an S x S image unchanged anyway
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return image

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        """LLaVA's expand2square: a wide image is pasted at (0, (w - h) // 2), a tall one at ((h - w) // 2, 0)."""
        width, height = image.size
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), self.pad_color)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def _shortest_side_then_crop(self, image: Image.Image) -> Image.Image:
        """CLIPImageProcessor's resize + center crop: the short side becomes S and the long side
        `int(S * long / short)` (truncated, as transformers' get_resize_output_image_size), then the centre S x S."""
        width, height = image.size
        long_side = int(self.size * max(width, height) / min(width, height))
        new_size = (long_side, self.size) if width > height else (self.size, long_side)
        image = image.resize(new_size, Image.BICUBIC)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, ref: Any) -> np.ndarray:
        return np.asarray(self.square(open_image(ref)))

    def normalize(self, pixels: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
        """uint8 [..., I, S, S, 3] -> float32 numpy, `normalize_pixels` with the tower's mean/std."""
        return np.asarray(_normalize_pixels_jit(pixels, image_mask, self.mean, self.std))
