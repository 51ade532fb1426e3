"""Evaluation: greedy answers on the eval set scored against the references, beside a blind (blank-image) baseline
and the always-answer-the-most-common-reference baseline.

Public surface: `evaluate(config, params, limit=None, batch_size=16, max_new_tokens=32) -> dict`,
`evaluate_examples(config, params, examples, ...)`, `normalize_answer`, `answer_score`, `majority_answer`,
`blank_images`, and the CLI `python -m llava_jax.evaluate (--workdir DIR | --checkpoint PATH) [--set KEY=VALUE ...]
[--limit N]`, which prints one JSON object (n, accuracy, blind_accuracy, majority_accuracy, majority_answer).
Works for LLaVA-1.5 and anyres (LLaVA-NeXT) runs alike: generate.generate_answers reads each example's inputs.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import string
from typing import Optional, Sequence

import numpy as np

from llava_jax.config import Config
from llava_jax.data.pipeline import make_eval_examples
from llava_jax.generate import generate_answers
from llava_jax.model_params import load_model

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_OTHER_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace("'", "").replace(".", "")) + "]")


def normalize_answer(text: str) -> str:
    """Lowercase; apostrophes dropped ("don't" -> "dont"), other punctuation -> space except a decimal point
    ("3.5" stays) and a thousands comma ("1,000" -> "1000"); number words -> digits ("two" -> "2"); articles
    a/an/the removed; whitespace collapsed."""
    text = _THOUSANDS_COMMA.sub("", text.lower().replace("'", ""))
    text = _OTHER_PUNCTUATION.sub(" ", _NON_DECIMAL_PERIOD.sub(" ", text))
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in ARTICLES)


def answer_score(prediction: str, references: Sequence[str]) -> float:
    """Normalised exact match against a single reference; with several references VQA accuracy:
    min(1, number of references equal to the prediction / 3)."""
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(reference) == predicted for reference in references)
    return float(matches > 0) if len(references) == 1 else min(1.0, matches / 3)


def majority_answer(references: Sequence[Sequence[str]]) -> str:
    """The most common normalised reference answer over all examples (every reference counts once)."""
    counts = collections.Counter(normalize_answer(r) for refs in references for r in refs)
    return counts.most_common(1)[0][0]


def blank_images(examples: Sequence[dict]) -> list[dict]:
    """Copies of `examples` whose images are blank: all-zero pixels AFTER normalisation, i.e. every pixel at the
    normalisation mean colour (the mean image). Image tokens and image_mask stay, so the prompts are unchanged.
    anyres examples: every crop blank; image_feature_ids stay."""
    return [{**example, "pixel_values": np.zeros_like(example["pixel_values"])} for example in examples]


def _accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return float(np.mean([answer_score(p, refs) for p, refs in zip(predictions, references)]))


def evaluate_examples(config: Config, params, examples: Sequence[dict], batch_size: int = 16,
                      max_new_tokens: int = 32) -> dict:
    """Scores greedy answers on `examples` (as made by data.pipeline.make_eval_examples), with the real images and
    with blank ones (`blank_images`): n, accuracy, blind_accuracy, majority_accuracy, majority_answer."""
    if not examples:
        raise ValueError("no evaluation examples: check data.eval_json_path / the eval split of data.source")
    references = [example["answers"] for example in examples]

    def accuracy_on(inputs: Sequence[dict]) -> float:
        return _accuracy(generate_answers(config, params, inputs, max_new_tokens, batch_size), references)

    majority = majority_answer(references)
    return {"n": len(examples), "accuracy": accuracy_on(examples),
            "blind_accuracy": accuracy_on(blank_images(examples)),
            "majority_accuracy": _accuracy([majority] * len(examples), references), "majority_answer": majority}


def evaluate(config: Config, params, limit: Optional[int] = None, batch_size: int = 16,
             max_new_tokens: int = 32) -> dict:
    """`evaluate_examples` on the first `limit` evaluation examples of config.data."""
    return evaluate_examples(config, params, make_eval_examples(config, limit), batch_size, max_new_tokens)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a trained checkpoint; prints one JSON object.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (its latest checkpoint)")
    source.add_argument("--checkpoint", help="one checkpoint directory: WORKDIR/checkpoints/<step>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's saved config, e.g. data.eval_json_path=...")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    config, params = load_model(args.workdir or args.checkpoint, args.overrides)
    print(json.dumps(evaluate(config, params, args.limit, args.batch_size, args.max_new_tokens)))


if __name__ == "__main__":
    main()
