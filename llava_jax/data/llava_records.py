"""One LLaVA JSON record -> `Example`: the validation rules every LLaVA-format source shares (JSON / JSONL files and
their ArrayRecord conversion), so both give the same Example and the same BadSample for the same record.

Public surface: `LLAVA_ROLES`, `default_id(default_prefix, index)` and
`example_from_record(record, index, default_prefix, images) -> Example` (raises BadSample("malformed_record")).
"""
from __future__ import annotations

from typing import Any, Callable

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.examples import Example

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def default_id(default_prefix: str, index: int) -> str:
    """The id of a record without one: "<json file's base name>:<record index in the file>"."""
    return f"{default_prefix}:{index}"


def example_from_record(record: Any, index: int, default_prefix: str,
                        images: Callable[[list[str]], list[Any]]) -> Example:
    """`record` (a parsed JSON value) as an Example, or BadSample("malformed_record") naming what is wrong.

    index: the record's position in its source file (0-based; the default id is `default_id(default_prefix,
    index)`). images: maps the record's validated image paths (in order; [] for a text-only record) to the
    references the Example carries, e.g. paths joined to an image root, or inline bytes; it is called only once
    the whole record is valid, so a malformed record is reported as malformed before anything about its images.
    """
    if not isinstance(record, dict):
        raise BadSample("malformed_record", f"record is a {type(record).__name__}, not an object")
    example_id = str(record.get("id", default_id(default_prefix, index)))

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
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise bad(f"'image' must be a path or a list of paths, got {str(record.get('image'))[:80]}")
    answers = record.get("answers")
    if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
        raise bad("'answers' must be a list of texts")
    return Example(example_id, turns, images(list(paths)), answers,
                   image_mode=record.get("image_mode"))       # anyres: "anyres" | "base" (checked by the encoder)
