"""Synthetic shapes VQA: 1-3 coloured shapes in a plus-shaped layout, one single-word question each.

Public surface: `SyntheticSource(split, size, image_size, seed, question_kinds=None)` (lazy random access; Example
per index), `scene_at(seed, split, index, question_kinds=None)`, `question_kinds_of(kinds)`, `render(scene,
image_size)`, and the CLI `python -m llava_jax.data.synthetic --out DIR --num N [--split train|eval]
[--image-size S] [--seed S] [--kinds KIND ...]` that writes DIR/{split}.json (LLaVA JSON, image paths relative to
DIR) and DIR/images/*.png. `question_kinds` (data.synthetic_question_kinds) keeps only questions of those kinds.
Every question kind has a uniform answer over a small vocabulary, so a blind model stays near 25-33 %.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.data.examples import Example
from llava_jax.data.templates import IMAGE_PLACEHOLDER

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
# Objects sit in the four edge-middle cells of a 3x3 grid, so "where" has exactly one answer per object.
SLOTS = {"top": (1, 0), "bottom": (1, 2), "left": (0, 1), "right": (2, 1)}
COUNT_WORDS = ("one", "two", "three")
QUESTION_KINDS = ("color", "shape", "count", "position")
BACKGROUND = (255, 255, 255)
SPLITS = ("train", "eval")
EVAL_BUCKETS = 10          # a scene belongs to eval iff hash(description) % EVAL_BUCKETS == 0: disjoint splits


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    slot: str
    size: int          # percent of a grid cell
    dx: int            # centre offset from the cell centre, percent of a cell
    dy: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    kind: str          # one of QUESTION_KINDS
    target: int        # index of the object asked about

    @property
    def question(self) -> str:
        obj = self.objects[self.target]
        return {"color": f"What color is the {obj.shape}?",
                "shape": f"What shape is the {obj.color} object?",
                "count": "How many shapes are there?",
                "position": f"Where is the {obj.color} {obj.shape}?"}[self.kind]

    @property
    def answer(self) -> str:
        obj = self.objects[self.target]
        return {"color": obj.color, "shape": obj.shape, "count": COUNT_WORDS[len(self.objects) - 1],
                "position": obj.slot}[self.kind]

    def description(self) -> str:
        """Everything that determines the image and the question (the key for the train/eval split)."""
        objects = sorted(f"{o.color} {o.shape} {o.slot} {o.size} {o.dx} {o.dy}" for o in self.objects)
        return "; ".join(objects) + f" | {self.question}"


def split_of(scene: Scene) -> str:
    digest = hashlib.blake2b(scene.description().encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def question_kinds_of(kinds) -> tuple[str, ...]:
    """The question kinds to draw from, in QUESTION_KINDS order: all of them for None, else those of `kinds`
    (data.synthetic_question_kinds; duplicates ignored). All four kinds in any order give the scenes of None."""
    if kinds is None:
        return QUESTION_KINDS
    unknown = sorted(set(kinds) - set(QUESTION_KINDS))
    if unknown or not kinds:
        raise ValueError(f"data.synthetic_question_kinds: {unknown or 'an empty list'} given; list at least one of "
                         f"{', '.join(QUESTION_KINDS)}, or null for all of them")
    return tuple(kind for kind in QUESTION_KINDS if kind in kinds)


def _draw_scene(rng: np.random.Generator, kinds: tuple[str, ...] = QUESTION_KINDS) -> Scene:
    count = int(rng.integers(1, 4))
    shapes = rng.permutation(len(SHAPES))[:count]
    colors = rng.permutation(len(COLORS))[:count]
    slots = rng.permutation(len(SLOTS))[:count]
    objects = []
    for shape, color, slot in zip(shapes, colors, slots):
        size = int(rng.integers(55, 86))
        slack = (100 - size) // 2
        dx, dy = (int(v) for v in rng.integers(-slack, slack + 1, size=2))
        objects.append(SceneObject(SHAPES[shape], list(COLORS)[color], list(SLOTS)[slot], size, dx, dy))
    kind = kinds[int(rng.integers(len(kinds)))]     # all kinds: the same draws as before kinds could be chosen
    return Scene(tuple(objects), kind, int(rng.integers(count)))


def scene_at(seed: int, split: str, index: int, question_kinds=None) -> Scene:
    """The index-th scene of a split: deterministic in (seed, split, index, question kinds); redrawn until it
    hashes into `split`, so no (image, question) of one split occurs in the other. `question_kinds`: see
    `question_kinds_of` (None: all kinds)."""
    kinds = question_kinds_of(question_kinds)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    while True:
        scene = _draw_scene(rng, kinds)
        if split_of(scene) == split:
            return scene


def render(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for obj in scene.objects:
        column, row = SLOTS[obj.slot]
        cx = (column + 0.5 + obj.dx / 100) * cell
        cy = (row + 0.5 + obj.dy / 100) * cell
        half = obj.size / 200 * cell
        # inclusive pixel box, clipped to the object's own cell so objects never touch another cell
        left = max(math.ceil(column * cell), round(cx - half))
        top = max(math.ceil(row * cell), round(cy - half))
        right = min(math.floor((column + 1) * cell) - 1, round(cx + half) - 1)
        bottom = min(math.floor((row + 1) * cell) - 1, round(cy + half) - 1)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


class SyntheticSource:
    """Random-access synthetic split: renders scene `index` on demand (nothing is generated up front)."""

    def __init__(self, split: str, size: int, image_size: int, seed: int = 0, question_kinds=None):
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.question_kinds = question_kinds_of(question_kinds)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        kinds = "" if self.question_kinds == QUESTION_KINDS else f", question_kinds={list(self.question_kinds)}"
        return (f"SyntheticSource(split={self.split}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed}{kinds})")

    def describe(self, index: int) -> str:
        return f"synthetic {self.split} sample {index} (seed {self.seed})"

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.size:
            raise IndexError(f"{self!r} has no index {index}")
        scene = scene_at(self.seed, self.split, index, self.question_kinds)
        return Example(id=f"synthetic-{self.split}-{index}",
                       turns=[("user", f"{IMAGE_PLACEHOLDER}\n{scene.question}"), ("assistant", scene.answer)],
                       images=[render(scene, self.image_size)])


def write_llava_json(out: str, num: int, split: str = "train", image_size: int = 64, seed: int = 0,
                     question_kinds=None) -> str:
    """Writes `num` samples of a split as DIR/{split}.json + DIR/images/{split}_NNNNNN.png; returns the JSON path."""
    kinds = question_kinds_of(question_kinds)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records = []
    for index in range(num):
        scene = scene_at(seed, split, index, kinds)
        image = f"images/{split}_{index:06d}.png"
        render(scene, image_size).save(os.path.join(out, image))
        records.append({"id": f"synthetic-{split}-{index}", "image": image,
                        "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{scene.question}"},
                                          {"from": "gpt", "value": scene.answer}]})
    path = os.path.join(out, f"{split}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes VQA split as LLaVA JSON + PNG files.")
    parser.add_argument("--out", required=True, help="output directory (use it as data.image_root)")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=QUESTION_KINDS, default=None,
                        help="only questions of these kinds (default: all)")
    args = parser.parse_args(argv)
    path = write_llava_json(args.out, args.num, args.split, args.image_size, args.seed, args.kinds)
    print(f"wrote {args.num} {args.split} samples to {path}")


if __name__ == "__main__":
    main()
