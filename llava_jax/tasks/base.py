"""What every benchmark task is: items read from the benchmark's own files, and a scorer over predictions.

Public surface: `TaskItem`, `Task` (the protocol each task module implements), `ServerScored` (raised by
`score` for splits whose answers only the benchmark's server has; `Task.submission` then gives the upload),
`read_predictions(path)` (JSON or JSONL records with `question_id` and `answer`, LLaVA's `text` accepted for
`answer`) and `missing_predictions(items, predictions)`.

A task module defines one `Task` subclass:
- `name`: the CLI name (`--task NAME`), `prompt_suffix`: LLaVA-1.5's default instruction appended to each question
  (changed with `--prompt-suffix` / `train.eval_tasks[*].prompt_suffix`).
- `load(data, prompt_suffix=None, limit=None) -> list[TaskItem]`: the items in the benchmark's file order;
  `data` is the path the task's docstring documents (a file or a directory in the release layout). Bad records
  raise ValueError naming the file and line / record.
- `score(items, predictions) -> dict`: the summary JSON of `predictions` (question_id -> answer text) on `items`,
  numbers as the official scorer prints them (percent where the official one uses percent). Items without a
  prediction count as wrong and are reported as `missing`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

from etils import epath


@dataclasses.dataclass
class TaskItem:
    question_id: str                  # the key of a prediction (unique within a task's items)
    prompt: str                       # the user turn, "<image>" placeholders included, suffix appended
    images: list[Any]                 # image refs for data.images.open_image (path, encoded bytes, PIL image)
    meta: dict = dataclasses.field(default_factory=dict)   # what the scorer needs (answers, category, options ...)


class ServerScored(ValueError):
    """The items' answers are not public (e.g. VQAv2 test-dev): the predictions are scored by the benchmark's
    server from `Task.submission(items, predictions)`."""


class Task:
    name: str = ""
    prompt_suffix: str = ""

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        raise NotImplementedError

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        raise NotImplementedError

    def submission(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> Optional[list]:
        """The benchmark server's upload of `predictions` (None: the task is scored here)."""
        return None

    def suffix(self, prompt_suffix: Optional[str]) -> str:
        """The instruction to append: `prompt_suffix` if given (may be ""), else the task's default."""
        return self.prompt_suffix if prompt_suffix is None else prompt_suffix


def _records(path: epath.Path) -> list[dict]:
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    records = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not a JSON record ({e})") from None
    return records


def read_predictions(path: str) -> dict[str, str]:
    """question_id (as str) -> answer from a JSON list or JSONL file of records with `question_id` and `answer`
    (LLaVA's answer files: `text`)."""
    predictions = {}
    for k, record in enumerate(_records(epath.Path(path)), 1):
        answer = record.get("answer", record.get("text"))
        if "question_id" not in record or answer is None:
            raise ValueError(f"{path}: record {k} needs `question_id` and `answer` (or `text`); has {sorted(record)}")
        predictions[str(record["question_id"])] = str(answer)
    return predictions


def missing_predictions(items: Sequence[TaskItem], predictions: dict[str, str]) -> int:
    return sum(item.question_id not in predictions for item in items)
