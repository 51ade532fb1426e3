"""One example from any source -> model inputs: a training sample or an evaluation prompt.

Public surface: `Example` (what every source yields) and `ExampleEncoder(config, tokenizer)` with
`tokens(example)` (input_ids, loss_mask), `sample(example)` (+ uint8 pixel_values [k, S, S, 3], image_mask [k],
"_id") and `eval_example(example)` (float32 pixel_values, normalised with `images.normalize_pixels`), and
`place_images(turns, placement)` (data.image_placement). `sample` and `eval_example` raise BadSample for malformed
conversations, <image>/image count mismatches, too many images, too long sequences and unreadable images (checked
in that order, so images are decoded last).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.images import ImageProcessor
from llava_jax.data.sequences import fit_length
from llava_jax.data.templates import IMAGE_PLACEHOLDER, check_template, encode, get_template
from llava_jax.data.tokenizers import ChatTemplateError


@dataclass
class Example:
    id: str
    turns: list[tuple[str, str]]                          # (role, text); roles: system, user, assistant
    images: list[Any] = field(default_factory=list)       # references for images.open_image, in <image> order
    answers: Optional[list[str]] = None                    # references for evaluation (default: the last answer)


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
        self.max_length = config.data.max_length
        self.max_images = config.data.max_images
        self.image_size = config.model.vision.image_size
        self.images = ImageProcessor(config)
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

    def tokens(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """input_ids int32 [L] and loss_mask float32 [L] (L <= data.max_length) of a training sample; no image
        is read."""
        self._check(example)
        turns = place_images(example.turns, self.image_placement)
        ids, mask = encode(self._render(self.template.render, turns, example), self.tokenizer,
                           self.tokens_per_image)
        return fit_length(ids, mask, self.max_length, self.tokenizer.image_token_id, example.id)

    def sample(self, example: Example) -> dict[str, Any]:
        """A training sample: `tokens` (input_ids, loss_mask), pixel_values uint8 [k, S, S, 3] (normalised on
        device by the train step), image_mask int32 [k] (k = the example's images) and "_id"."""
        ids, mask = self.tokens(example)
        num_images = len(example.images)
        return {"input_ids": ids, "loss_mask": mask, "pixel_values": self._pixels(example, num_images),
                "image_mask": np.ones(num_images, np.int32), "_id": example.id}

    def eval_example(self, example: Example) -> dict[str, Any]:
        """id, prompt_ids int32 [L] (up to where the last answer starts), pixel_values float32 [I, S, S, 3]
        (`images.normalize_pixels`: zeros where there is no image), image_mask int32 [I] (I = data.max_images)
        and answers (reference texts)."""
        self._check(example)
        turns = place_images(example.turns, self.image_placement)
        prompt_ids, _ = encode(self._render(self.template.prompt, turns, example), self.tokenizer,
                               self.tokens_per_image)
        if len(prompt_ids) > self.max_length:
            raise BadSample("too_long", f"the prompt has {len(prompt_ids)} tokens > data.max_length="
                            f"{self.max_length}", example.id)
        image_mask = np.zeros(self.max_images, np.int32)
        image_mask[:len(example.images)] = 1
        pixel_values = self.images.normalize(self._pixels(example, self.max_images), image_mask)
        return {"id": example.id, "prompt_ids": prompt_ids, "pixel_values": pixel_values, "image_mask": image_mask,
                "answers": list(example.answers or [example.turns[-1][1]])}
