"""Evaluation: greedy answers on the eval set scored against the references, beside a blind (blank-image) baseline
and the always-answer-the-most-common-reference baseline.

Public surface: `evaluate(config, params, limit=None, batch_size=16, max_new_tokens=32) -> dict`,
`evaluate_examples(config, params, examples, ...)`, `normalize_answer`, `answer_score`, `majority_answer`,
`blank_images`, and the CLI:
- `python -m llava_jax.evaluate --task NAME --data PATH (--workdir DIR | --checkpoint PATH) [--limit N] [--out DIR]
  [--blind] [--prompt-suffix TEXT]`: a benchmark task (llava_jax.tasks, run by llava_jax.task_eval): predictions
  JSONL + summary JSON in --out, the summary printed; resumable;
- `python -m llava_jax.evaluate score --task NAME --predictions P --data PATH`: scores existing predictions;
- `python -m llava_jax.evaluate (--workdir DIR | --checkpoint PATH) [--set KEY=VALUE ...] [--limit N]`: the run's
  eval set, one JSON object (n, accuracy, blind_accuracy, majority_accuracy, majority_answer).
Works for LLaVA-1.5 and anyres (LLaVA-NeXT) runs alike: generate.generate_answers reads each example's inputs.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import string
import sys
from typing import Optional, Sequence

import numpy as np

from llava_jax.config import Config
from llava_jax.data.pipeline import make_eval_examples
from llava_jax.distributed import maybe_initialize_distributed
from llava_jax.generate import generate_answers
from llava_jax.model_params import load_model
from llava_jax.task_eval import run_task, score_predictions
from llava_jax.tasks import TASK_NAMES

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


def _score_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.evaluate score",
                                     description="Score existing predictions of a benchmark task; prints the summary.")
    parser.add_argument("--task", required=True, choices=TASK_NAMES)
    parser.add_argument("--predictions", required=True,
                        help="JSON or JSONL records with question_id and answer (LLaVA's `text` accepted)")
    parser.add_argument("--data", required=True, help="the task's files (see llava_jax/tasks/<task>.py)")
    args = parser.parse_args(argv)
    print(json.dumps(score_predictions(args.task, args.data, args.predictions)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a model: a benchmark task (--task, --data) or the run's eval set; prints one JSON "
                    "object. `python -m llava_jax.evaluate score ...` scores existing predictions.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (its latest checkpoint)")
    source.add_argument("--checkpoint", help="a checkpoint directory (checkpoints/<step>) or a converted model")
    parser.add_argument("--task", choices=TASK_NAMES, help="benchmark task (default: the run's eval set)")
    parser.add_argument("--data", help="the task's files (see llava_jax/tasks/<task>.py)")
    parser.add_argument("--out", help="where predictions and summary go (default: <workdir|checkpoint>/eval/<task>)")
    parser.add_argument("--blind", action="store_true", help="also score blank images (what the image explains)")
    parser.add_argument("--prompt-suffix", default=None, help="replaces the task's LLaVA-1.5 instruction")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's saved config, e.g. data.eval_json_path=...")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per generation batch, all processes together (default: 32 for a task, "
                             "16 for the eval set)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default: 128 for a task, 32 for the eval set)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        return _score_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.task and not args.data:
        parser.error("--task needs --data (the task's files)")
    path = args.workdir or args.checkpoint
    maybe_initialize_distributed()
    config, params = load_model(path, args.overrides)
    if not args.task:
        print(json.dumps(evaluate(config, params, args.limit, args.batch_size or 16, args.max_new_tokens or 32)))
        return
    out = args.out or os.path.join(path, "eval", args.task)
    summary = run_task(config, params, args.task, args.data, out, limit=args.limit,
                       prompt_suffix=args.prompt_suffix, batch_size=args.batch_size or 32,
                       max_new_tokens=args.max_new_tokens or 128, blind=args.blind, progress=not args.no_progress)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
