"""MMMU (validation): interleaved-image college questions, scored as MMMU's eval_utils.py, per subject and discipline.

Public surface: `MMMUTask`, `TASK`, `DISCIPLINES` (discipline -> subjects). `data`: the HF release directory
MMMU/<Subject>/validation-00000-of-00001.parquet (or one such parquet file); columns id, question, options (a
python-list string), image_1..image_7 ({bytes, path}), answer, question_type ("multiple-choice" | "open").
Prompts are lmms-eval's construct_prompt ("question\nA. opt\n...\n\nsuffix"; open: "question\n\nsuffix") with each
"<image k>" tag replaced by "<image>" and image_k's bytes appended to the item's images, in the order of the tags.
question_id: the record's `id`. An unmatched multiple-choice answer is the official random pick, seeded by the
question id (deterministic), and is counted in `unparsed`. An open answer written as a python list ("['1', '2']")
is the official answer list (any of them is right).
"""
from __future__ import annotations

import ast
import re
from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks.base import Task, TaskItem, missing_predictions
from llava_jax.tasks.choices import (mmmu_eval_multi_choice, mmmu_eval_open, mmmu_parse_multi_choice,
                                     mmmu_parse_open, option_letters)

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."
_IMAGE_TAG = re.compile(r"<image (\d+)>")
_COLUMNS = ("id", "question", "options", "answer", "question_type")


def _gold(answer: str):
    """The answer, or the list of accepted answers when written as a python list."""
    if answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return answer


def _read_parquet(path: epath.Path) -> list[dict]:
    import pyarrow.parquet as pq   # only MMMU needs pyarrow
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:   # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if rows and (lacking := [c for c in _COLUMNS if c not in rows[0]]):
        raise ValueError(f"{path}: missing MMMU columns {lacking}")
    return rows


class MMMUTask(Task):
    name = "mmmu"
    prompt_suffix = MULTIPLE_CHOICE_SUFFIX   # open questions: OPEN_SUFFIX (both replaced by `prompt_suffix`)

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        root = epath.Path(data)
        files = [root] if root.is_file() else sorted(root.glob("*/validation-*.parquet"))
        if not files:
            raise ValueError(f"{data}: no MMMU <Subject>/validation-*.parquet files")
        items = []
        for path in files:
            for k, row in enumerate(_read_parquet(path)):
                items.append(self._item(path, k, row, prompt_suffix))
                if limit is not None and len(items) >= limit:
                    return items
        return items

    def _item(self, path: epath.Path, k: int, row: dict, prompt_suffix: Optional[str]) -> TaskItem:
        where = f"{path}: row {k} (id {row.get('id')!r})"
        kind = row["question_type"]
        if kind not in ("multiple-choice", "open") or not isinstance(row["question"], str) or not row["answer"]:
            raise ValueError(f"{where}: needs question_type multiple-choice|open, a question and an answer")
        try:
            options = ast.literal_eval(row["options"]) if kind == "multiple-choice" else []
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: options {row['options']!r} is not a python list") from None
        if kind == "multiple-choice" and not (isinstance(options, list) and options):
            raise ValueError(f"{where}: a multiple-choice question needs options, got {row['options']!r}")
        options = [str(option) for option in options]
        default = MULTIPLE_CHOICE_SUFFIX if kind == "multiple-choice" else OPEN_SUFFIX
        suffix = default if prompt_suffix is None else prompt_suffix
        text = row["question"]
        if options:
            text += "\n" + "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)),
                                                                                    options))
        text += f"\n\n{suffix}" if suffix else ""
        images = []
        for number in _IMAGE_TAG.findall(text):
            image = row.get(f"image_{number}")
            if not image or not image.get("bytes"):
                raise ValueError(f"{where}: the text refers to <image {number}> but image_{number} is empty")
            images.append(image["bytes"])
        subject = str(row["id"]).split("_", 1)[1].rsplit("_", 1)[0] if str(row["id"]).count("_") >= 2 \
            else path.parent.name
        return TaskItem(question_id=str(row["id"]), prompt=_IMAGE_TAG.sub("<image>", text), images=images,
                        meta={"question_type": kind, "options": options, "answer": _gold(str(row["answer"])),
                              "subject": subject})

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        """acc (fraction, rounded to 5 places as lmms-eval prints it) and num per subject, per discipline and
        overall; a missing prediction counts wrong."""
        right: dict[str, list[bool]] = {}
        unparsed = 0
        for item in items:
            answer = predictions.get(item.question_id)
            if answer is None:
                correct = False
            elif item.meta["question_type"] == "multiple-choice":
                letter, guessed = mmmu_parse_multi_choice(answer, item.meta["options"], seed=item.question_id)
                unparsed += guessed
                correct = mmmu_eval_multi_choice(item.meta["answer"], letter)
            else:
                correct = mmmu_eval_open(item.meta["answer"], mmmu_parse_open(answer))
            right.setdefault(item.meta["subject"], []).append(correct)

        def summary(rights: list[bool]) -> dict:
            return {"num": len(rights), "acc": round(sum(rights) / len(rights), 5) if rights else 0.0}

        disciplines = {name: summary([r for s in subjects if s in right for r in right[s]])
                       for name, subjects in DISCIPLINES.items() if any(s in right for s in subjects)}
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "unparsed": unparsed, "overall": summary([r for rights in right.values() for r in rights]),
                "disciplines": disciplines, "subjects": {s: summary(rights) for s, rights in sorted(right.items())}}


TASK = MMMUTask()
