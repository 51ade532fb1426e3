"""MMBench (dev): single-choice questions asked once per rotation of their options, scored with circular evaluation.

Public surface: `MMBenchTask`, `TASK` and `read_llava_answers(path)`. `data`: the official TSV
(mmbench_dev_20230712.tsv, MMBench_DEV_EN.tsv; columns index, question, hint, A..D, answer, category,
l2-category (optional), image (base64, or the index of the row holding it)). Options stop at the first empty
one; "", "nan", "None", "NA", ... are empty as pandas reads them in LLaVA's model_vqa_mmbench.py. Each question gives
one item per option: rotation k shows the options rotated left by k (as model_vqa_mmbench.py --all-rounds);
question_id f"{index}" for k = 0, f"{index}@{k}" after. Prompt: "<image>\n[hint\n]question\nA. opt\n...\nsuffix". An
answer is read with MMBench's can_infer; one it cannot read counts wrong (no ChatGPT fallback) and is reported in
`unparsed`.
"""
from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks.base import Task, TaskItem, missing_predictions
from llava_jax.tasks.choices import mmbench_can_infer, option_letters

# pandas' default NA strings (read_table), which LLaVA's is_none then treats as missing
_NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
               "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "none"}
_REQUIRED = ("index", "question", "A", "B", "image", "category")


def _is_none(value: Optional[str]) -> bool:
    return value is None or value in _NA_STRINGS or value.lower() in ("nan", "none")


def _read_tsv(path: epath.Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and (lacking := [c for c in _REQUIRED if c not in rows[0]]):
        raise ValueError(f"{path}: missing MMBench columns {lacking}")
    return rows


def _image_bytes(path: epath.Path, line: int, row: dict, image_by_index: dict[str, str]) -> bytes:
    encoded = row["image"] or ""
    if not encoded:
        raise ValueError(f"{path}:{line}: `image` is empty")
    if len(encoded) < 64 and encoded in image_by_index:   # VLMEvalKit's TSVs point repeats to the first copy
        encoded = image_by_index[encoded]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{path}:{line}: `image` is not base64 (nor the index of a row with an image)") from None


def read_llava_answers(path: str) -> dict[str, str]:
    """question_id -> answer from an answer file of LLaVA's model_vqa_mmbench.py --all-rounds, whose records share
    the question's `index` as question_id and carry `round_id`: round k > 0 becomes f"{index}@{k}"."""
    predictions = {}
    for line_number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            round_id = int(record.get("round_id", 0))
            predictions[f"{record['question_id']}" + (f"@{round_id}" if round_id else "")] = str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{line_number}: not a LLaVA answer record with question_id, round_id and "
                             f"text ({type(e).__name__}: {e})") from None
    return predictions


class MMBenchTask(Task):
    name = "mmbench"
    prompt_suffix = "Answer with the option's letter from the given choices directly."

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        path = epath.Path(data)
        if not path.is_file():
            raise ValueError(f"{data}: MMBench needs its TSV file")
        suffix = self.suffix(prompt_suffix)
        rows = _read_tsv(path)
        image_by_index = {row["index"]: row["image"] for row in rows if len(row["image"] or "") >= 64}
        items = []
        for line, row in enumerate(rows, 2):   # line 1 is the header
            options = []
            for letter in "ABCD":
                if _is_none(row.get(letter)):
                    break
                options.append(row[letter])
            answer = row.get("answer")
            if len(options) < 2 or not row["index"].strip() or (not _is_none(answer) and answer not in
                                                                 option_letters(len(options))):
                raise ValueError(f"{path}:{line}: needs an index, options A and B (and an answer among the "
                                 f"options' letters when given); got index {row['index']!r}, answer {answer!r}")
            image = _image_bytes(path, line, row, image_by_index)
            question = row["question"] if _is_none(row.get("hint")) else f"{row['hint']}\n{row['question']}"
            answer_position = None if _is_none(answer) else option_letters(len(options)).index(answer)
            for k in range(len(options)):
                shown = options[k:] + options[:k]
                letters = option_letters(len(shown))
                text = question + "".join(f"\n{letter}. {option}" for letter, option in zip(letters, shown))
                items.append(TaskItem(
                    question_id=row["index"] if k == 0 else f"{row['index']}@{k}",
                    prompt=f"<image>\n{text}" + (f"\n{suffix}" if suffix else ""), images=[image],
                    meta={"index": row["index"], "rotation": k, "choices": dict(zip(letters, shown)),
                          "answer": None if answer_position is None else letters[(answer_position - k) % len(shown)],
                          "category": row["category"], "l2_category": row.get("l2-category")}))
            if limit is not None and len(items) >= limit:
                return items[:limit]
        return items

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        """accuracy: % of questions with every rotation right (circular); accuracy_single: % with rotation 0
        right; categories / l2_categories: circular accuracy per (l2-)category."""
        rights: dict[str, list[bool]] = {}
        first: dict[str, dict] = {}
        unparsed = 0
        for item in items:
            if item.meta["answer"] is None:
                raise ValueError(f"mmbench: question {item.meta['index']} has no answer (a test split?); "
                                 f"only splits with answers can be scored")
            letter = mmbench_can_infer(predictions.get(item.question_id, ""), item.meta["choices"])
            unparsed += letter is None and item.question_id in predictions
            rights.setdefault(item.meta["index"], []).append(letter == item.meta["answer"])
            first.setdefault(item.meta["index"], item.meta)

        def percent(indices: list[str], single: bool = False) -> float:
            hits = [rights[i][0] if single else all(rights[i]) for i in indices]
            return 100.0 * sum(hits) / len(hits) if hits else 0.0

        def by(key: str) -> dict:
            groups: dict[str, list[str]] = {}
            for index, meta in first.items():
                if meta[key] is not None:
                    groups.setdefault(meta[key], []).append(index)
            return {name: percent(indices) for name, indices in sorted(groups.items())}

        return {"task": self.name, "n": len(rights), "n_items": len(items),
                "missing": missing_predictions(items, predictions), "unparsed": unparsed,
                "accuracy": percent(list(rights)), "accuracy_single": percent(list(rights), single=True),
                "categories": by("category"), "l2_categories": by("l2_category")}


TASK = MMBenchTask()
