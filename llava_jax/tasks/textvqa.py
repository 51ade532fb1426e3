"""TextVQA (task "textvqa", v0.5.1 val): questions and the 10 human answers of the official release, optionally the
prompts of LLaVA-1.5's OCR question file; scored like the m4c TextVQAAccuracyEvaluator LLaVA's eval_textvqa.py runs.

`data` is a directory holding TextVQA_0.5.1_val.json (official: {"data": [{question_id, question, image_id,
answers: [10 strings]}]}) and, optionally, LLaVA's llava_textvqa_val_v051_ocr.jsonl ({question_id: the image id,
image, text: question + "\\nReference OCR token: ..." + "\\nAnswer the question using a single word or phrase."});
or one of those two files (the jsonl needs the official file beside it). With the jsonl, its order and prompts are
used (OCR line kept) and each line is joined to its annotation by (image id, lower-cased question) as
eval_textvqa.py does; without it the prompt is the bare question. Item ids are the official `question_id`s.
Images: <folder>/train_images/<image_id>.jpg. Summary: {"task", "n", "missing", "accuracy"} (percent, 2 decimals,
as eval_textvqa.py prints it).
"""
from __future__ import annotations

from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks import llava_questions as files
from llava_jax.tasks.base import Task, TaskItem, missing_predictions
from llava_jax.tasks.vqa_accuracy import textvqa_accuracy

ANNOTATION_FILE = "TextVQA_0.5.1_val.json"
LLAVA_FILE = "llava_textvqa_val_v051_ocr.jsonl"
_OCR_PREFIX = "Reference OCR token:"


def _files(data: str) -> tuple[epath.Path, Optional[epath.Path]]:
    """(official annotation file, LLaVA question file or None)."""
    path = epath.Path(data)
    if path.is_dir():
        return path / ANNOTATION_FILE, (path / LLAVA_FILE if (path / LLAVA_FILE).exists() else None)
    if path.name.endswith(".jsonl"):
        return path.parent / ANNOTATION_FILE, path
    return path, None


def _annotations(path: epath.Path) -> list[dict]:
    content = files.read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise ValueError(f"{path}: expected the official TextVQA layout {{'data': [...]}}")
    for k, record in enumerate(content["data"]):
        where = f"{path}: data[{k}]"
        files.require(record, ("question_id", "question", "image_id", "answers"), where)
        if not isinstance(record["answers"], list) or not record["answers"]:
            raise ValueError(f"{where}: `answers` must be a non-empty list of strings")
    return content["data"]


def _question_line(text: str) -> str:
    """The question of a LLaVA prompt: its first line that is not the OCR-token line."""
    return next((line for line in text.split("\n") if not line.startswith(_OCR_PREFIX)), "")


class TextVQATask(Task):
    name = "textvqa"
    prompt_suffix = files.SHORT_ANSWER_SUFFIX

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        annotation_path, llava_path = _files(data)
        annotations = _annotations(annotation_path)
        images = annotation_path.parent / "train_images"
        if llava_path is None:
            questions = [(record, record["question"]) for record in annotations]
        else:
            by_key: dict[tuple[str, str], list[dict]] = {}
            for record in annotations:
                by_key.setdefault((str(record["image_id"]), record["question"].lower()), []).append(record)
            questions = []
            for line_number, line in files.read_jsonl(llava_path):
                files.require(line, ("question_id", "text"), f"{llava_path}:{line_number}")
                text = files.strip_llava_suffix(line["text"])
                matches = by_key.get((str(line["question_id"]), _question_line(text).lower()))
                if not matches:
                    raise ValueError(f"{llava_path}:{line_number}: no question {_question_line(text)!r} on image "
                                     f"{line['question_id']!r} in {annotation_path}")
                # a question asked twice on one image takes its annotations in order (LLaVA's dict keeps the last)
                questions.append((matches.pop(0) if len(matches) > 1 else matches[0], text))
        suffix = self.suffix(prompt_suffix)
        return [TaskItem(question_id=str(record["question_id"]), prompt=files.user_prompt(text, suffix),
                         images=[str(images / f"{record['image_id']}.jpg")], meta={"answers": record["answers"]})
                for record, text in questions[:limit]]

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        scores = [textvqa_accuracy(predictions[item.question_id], item.meta["answers"])
                  if item.question_id in predictions else 0.0 for item in items]
        accuracy = round(100 * sum(scores) / len(scores), 2) if scores else 0.0
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "accuracy": accuracy}


TASK = TextVQATask()
