"""One example from any source -> model inputs: a training sample or an evaluation prompt.

Public surface: `Example` (what every source yields), `IMAGE_MODES` and `ExampleEncoder(config, tokenizer)` with
`tokens(example)` (input_ids, loss_mask), `sample(example)` (+ uint8 pixel_values [k, S, S, 3], image_mask [k],
"_id"), `eval_example(example)` (float32 pixel_values, normalised with `images.normalize_pixels`) and
`base_only(example)` (anyres image modes), and
`place_images(turns, placement)` (data.image_placement). `sample` and `eval_example` raise BadSample for malformed
conversations, <image>/image count mismatches, too many images, too long sequences and unreadable images (checked
in that order, so images are decoded last).
With model.anyres.enabled (LLaVA-NeXT / OneVision) each <image> expands to its own token count, so the image sizes
are read from the image headers (`images.image_size_hw`, no decoding) before tokenizing: a missing or unreadable
header is a bad sample before "too_long"; the pixels are still decoded last. `sample` gives pixel_values uint8
[k, C, S, S, 3] (C = model.crops_per_image, anyres crops zero-padded) and image_feature_ids int32 [L]
(llava_jax.data.anyres_inputs: -1 text, -2 image_newline, else the row of the sample's crop table). Image modes:
"anyres" (base + tiles + newlines) or "base" (the base crop alone: 1 crop, tokens_per_image tokens + one newline).
`Example.image_mode` sets a record's; otherwise a single image is anyres and several are data.anyres_multi_image
(default "base", as LLaVA-OneVision treats multi-image samples). Crops are padded black as LlavaNextImageProcessor
pads them (data.image_aspect does not apply).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from llava_jax.data import anyres_inputs
from llava_jax.data.bad_samples import BadSample
from llava_jax.data.images import ImageProcessor, image_size_hw, open_image
from llava_jax.data.sequences import fit_length
from llava_jax.data.templates import IMAGE_PLACEHOLDER, check_template, encode, get_template
from llava_jax.data.tokenizers import ChatTemplateError


@dataclass
class Example:
    id: str
    turns: list[tuple[str, str]]                          # (role, text); roles: system, user, assistant
    images: list[Any] = field(default_factory=list)       # references for images.open_image, in <image> order
    answers: Optional[list[str]] = None                    # references for evaluation (default: the last answer)
    image_mode: Optional[str] = None                       # anyres only: "anyres" | "base" (None: config's choice)


IMAGE_MODES = ("anyres", "base")


def validate_turns(example: Example) -> None:
    """Optional system turn, then user/assistant pairs ending with a non-empty assistant answer."""
    def bad(detail: str) -> BadSample:
        return BadSample("malformed_record", detail, example.id)
    turns = example.turns
    first = 1 if turns and turns[0][0] == "system" else 0
    if len(turns) == first:
        raise bad("the conversation has no user/assistant turns")
    for k, (role, text) in enumerate(turns):
        if not isinstance(text, str):
            raise bad(f"turn {k} has a {type(text).__name__} value, expected text")
        expected = "system" if k < first else ("user", "assistant")[(k - first) % 2]
        if role != expected:
            raise bad(f"turn {k} has role {role!r}, expected {expected!r} (turns must alternate, user first)")
        if role == "assistant" and not text.strip():
            raise bad(f"turn {k} is an empty answer")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise bad(f"turn {k}: {IMAGE_PLACEHOLDER} inside an answer")
    if turns[-1][0] != "assistant":
        raise bad("the conversation does not end with an assistant answer")


def place_images(turns: list[tuple[str, str]], placement: str) -> list[tuple[str, str]]:
    """data.image_placement: `keep` leaves each <image> where the record has it; `front` moves the placeholders of a
    user turn to its front, as LLaVA-1.5's preprocessing does ("<image>\n" + the text without them, stripped;
    several images stay several placeholders)."""
    if placement == "keep":
        return turns
    placed = []
    for role, text in turns:
        count = text.count(IMAGE_PLACEHOLDER) if role == "user" else 0
        if count:
            text = f"{IMAGE_PLACEHOLDER}\n" * count + text.replace(IMAGE_PLACEHOLDER, "").strip()
        placed.append((role, text))
    return placed


class ExampleEncoder:
    """Turns Examples into token ids + loss mask (templates) and tower-sized images for one config."""

    def __init__(self, config, tokenizer):
        self.tokenizer = tokenizer
        self.template = get_template(config.data.template)
        self.system_prompt = config.data.system_prompt
        self.image_placement = config.data.image_placement
        self.tokens_per_image = config.model.tokens_per_image
        self.max_length = config.data.sample_length
        self.length_key = "data.max_sample_length" if config.data.max_sample_length else "data.max_length"
        self.max_images = config.data.max_images
        self.image_size = config.model.vision.image_size
        self.images = ImageProcessor(config)
        self.model = config.model
        self.anyres = config.model.anyres.enabled
        self.multi_image_mode = config.data.anyres_multi_image
        check_template(self.template, tokenizer, self.tokens_per_image)

    def _check(self, example: Example) -> None:
        validate_turns(example)
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in example.turns if role == "user")
        if placeholders != len(example.images):
            raise BadSample("image_count_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                            f"{len(example.images)} image(s)", example.id)
        if len(example.images) > self.max_images:
            raise BadSample("too_many_images", f"{len(example.images)} images > data.max_images="
                            f"{self.max_images}", example.id)
        if example.image_mode is not None and example.image_mode not in IMAGE_MODES:
            raise BadSample("malformed_record", f"image_mode {example.image_mode!r} is not one of {IMAGE_MODES}",
                            example.id)

    def base_only(self, example: Example) -> list[bool]:
        """Per image: True when it is its base crop alone (anyres only; see the module docstring)."""
        if not self.anyres:
            return [False] * len(example.images)
        mode = example.image_mode or (self.multi_image_mode if len(example.images) > 1 else "anyres")
        return [mode == "base"] * len(example.images)

    def _image_sizes(self, example: Example) -> list[tuple[int, int]]:
        """(height, width) of each image from its header (anyres token counts); BadSample names the example."""
        sizes = []
        for ref in example.images:
            try:
                sizes.append(image_size_hw(ref))
            except BadSample as bad:
                bad.example_id = example.id
                raise
        return sizes

    def _encode(self, render, example: Example):
        """(ids, mask, image sizes (anyres) or None, base_only flags) of the rendered conversation."""
        turns = place_images(example.turns, self.image_placement)
        conversation = self._render(render, turns, example)
        if not self.anyres:
            ids, mask = encode(conversation, self.tokenizer, self.tokens_per_image)
            return ids, mask, None, None
        sizes, flags = self._image_sizes(example), self.base_only(example)
        counts = [anyres_inputs.image_token_count(size, self.model, base) for size, base in zip(sizes, flags)]
        try:
            ids, mask = encode(conversation, self.tokenizer, counts)
        except ValueError as error:
            raise BadSample("image_count_mismatch", str(error), example.id) from None
        return ids, mask, sizes, flags

    def _anyres_pixels(self, example: Example, sizes, flags, slots: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [slots, C, S, S, 3] each image's crops, zero-padded; int32 [slots, C] crop mask)
        (`anyres_inputs.crop_pixels`) of the decoded images, each checked against its header size."""
        images = []
        for k, (ref, size_hw) in enumerate(zip(example.images, sizes)):
            try:
                image = open_image(ref)
            except BadSample as bad:
                bad.example_id = example.id
                raise
            if (image.height, image.width) != tuple(size_hw):
                raise BadSample("corrupt_image", f"image {k} decodes to {image.height}x{image.width}, its header "
                                f"says {size_hw[0]}x{size_hw[1]}", example.id)
            images.append(image)
        return anyres_inputs.crop_pixels(images, self.model, slots, base_only=flags)

    def _pixels(self, example: Example, slots: int) -> np.ndarray:
        """uint8 [slots, S, S, 3]: the example's images first, zeros after."""
        pixels = np.zeros((slots, self.image_size, self.image_size, 3), np.uint8)
        for k, ref in enumerate(example.images):
            try:
                pixels[k] = self.images(ref)
            except BadSample as bad:
                bad.example_id = example.id
                raise
        return pixels

    def _render(self, render, turns, example: Example):
        try:
            return render(turns, self.tokenizer, self.system_prompt)
        except ChatTemplateError as error:
            raise BadSample("malformed_record", str(error), example.id) from None

    def _tokens(self, example: Example):
        self._check(example)
        ids, mask, sizes, flags = self._encode(self.template.render, example)
        ids, mask = fit_length(ids, mask, self.max_length, self.tokenizer.image_token_id, example.id,
                               self.length_key)
        return ids, mask, sizes, flags

    def tokens(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """input_ids int32 [L] and loss_mask float32 [L] (L <= data.sample_length) of a training sample; no image
        is decoded (anyres reads the image headers)."""
        ids, mask, _, _ = self._tokens(example)
        return ids, mask

    def sample(self, example: Example) -> dict[str, Any]:
        """A training sample: `tokens` (input_ids, loss_mask), pixel_values uint8 [k, S, S, 3] (normalised on
        device by the train step), image_mask int32 [k] (k = the example's images) and "_id". anyres:
        pixel_values uint8 [k, C, S, S, 3] and image_feature_ids int32 [L] (image j's rows at j * C * P + ...)."""
        ids, mask, sizes, flags = self._tokens(example)
        num_images = len(example.images)
        if not self.anyres:
            return {"input_ids": ids, "loss_mask": mask, "pixel_values": self._pixels(example, num_images),
                    "image_mask": np.ones(num_images, np.int32), "_id": example.id}
        feature_ids = anyres_inputs.image_feature_ids(ids, sizes, self.model, num_images, base_only=flags)
        pixels, _ = self._anyres_pixels(example, sizes, flags, num_images)
        return {"input_ids": ids, "loss_mask": mask, "pixel_values": pixels,
                "image_mask": np.ones(num_images, np.int32), "image_feature_ids": feature_ids, "_id": example.id}

    def eval_example(self, example: Example) -> dict[str, Any]:
        """id, prompt_ids int32 [L] (up to where the last answer starts), pixel_values float32 [I, S, S, 3]
        (`images.normalize_pixels`: zeros where there is no image), image_mask int32 [I] (I = data.max_images)
        and answers (reference texts). anyres: pixel_values float32 [I, C, S, S, 3] (padded crops 0) and
        image_feature_ids int32 [L]."""
        self._check(example)
        prompt_ids, _, sizes, flags = self._encode(self.template.prompt, example)
        if len(prompt_ids) > self.max_length:
            raise BadSample("too_long", f"the prompt has {len(prompt_ids)} tokens > {self.length_key}="
                            f"{self.max_length}", example.id)
        image_mask = np.zeros(self.max_images, np.int32)
        image_mask[:len(example.images)] = 1
        out = {"id": example.id, "prompt_ids": prompt_ids}
        if not self.anyres:
            out["pixel_values"] = self.images.normalize(self._pixels(example, self.max_images), image_mask)
        else:
            pixels, crop_mask = self._anyres_pixels(example, sizes, flags, self.max_images)
            out["pixel_values"] = self.images.normalize(pixels, crop_mask)
            out["image_feature_ids"] = anyres_inputs.image_feature_ids(prompt_ids, sizes, self.model,
                                                                       self.max_images, base_only=flags)
        return {**out, "image_mask": image_mask, "answers": list(example.answers or [example.turns[-1][1]])}
