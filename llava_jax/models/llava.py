"""LlavaModel: vision tower -> projector -> image features scattered into the token embeddings -> decoder.

Public surface: `LlavaModel(config).apply({"params": p}, input_ids, pixel_values, attention_mask=None,
image_mask=None, segment_ids=None, positions=None, image_feature_ids=None) -> logits [B, T, V] float32`;
`init_params(config, rng)`; `params_of(variables)` / `model_variables(params)` (the LoRA adapters, a variable
collection of their own, are params["lora"] everywhere outside the model); `check_image_tokens(...)`.
Sample b's images fill its image-token positions in order, which equals transformers' masked_scatter when each
sample holds exactly (real images x tokens_per_image) image tokens. With model.anyres.enabled (LLaVA-NeXT)
`image_feature_ids` say which crop feature (or the learned `image_newline`) each image token gets
(models/anyres_features.py; built by llava_jax.data.anyres_inputs).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import ModelConfig
from llava_jax.models.anyres_features import check_feature_ids, merge_anyres_features
from llava_jax.models.attention import check_trailing_padding
from llava_jax.models.decoder import LanguageModel
from llava_jax.models.layers import LORA, REMAT_POLICIES
from llava_jax.models.projector import Projector
from llava_jax.models.vit import VisionTower


def check_image_tokens(input_ids, image_mask, num_images: int, config: ModelConfig) -> None:
    """Raises ValueError if a sample's image-token count != its real images x tokens_per_image (host arrays)."""
    input_ids = np.asarray(input_ids)
    found = (input_ids == config.image_token_id).sum(axis=1)
    real = np.full(input_ids.shape[0], num_images) if image_mask is None else np.asarray(image_mask).sum(axis=1)
    expected = real * config.tokens_per_image
    bad = np.nonzero(found != expected)[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"sample {b} has {int(found[b])} image tokens (id {config.image_token_id}) but {int(real[b])} real "
            f"image(s) x {config.tokens_per_image} tokens per image = {int(expected[b])}; expand each <image> to "
            f"exactly tokens_per_image copies and pass image_mask for samples with fewer images "
            f"({bad.size} sample(s) mismatched)")


def merge_image_features(embeds: jax.Array, image_features: jax.Array, is_image: jax.Array) -> jax.Array:
    """embeds [B, T, E], image_features [B, M, E] (a sample's images in order), is_image [B, T] -> [B, T, E].

    The k-th image token of sample b receives image_features[b, k] (cumsum index), like masked_scatter.
    """
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class LlavaModel(nn.Module):
    config: ModelConfig
    freeze_vision: bool = False   # stop_gradient on the vision tower's output (no backward through it)

    def setup(self):
        self.vision_tower = VisionTower(self.config)
        # rematted like the layers: its backward recomputes it instead of keeping its gathered weights
        remat = self.config.remat
        projector = Projector if remat == "none" else nn.remat(Projector, policy=REMAT_POLICIES[remat])
        self.projector = projector(self.config)
        self.language_model = LanguageModel(self.config)
        if self.config.anyres.enabled:
            # transformers' LlavaNextModel: randn(E) / sqrt(E)
            embed = self.config.decoder.hidden_size
            self.image_newline = self.param(
                "image_newline", nn.with_logical_partitioning(nn.initializers.normal(embed ** -0.5), ("embed",)),
                (embed,), jnp.float32)

    def encode_images(self, pixel_values: jax.Array, accumulator: Optional[dict] = None) -> jax.Array:
        """pixel_values [B, I, H, W, C] -> projected image features [B, I * tokens_per_image, E]."""
        batch, num_images = pixel_values.shape[:2]
        features = self.vision_tower(pixel_values.reshape(batch * num_images, *pixel_values.shape[2:]), accumulator)
        if self.freeze_vision:
            features = jax.lax.stop_gradient(features)
        projected = self.projector(features)                               # [B*I, N, E]
        return projected.reshape(batch, num_images * projected.shape[1], projected.shape[2])

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Vision tower + projector alone: [N, H, W, C] -> [N, tokens_per_image, E] (get_image_features)."""
        return self.projector(self.vision_tower(pixel_values))

    def __call__(self, input_ids: jax.Array, pixel_values: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, image_mask: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
                 return_hidden: bool = False, cache_length: Optional[int] = None,
                 grad_accumulators: Optional[dict] = None,
                 image_feature_ids: Optional[jax.Array] = None) -> jax.Array:
        """input_ids [B, T] int32 (images pre-expanded), pixel_values [B, I, H, W, 3] or None,
        attention_mask [B, T] (1 = real token), image_mask [B, I] (1 = real image; real images first),
        segment_ids [B, T] (packing; 0 = padding; overrides attention_mask), positions [B, T]. Host inputs are
        checked (image-token counts; with model.attention=cudnn, right padding) before anything runs.
        `cache_length`: run on the decoder's KV cache (see `LanguageModel`; llava_jax.generate drives it).
        `grad_accumulators`: {"language_model" / "vision_tower": the gradients so far of that part's layer stack}
        (train step, gradient accumulation): their weight gradients come back added into them in place.
        anyres (model.anyres.enabled): pixel_values [B, I, C, H, W, 3] (C = model.crops_per_image, an image's crops
        in anyres_crops order, zero-padded) and image_feature_ids [B, T] int32 (-1 text, -2 image_newline, k >= 0
        row k of the row's crop table, image i / crop c / patch p at (i * C + c) * tokens_per_image + p). Without
        image_feature_ids the inputs are LLaVA-1.5's (an anyres model's `image_newline` is simply not read)."""
        accumulators = grad_accumulators or {}
        anyres = image_feature_ids is not None
        crop_axis = pixel_values is not None and pixel_values.ndim == 6
        if anyres != crop_axis or (anyres and not self.config.anyres.enabled):
            raise ValueError("anyres inputs are pixel_values [B, I, C, H, W, 3] with image_feature_ids and "
                             f"model.anyres.enabled=true; got pixel_values of rank "
                             f"{None if pixel_values is None else pixel_values.ndim}, image_feature_ids "
                             f"{'given' if anyres else 'None'}, model.anyres.enabled={self.config.anyres.enabled}")
        num_images = 0 if pixel_values is None else pixel_values.shape[1]
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = (jnp.ones((batch, length), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        on_host = not isinstance(input_ids, jax.core.Tracer) and not isinstance(image_feature_ids, jax.core.Tracer)
        if anyres and on_host:
            table_rows = num_images * self.config.crops_per_image * self.config.tokens_per_image
            check_feature_ids(input_ids, image_feature_ids, table_rows, self.config.image_token_id)
        elif not anyres and not isinstance(input_ids, jax.core.Tracer):
            check_image_tokens(input_ids, image_mask, num_images, self.config)
        if self.config.attention == "cudnn" and cache_length is None and not isinstance(segment_ids, jax.core.Tracer):
            check_trailing_padding(segment_ids)
        embeds = self.language_model.embed(input_ids)
        if anyres:
            embeds = self._merge_anyres(embeds, pixel_values, image_feature_ids, accumulators.get("vision_tower"))
        elif num_images:
            is_image = input_ids == self.config.image_token_id
            features = self.encode_images(pixel_values, accumulators.get("vision_tower"))
            embeds = merge_image_features(embeds, features, is_image)
        hidden = self.language_model(embeds, positions, segment_ids, cache_length,
                                     accumulators.get("language_model"))
        return hidden if return_hidden else self.language_model.logits(hidden)

    def _merge_anyres(self, embeds: jax.Array, pixel_values: jax.Array, image_feature_ids: jax.Array,
                      accumulator: Optional[dict]) -> jax.Array:
        """LLaVA-NeXT: all B*I*C crops through the tower + projector (padded crops too; nothing reads them), then
        each image token takes the row of its crop table (or image_newline) that image_feature_ids names."""
        batch, num_images, num_crops = pixel_values.shape[:3]
        if num_crops != self.config.crops_per_image:
            raise ValueError(f"pixel_values has {num_crops} crops per image, model.crops_per_image is "
                             f"{self.config.crops_per_image} (model.anyres.max_crops)")
        crops = pixel_values.reshape(batch, num_images * num_crops, *pixel_values.shape[3:])
        features = self.encode_images(crops, accumulator)                                    # [B, I*C*P, E]
        return merge_anyres_features(embeds, features, self.image_newline, image_feature_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)


def head_params(params: dict, config: ModelConfig) -> dict:
    """The part of a params tree that `LlavaModel.logits` needs: the tied embedding table or `lm_head` (and an
    anyres model's `image_newline`, which its setup makes; its gradient there is zero)."""
    name = "embed_tokens" if config.decoder.tie_embeddings else "lm_head"
    extra = {"image_newline": params["image_newline"]} if config.anyres.enabled else {}
    return {"language_model": {name: params["language_model"][name]}, **extra}


def dummy_inputs(config: ModelConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Smallest (input_ids, pixel_values) that touch every parameter: one image per sample (anyres's
    `image_newline` is made in setup, whatever the inputs)."""
    v = config.vision
    input_ids = jnp.full((batch, config.tokens_per_image), config.image_token_id, jnp.int32)
    pixels = jnp.zeros((batch, 1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return input_ids, pixels


def params_of(variables: dict) -> dict:
    """The params tree of a model's variables: "params", with the LoRA adapters (the "lora" collection, when the
    model has them) as one more top-level group, params["lora"], which trains, freezes and saves as the others."""
    params = dict(variables["params"])
    if LORA in variables:
        params[LORA] = variables[LORA]
    return params


def model_variables(params: dict) -> dict:
    """`params_of`'s inverse: the variables to `apply` the model with."""
    if LORA not in params:
        return {"params": params}
    return {"params": {k: v for k, v in params.items() if k != LORA}, LORA: params[LORA]}


def init_params(config: ModelConfig, rng: jax.Array, boxed: bool = False):
    """Initialises float32 params (`params_of`). `boxed=True` keeps nn.Partitioned metadata (logical axes)."""
    params = params_of(LlavaModel(config).init(rng, *dummy_inputs(config)))
    return params if boxed else nn.meta.unbox(params)
