"""What the model is trained on, sample by sample: `python -m llava_jax.data.inspect --config CFG [--set KEY=VALUE
...] [--limit N] [--pieces]`.

Prints one JSON line per training sample in source order (no shuffle; mixtures source by source): `id`,
`input_ids`, `loss_mask`, `text` (the decoded sequence, special tokens shown, each image's run of tokens shown once
as "<image>"), `answers` (the decoded supervised spans, closing tokens shown) and with `--pieces` the token strings.
A bad record prints `id`, `where` and `bad` (its reason) instead. No image is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

from llava_jax.config import load_config
from llava_jax.data.bad_samples import BadSample
from llava_jax.data.examples import ExampleEncoder
from llava_jax.data.sources import train_sources
from llava_jax.data.templates import answer_spans
from llava_jax.data.tokenizers import make_tokenizer


def collapse_images(ids: np.ndarray, image_token_id: int, tokens_per_image: int) -> np.ndarray:
    """Each image's run of tokens_per_image image tokens -> one image token."""
    is_image = ids == image_token_id
    run_position = np.zeros(len(ids), np.int64)
    for t in range(1, len(ids)):
        run_position[t] = run_position[t - 1] + 1 if is_image[t - 1] and is_image[t] else 0
    return ids[~is_image | (run_position % tokens_per_image == 0)]


def sample_record(encoder: ExampleEncoder, ids: np.ndarray, mask: np.ndarray, example_id: str,
                  pieces: bool = False) -> dict[str, Any]:
    tokenizer = encoder.tokenizer

    def text(part: np.ndarray) -> str:
        return tokenizer.decode(collapse_images(part, tokenizer.image_token_id, encoder.tokens_per_image),
                                skip_special_tokens=False)
    record = {"id": example_id, "input_ids": ids.tolist(), "loss_mask": mask.astype(int).tolist(), "text": text(ids),
              "answers": [text(ids[start:end]) for start, end in answer_spans(mask)]}
    if pieces:
        record["pieces"] = tokenizer.pieces(ids)
    return record


def inspect(config, limit: Optional[int] = None, pieces: bool = False):
    """Yields the records described in the module docstring."""
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    count = 0
    for source, _ in train_sources(config):
        for index in range(len(source)):
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                example = source[index]
                ids, mask = encoder.tokens(example)
            except BadSample as bad:
                yield {"id": bad.example_id, "where": source.describe(index), "bad": str(bad)}
                continue
            yield sample_record(encoder, ids, mask, example.id, pieces)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--limit", type=int, default=None, help="the first N samples only")
    parser.add_argument("--pieces", action="store_true", help="also print each token's string")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        for record in inspect(config, args.limit, args.pieces):
            print(json.dumps(record, ensure_ascii=False))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
