"""VQAv2 (task "vqav2"): questions from the official release or LLaVA-1.5's question file, scored like the official
vqaEval.py; test-dev predictions become an EvalAI submission with `submission(items, predictions)`.

`data` is a question file or a directory holding one; a directory is searched, in this order, for
  v2_OpenEnded_mscoco_val2014_questions.json      official: {"data_subtype", "questions": [{question_id, image_id,
                                                   question}]}, with v2_mscoco_val2014_annotations.json beside it
  llava_vqav2_mscoco_test-dev2015.jsonl           LLaVA: {question_id, image, text} per line (text = question +
                                                   "\\nAnswer the question using a single word or phrase.")
  v2_OpenEnded_mscoco_test-dev2015_questions.json official test-dev questions (no annotations exist)
Any other v2_OpenEnded_mscoco_<split>_questions.json or LLaVA-style jsonl can be passed as the file itself. Answers
come from v2_mscoco_<split>_annotations.json next to the question file when it exists (split = the file name's, or
for a jsonl the image names' COCO_<split>_ prefix). Images: <question file's folder>/<image split>/COCO_<image
split>_<image_id:012d>.jpg, the image split being test2015 for the test and test-dev questions.

Summary (with annotations): {"task", "n", "missing", "accuracy", "per_answer_type": {"yes/no", "number", "other"}},
percent rounded to 2 decimals like the official "overall" / "perAnswerType".
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks import llava_questions as files
from llava_jax.tasks.base import ServerScored, Task, TaskItem, missing_predictions
from llava_jax.tasks.vqa_accuracy import normalize_answer, vqav2_accuracy

DIRECTORY_FILES = ("v2_OpenEnded_mscoco_val2014_questions.json", "llava_vqav2_mscoco_test-dev2015.jsonl",
                   "v2_OpenEnded_mscoco_test-dev2015_questions.json")
_OFFICIAL_NAME = re.compile(r"v2_OpenEnded_mscoco_(.+)_questions\.json$")
_COCO_IMAGE = re.compile(r"COCO_([a-z]+\d+)_\d+\.jpg$")


def _question_file(data: str) -> epath.Path:
    path = epath.Path(data)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such VQAv2 question file or directory")
        return path
    for name in DIRECTORY_FILES:
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"{path}: holds none of the VQAv2 question files {list(DIRECTORY_FILES)}")


def _image_split(split: str) -> str:
    return "test2015" if split.startswith("test") else split


def _official_questions(path: epath.Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(split, [(question_id, question, image path relative to the folder)]) of an official question file."""
    content = files.read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("questions"), list):
        raise ValueError(f"{path}: expected the official VQAv2 layout {{'questions': [...]}}")
    name_match = _OFFICIAL_NAME.search(path.name)
    split = content.get("data_subtype") or (name_match.group(1) if name_match else "")
    if not split:
        raise ValueError(f"{path}: cannot tell the split (no `data_subtype`, name not v2_OpenEnded_mscoco_<split>_...)")
    image_split = _image_split(split)
    questions = []
    for k, record in enumerate(content["questions"]):
        files.require(record, ("question_id", "image_id", "question"), f"{path}: questions[{k}]")
        image = f"{image_split}/COCO_{image_split}_{int(record['image_id']):012d}.jpg"
        questions.append((str(record["question_id"]), record["question"], image))
    return split, questions


def _llava_questions(path: epath.Path) -> tuple[str, list[tuple[str, str, str]]]:
    questions, split = [], ""
    for line_number, record in files.read_jsonl(path):
        files.require(record, ("question_id", "image", "text"), f"{path}:{line_number}")
        image_match = _COCO_IMAGE.search(record["image"])
        if image_match is None:
            raise ValueError(f"{path}:{line_number}: image {record['image']!r} is not named COCO_<split>_<id>.jpg")
        split = split or image_match.group(1)
        image = f"{image_match.group(1)}/{record['image']}"
        questions.append((str(record["question_id"]), files.strip_llava_suffix(record["text"]), image))
    return split, questions


def _annotations(path: epath.Path) -> dict[str, dict]:
    content = files.read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise ValueError(f"{path}: expected the official VQAv2 layout {{'annotations': [...]}}")
    by_question = {}
    for k, record in enumerate(content["annotations"]):
        where = f"{path}: annotations[{k}]"
        files.require(record, ("question_id", "answers", "answer_type"), where)
        if not record["answers"]:
            raise ValueError(f"{where}: `answers` is empty")
        for answer in record["answers"]:
            files.require(answer, ("answer",), f"{where}: answers")
        by_question[str(record["question_id"])] = {"answers": [answer["answer"] for answer in record["answers"]],
                                                   "answer_type": record["answer_type"]}
    return by_question


class VQAv2Task(Task):
    name = "vqav2"
    prompt_suffix = files.SHORT_ANSWER_SUFFIX

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        path = _question_file(data)
        llava_layout = path.name.endswith(".jsonl")
        split, questions = (_llava_questions if llava_layout else _official_questions)(path)
        annotation_path = path.parent / f"v2_mscoco_{split}_annotations.json"
        annotations = _annotations(annotation_path) if annotation_path.exists() else {}
        suffix = self.suffix(prompt_suffix)
        items = []
        for question_id, question, image in questions[:limit]:
            if annotations and question_id not in annotations:
                raise ValueError(f"{annotation_path}: no annotation for question_id {question_id} of {path}")
            items.append(TaskItem(question_id=question_id, prompt=files.user_prompt(question, suffix),
                                  images=[str(path.parent / image)], meta=annotations.get(question_id, {})))
        return items

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        if any("answers" not in item.meta for item in items):
            raise ServerScored("VQAv2 items without annotations (test-dev / test) are scored by the EvalAI server: "
                               "upload the JSON of llava_jax.tasks.vqav2.submission(items, predictions)")
        scores_by_type: dict[str, list[float]] = {}
        scores = []
        for item in items:
            prediction = predictions.get(item.question_id)
            score = 0.0 if prediction is None else vqav2_accuracy(prediction, item.meta["answers"])
            scores.append(score)
            scores_by_type.setdefault(item.meta["answer_type"], []).append(score)
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "accuracy": _percent(scores),
                "per_answer_type": {kind: _percent(values) for kind, values in sorted(scores_by_type.items())}}


    def submission(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> list[dict]:
        return submission(items, predictions)


def _percent(scores: Sequence[float]) -> float:
    return round(100 * sum(scores) / len(scores), 2) if scores else 0.0


def submission(items: Sequence[TaskItem], predictions: dict[str, str]) -> list[dict]:
    """EvalAI's upload format, as LLaVA's convert_vqav2_for_submission.py writes it: one {"question_id": int,
    "answer": EvalAI-normalised prediction} per item, "" for items without a prediction."""
    return [{"question_id": int(item.question_id),
             "answer": normalize_answer(predictions[item.question_id]) if item.question_id in predictions else ""}
            for item in items]


TASK = VQAv2Task()
