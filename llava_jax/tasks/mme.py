"""MME: 14 yes/no subtasks, two questions per image, scored as MME's calculation.py (perception / cognition).

Public surface: `MMETask` and `TASK`. `data`: the MME_Benchmark_release_version directory; each subtask folder
holds either `images/` + `questions_answers_YN/<stem>.txt`, or `<stem>.<png|jpg>` + `<stem>.txt` side by side; a
txt has one "question<TAB>Yes|No" line per question (two per image). question_id: LLaVA's image id
("artwork/images/10256.jpg", "code_reasoning/0020.png") + "#k", k the question's line in the txt (0, 1).
Prompt: "<image>\nquestion\nsuffix"; with a suffix, MME's own " Please answer yes or no." is dropped first, as
LLaVA's llava_mme.jsonl and lmms-eval do.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks.base import Task, TaskItem, missing_predictions

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
_YES_NO_INSTRUCTION = re.compile(r"\s*Please answer yes or no\.\s*$")


def parse_yes_no(answer: str) -> str:
    """"yes" / "no" / "other", as MME's parse_pred_ans in lmms-eval's version: lower-cased, stripped, periods
    dropped, a lone "y" / "n" accepted; otherwise "yes" / "no" found in the first 4 characters. (MME's own
    calculation.py reads a lone "y" / "n" as "other" and keeps periods; on other answers the two agree.)"""
    answer = answer.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if len(answer) == 1:
        return {"y": "yes", "n": "no"}.get(answer, "other")
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _image_for(folder: epath.Path, stem: str, txt: epath.Path) -> epath.Path:
    for suffix in _IMAGE_SUFFIXES:
        if (folder / (stem + suffix)).exists():
            return folder / (stem + suffix)
    raise ValueError(f"{txt}: no image {stem}.png / .jpg in {folder}")


def _read_pairs(txt: epath.Path) -> list[tuple[str, str]]:
    pairs = []
    for line_number, line in enumerate(txt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
            raise ValueError(f"{txt}:{line_number}: expected 'question<TAB>Yes|No', got {line!r}")
        pairs.append((fields[0], fields[1].strip().lower()))
    if len(pairs) != 2:
        raise ValueError(f"{txt}: MME pairs two questions per image; this file has {len(pairs)}")
    return pairs


class MMETask(Task):
    name = "mme"
    prompt_suffix = "Answer the question using a single word or phrase."

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        root = epath.Path(data)
        if not root.is_dir():
            raise ValueError(f"{data}: MME needs the MME_Benchmark_release_version directory")
        suffix = self.suffix(prompt_suffix)
        subtasks = [name for name in PERCEPTION + COGNITION if (root / name).is_dir()]
        if not subtasks:
            raise ValueError(f"{data}: none of the MME subtask folders ({', '.join(PERCEPTION + COGNITION)})")
        items = []
        for subtask in subtasks:
            folder = root / subtask
            nested = (folder / "images").is_dir()
            image_dir, qa_dir = (folder / "images", folder / "questions_answers_YN") if nested else (folder, folder)
            if not qa_dir.is_dir():
                raise ValueError(f"{folder}: has images/ but no questions_answers_YN/")
            for txt in sorted(qa_dir.glob("*.txt")):
                image = _image_for(image_dir, txt.stem, txt)
                image_id = f"{subtask}/{image.relative_to(folder).as_posix()}" if nested else f"{subtask}/{image.name}"
                for k, (question, answer) in enumerate(_read_pairs(txt)):
                    # LLaVA and lmms-eval replace MME's own instruction with theirs
                    text = _YES_NO_INSTRUCTION.sub("", question) if suffix else question
                    items.append(TaskItem(
                        question_id=f"{image_id}#{k}", prompt=f"<image>\n{text}" + (f"\n{suffix}" if suffix else ""),
                        images=[str(image)], meta={"subtask": subtask, "image_id": image_id, "answer": answer}))
                if limit is not None and len(items) >= limit:
                    return items[:limit]
        return items

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        """Per subtask: acc (% of questions right), acc_plus (% of images with both questions right), score =
        acc + acc_plus; perception / cognition: the sums of their subtasks' scores (subtasks present only)."""
        right_by_image: dict[str, dict[str, list[bool]]] = {}
        for item in items:
            parsed = parse_yes_no(predictions.get(item.question_id, ""))
            by_image = right_by_image.setdefault(item.meta["subtask"], {})
            by_image.setdefault(item.meta["image_id"], []).append(parsed == item.meta["answer"])
        subtasks = {}
        for subtask in PERCEPTION + COGNITION:
            if subtask not in right_by_image:
                continue
            images = list(right_by_image[subtask].values())
            acc = 100.0 * sum(sum(rights) for rights in images) / sum(len(rights) for rights in images)
            acc_plus = 100.0 * sum(all(rights) for rights in images) / len(images)
            subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "perception": sum(subtasks[s]["score"] for s in PERCEPTION if s in subtasks),
                "cognition": sum(subtasks[s]["score"] for s in COGNITION if s in subtasks),
                "subtasks": subtasks}


TASK = MMETask()
