"""POPE (task "pope", COCO adversarial / popular / random): LLaVA-1.5's question file and POPE's annotation files,
scored like LLaVA's llava/eval/eval_pope.py.

`data` is a directory holding the annotation files coco_pope_<category>.json (POPE's release: JSON lines {question_id,
image, text, label: "yes" | "no"}), directly or in coco/ (LLaVA's layout), and optionally LLaVA's llava_pope_test.jsonl
({question_id, image, text, category} per line). As eval_pope.py does, a category's questions are paired with its
annotation file line by line (the images must agree). Without the jsonl the items are the annotation files' lines,
ids "<category>/<question_id>". Images: <data>/val2014/<image>.
A prediction is "no" when its first sentence (text before the first ".", commas removed, split on " ") has the word
"No", "no" or "not", else "yes"; a missing prediction counts as the wrong answer. Summary: {"task", "n", "missing",
"per_category": {category: {"n", "accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn"}},
"mean": {the five metrics averaged over categories}}: fractions, unrounded, as eval_pope.py prints them (it would
divide by zero where we report 0.0: precision without "yes" predictions, F1 when precision + recall is 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks import llava_questions as files
from llava_jax.tasks.base import Task, TaskItem, missing_predictions

LLAVA_FILE = "llava_pope_test.jsonl"
_PREFIX, _SUFFIX = "coco_pope_", ".json"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _annotation_files(folder: epath.Path) -> dict[str, epath.Path]:
    """category -> coco_pope_<category>.json, from <folder> or else <folder>/coco."""
    for candidate in (folder, folder / "coco"):
        if candidate.is_dir():
            found = {path.name[len(_PREFIX):-len(_SUFFIX)]: path for path in sorted(candidate.iterdir())
                     if path.name.startswith(_PREFIX) and path.name.endswith(_SUFFIX)}
            if found:
                return found
    raise FileNotFoundError(f"{folder}: no POPE annotation files {_PREFIX}<category>{_SUFFIX} (here or in coco/)")


def _annotations(path: epath.Path) -> list[tuple[int, dict]]:
    lines = files.read_jsonl(path)
    for line_number, record in lines:
        files.require(record, ("question_id", "image", "text", "label"), f"{path}:{line_number}")
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"{path}:{line_number}: label must be 'yes' or 'no', got {record['label']!r}")
    return lines


def answer_is_no(text: str) -> bool:
    """eval_pope.py's reading of a free-form answer: only the first sentence, commas removed, words split on " "."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def _metrics(labels: Sequence[bool], says_yes: Sequence[bool]) -> dict:
    tp = sum(label and yes for label, yes in zip(labels, says_yes))
    fp = sum(not label and yes for label, yes in zip(labels, says_yes))
    tn = sum(not label and not yes for label, yes in zip(labels, says_yes))
    fn = len(labels) - tp - fp - tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(labels), "accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": sum(says_yes) / len(labels), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


class POPETask(Task):
    name = "pope"
    prompt_suffix = files.SHORT_ANSWER_SUFFIX

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        folder = epath.Path(data)
        annotation_files = _annotation_files(folder)
        annotations = {category: _annotations(path) for category, path in annotation_files.items()}
        questions = []   # (question_id, question, image, category, label)
        if not (folder / LLAVA_FILE).exists():
            for category, lines in annotations.items():
                questions += [(f"{category}/{record['question_id']}", record["text"], record["image"], category,
                               record["label"]) for _, record in lines]
        else:
            llava_path = folder / LLAVA_FILE
            next_line = dict.fromkeys(annotations, 0)
            for line_number, record in files.read_jsonl(llava_path):
                where = f"{llava_path}:{line_number}"
                files.require(record, ("question_id", "image", "text", "category"), where)
                category = record["category"]
                if category not in annotations:
                    raise ValueError(f"{where}: category {category!r} has no annotation file "
                                     f"{_PREFIX}{category}{_SUFFIX} (found {sorted(annotations)})")
                if next_line[category] >= len(annotations[category]):
                    raise ValueError(f"{where}: more {category!r} questions than lines in "
                                     f"{annotation_files[category]}")
                label_line, label = annotations[category][next_line[category]]
                next_line[category] += 1
                if label["image"] != record["image"]:
                    raise ValueError(f"{where}: image {record['image']!r} but the paired line "
                                     f"{annotation_files[category]}:{label_line} has {label['image']!r}")
                questions.append((str(record["question_id"]), files.strip_llava_suffix(record["text"]),
                                  record["image"], category, label["label"]))
            for category, used in next_line.items():
                if used != len(annotations[category]):
                    raise ValueError(f"{llava_path}: {used} {category!r} questions but "
                                     f"{len(annotations[category])} lines in {annotation_files[category]}")
        suffix = self.suffix(prompt_suffix)
        return [TaskItem(question_id=question_id, prompt=files.user_prompt(question, suffix),
                         images=[str(folder / "val2014" / image)], meta={"category": category, "label": label})
                for question_id, question, image, category, label in questions[:limit]]

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        by_category: dict[str, tuple[list[bool], list[bool]]] = {}
        for item in items:
            label = item.meta["label"] == "yes"
            prediction = predictions.get(item.question_id)
            says_yes = (not label) if prediction is None else not answer_is_no(prediction)
            labels, answers = by_category.setdefault(item.meta["category"], ([], []))
            labels.append(label)
            answers.append(says_yes)
        per_category = {category: _metrics(*pairs) for category, pairs in sorted(by_category.items())}
        mean = {metric: sum(values[metric] for values in per_category.values()) / len(per_category)
                for metric in METRICS} if per_category else {}
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "per_category": per_category, "mean": mean}


TASK = POPETask()
