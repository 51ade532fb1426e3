"""Reading the question files of the short-answer benchmarks (VQAv2, TextVQA, GQA, POPE) and building their prompts.

Public surface: `SHORT_ANSWER_SUFFIX` (LLaVA-1.5's instruction), `user_prompt(question, suffix)` (LLaVA's user turn),
`strip_llava_suffix(text)`, `read_json(path)` and `read_jsonl(path)` (errors name the file and line),
`require(record, keys, where)`.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from etils import epath

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def user_prompt(question: str, suffix: str) -> str:
    """LLaVA's user turn: "<image>\\n" + question, then "\\n" + suffix unless the suffix is empty."""
    return "<image>\n" + question + ("\n" + suffix if suffix else "")


def strip_llava_suffix(text: str) -> str:
    """A LLaVA question-file `text` without its trailing "\\nAnswer the question using a single word or phrase."."""
    for ending in ("\n" + SHORT_ANSWER_SUFFIX, " " + SHORT_ANSWER_SUFFIX, SHORT_ANSWER_SUFFIX):
        if text.endswith(ending):
            return text[:-len(ending)]
    return text


def _existing(path: epath.Path) -> epath.Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (see the task module's docstring for the expected layout)")
    return path


def read_json(path: epath.Path) -> Any:
    try:
        return json.loads(_existing(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: epath.Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file."""
    records = []
    for line_number, line in enumerate(_existing(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not a JSON record ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        records.append((line_number, record))
    return records


def require(record: Any, keys: Sequence[str], where: str) -> None:
    """ValueError naming `where` (file and line / record) unless `record` is a dict holding all `keys`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"{where}: record lacks {missing}; has {sorted(record)}")
