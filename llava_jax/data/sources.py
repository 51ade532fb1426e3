"""Random-access data sources yielding `Example`s: LLaVA JSON / JSONL, TFDS (array_record, no TensorFlow), synthetic.

Public surface: `LlavaJsonSource(json_path, image_root)`, `TfdsSource(name, data_dir, split, image_key,
question_key, answer_key)`, `train_sources(config) -> [(source, weight)]`, `eval_sources(config) -> [source]`.
A source has `__len__`, `__getitem__(i) -> Example` (raises BadSample for a malformed record; images stay
unread references) and `describe(i)` (file and line/record for error messages).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.examples import Example
from llava_jax.data.synthetic import SyntheticSource
from llava_jax.data.templates import IMAGE_PLACEHOLDER

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _load_json_records(path: str) -> tuple[list[Any], Optional[list[int]]]:
    """*.jsonl: one record per non-empty line (also returns their line numbers); otherwise a JSON list.
    Malformed JSON raises ValueError with the file, line and column."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".jsonl"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records (or a *.jsonl file), got a "
                             f"{type(records).__name__}")
        return records, None
    records, lines = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}:{e.colno}: malformed JSON line: {e.msg}") from None
        lines.append(line_number)
    return records, lines


class LlavaJsonSource:
    """Records {"id", "image": path | [paths] (optional), "conversations": [{"from": "human"|"gpt"|"system",
    "value"}], "answers": [..] (optional, evaluation), "image_mode": "anyres" | "base" (optional, LLaVA-NeXT
    models)}; image paths are relative to image_root (default: the JSON file's directory) and read only when a
    sample is built."""

    def __init__(self, json_path: str, image_root: Optional[str] = None):
        self.path = str(json_path)
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(json_path))
        self._records, self._lines = _load_json_records(self.path)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path!r}, image_root={self.image_root!r})"

    def describe(self, index: int) -> str:
        return f"{self.path} line {self._lines[index]}" if self._lines else f"{self.path} record {index}"

    def __getitem__(self, index: int) -> Example:
        record = self._records[index]
        if not isinstance(record, dict):
            raise BadSample("malformed_record", f"record is a {type(record).__name__}, not an object")
        example_id = str(record.get("id", f"{os.path.basename(self.path)}:{index}"))

        def bad(detail: str) -> BadSample:
            return BadSample("malformed_record", detail, example_id)
        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise bad("missing or empty 'conversations' list")
        turns = []
        for k, turn in enumerate(conversations):
            if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
                raise bad(f"conversations[{k}] must be {{'from': 'human'|'gpt'|'system', 'value': text}}, "
                          f"got {str(turn)[:80]}")
            turns.append((LLAVA_ROLES[turn["from"]], turn.get("value")))
        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise bad(f"'image' must be a path or a list of paths, got {str(record.get('image'))[:80]}")
        answers = record.get("answers")
        if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            raise bad("'answers' must be a list of texts")
        return Example(example_id, turns, [os.path.join(self.image_root, p) for p in images], answers,
                       image_mode=record.get("image_mode"))      # anyres: "anyres" | "base" (checked by the encoder)


def _texts(value: Any) -> list[str]:
    """A TFDS text feature (bytes, str, or a sequence of them) as a list of str."""
    if isinstance(value, (bytes, str, np.bytes_, np.str_)):
        value = [value]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]


class TfdsSource:
    """A prepared TFDS dataset read with tfds.data_source (array_record; no TensorFlow). The image feature is
    read undecoded (PIL decodes it); question_key None means caption data (the prompt is the image alone)."""

    def __init__(self, name: str, data_dir: Optional[str], split: str, image_key: str,
                 question_key: Optional[str], answer_key: str):
        import tensorflow_datasets as tfds
        self.name, self.split = name, split
        self.keys = {"image": image_key, "question": question_key, "answer": answer_key}
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        for role, key in self.keys.items():
            if key is not None and key not in features:
                raise ValueError(f"data.tfds_{role}_key: {key!r} is not a feature of TFDS dataset {name} "
                                 f"(features: {sorted(features.keys())})")
        skip = {image_key: tfds.decode.SkipDecoding()} if isinstance(features[image_key], tfds.features.Image) else None
        self._data = tfds.data_source(name, split=split, data_dir=data_dir, decoders=skip, download=False)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, split={self.split})"

    def describe(self, index: int) -> str:
        return f"tfds {self.name} split {self.split} record {index}"

    def __getitem__(self, index: int) -> Example:
        record = self._data[index]
        example_id = f"{self.name}/{self.split}/{index}"
        answers = _texts(record[self.keys["answer"]])
        if not answers:
            raise BadSample("malformed_record", f"no answer in feature {self.keys['answer']!r}", example_id)
        prompt = IMAGE_PLACEHOLDER
        if self.keys["question"] is not None:
            prompt += "\n" + _texts(record[self.keys["question"]])[0]
        return Example(example_id, [("user", prompt), ("assistant", answers[0])], [record[self.keys["image"]]],
                       answers)


def _source(kind: str, config, split: str, json_path=None, image_root=None, tfds_name=None):
    data = config.data
    if kind == "synthetic":
        size = data.synthetic_size if split == "train" else data.synthetic_eval_size
        return SyntheticSource(split, size, config.model.vision.image_size, data.synthetic_seed,
                               data.synthetic_question_kinds)
    if kind == "llava_json":
        return LlavaJsonSource(json_path, image_root)
    return TfdsSource(tfds_name, data.tfds_data_dir, data.tfds_split if split == "train" else data.tfds_eval_split,
                      data.tfds_image_key, data.tfds_question_key, data.tfds_answer_key)


def train_sources(config) -> list[tuple[Any, float]]:
    """(source, weight) per training source: data.source, or each entry of data.mixture."""
    data = config.data
    if data.source != "mixture":
        return [(_source(data.source, config, "train", data.json_path, data.image_root, data.tfds_name), 1.0)]
    return [(_source(e.source, config, "train", e.json_path, e.image_root, e.tfds_name), e.weight)
            for e in data.mixture]


def eval_sources(config) -> list[Any]:
    """data.eval_json_path if set; otherwise the eval split of the synthetic / TFDS source(s)."""
    data = config.data
    if data.eval_json_path:
        return [LlavaJsonSource(data.eval_json_path, data.image_root)]
    kinds = [(e.source, e.tfds_name) for e in data.mixture] if data.source == "mixture" else [(data.source,
                                                                                                 data.tfds_name)]
    sources = [_source(kind, config, "eval", tfds_name=name) for kind, name in kinds if kind != "llava_json"]
    if not sources:
        raise ValueError("data.eval_json_path: required for evaluation when every training source is llava_json")
    return sources
