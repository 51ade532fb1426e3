"""ScienceQA-IMG: the test split's problems with an image, scored as LLaVA's eval_science_qa.py (IMG-Accuracy).

Public surface: `ScienceQATask` and `TASK`. `data`: either the ScienceQA release directory (problems.json,
pid_splits.json, images/test/<pid>/image.png), or LLaVA's llava_test_CQM-A.json (its images under
images/test/ next to it; answers from problems.json there when present, else from the file's "gpt" turn).
Prompts are LLaVA-1.5's: "<image>\nContext: <hint>\n<question>\nA. <choice>\n..." (no Context line without a
hint), the json's own text when reading llava_test_CQM-A.json. question_id: the problem id ("5").
An answer LLaVA's script cannot read a letter from counts wrong (the official has no random fallback) and is
reported as `unparsed`.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks.base import Task, TaskItem, missing_predictions
from llava_jax.tasks.choices import option_letters, scienceqa_choice_index


def _load_json(path: epath.Path):
    if not path.exists():
        raise ValueError(f"{path}: not found (ScienceQA needs it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _problem_text(problem: dict) -> str:
    letters = option_letters(len(problem["choices"]))
    context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, problem["choices"]))
    return f"{context}{problem['question']}\n{options}".strip()   # model_vqa_science.py strips the turn


def _checked_problem(path: epath.Path, pid: str, problem) -> dict:
    if not isinstance(problem, dict) or not isinstance(problem.get("choices"), list) or not problem["choices"] \
            or not isinstance(problem.get("answer"), int) or not 0 <= problem["answer"] < len(problem["choices"]) \
            or "question" not in problem:
        raise ValueError(f"{path}: problem {pid!r} needs `question`, a list `choices` and an int `answer` "
                         f"indexing it")
    return problem


def _trailing_options(text: str) -> int:
    """How many "A. ...", "B. ..." lines end a LLaVA-1.5 ScienceQA question."""
    lines = text.split("\n")
    for count in range(min(len(lines), 26), 0, -1):
        if all(line.startswith(f"{letter}. ") for letter, line in zip(option_letters(count), lines[-count:])):
            return count
    return 0


class ScienceQATask(Task):
    name = "scienceqa"
    prompt_suffix = "Answer with the option's letter from the given choices directly."

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        path = epath.Path(data)
        suffix = self.suffix(prompt_suffix)
        records = self._llava_records(path) if path.is_file() else self._release_records(path)
        items = []
        for pid, text, image, answer, num_choices in records[:limit]:
            if not image.exists():
                raise ValueError(f"{data}: problem {pid!r}: image {image} not found")
            items.append(TaskItem(question_id=pid, prompt=f"<image>\n{text}" + (f"\n{suffix}" if suffix else ""),
                                  images=[str(image)], meta={"answer": answer, "num_choices": num_choices}))
        return items

    def _release_records(self, root: epath.Path) -> list[tuple]:
        splits, problems = _load_json(root / "pid_splits.json"), _load_json(root / "problems.json")
        if "test" not in splits:
            raise ValueError(f"{root / 'pid_splits.json'}: no `test` split (has {sorted(splits)})")
        records = []
        for pid in splits["test"]:
            if pid not in problems:
                raise ValueError(f"{root / 'pid_splits.json'}: test problem {pid!r} is not in problems.json")
            problem = _checked_problem(root / "problems.json", pid, problems[pid])
            if problem.get("image"):
                records.append((pid, _problem_text(problem), root / "images" / "test" / pid / problem["image"],
                                problem["answer"], len(problem["choices"])))
        return records

    def _llava_records(self, path: epath.Path) -> list[tuple]:
        questions = _load_json(path)
        problems_path = path.parent / "problems.json"
        problems = _load_json(problems_path) if problems_path.exists() else None
        records = []
        for k, record in enumerate(questions, 1):
            if "image" not in record:
                continue
            try:
                pid, turns = str(record["id"]), record["conversations"]
                text = turns[0]["value"].replace("<image>", "").strip()
                if problems is not None:
                    problem = _checked_problem(problems_path, pid, problems.get(pid))
                    answer, num_choices = problem["answer"], len(problem["choices"])
                else:
                    num_choices = _trailing_options(text)
                    answer = option_letters(num_choices).index(turns[1]["value"].strip())
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: record {k} needs `id`, a question turn with its options and a gpt turn "
                                 f"with the answer letter ({type(e).__name__}: {e})") from None
            records.append((pid, text, path.parent / "images" / "test" / record["image"], answer, num_choices))
        return records

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        """accuracy: % of items whose read letter is the answer (LLaVA's IMG-Accuracy); missing counts wrong."""
        correct = unparsed = 0
        for item in items:
            index = scienceqa_choice_index(predictions.get(item.question_id, "FAILED"), item.meta["num_choices"])
            correct += index == item.meta["answer"]
            unparsed += index < 0 and item.question_id in predictions
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "unparsed": unparsed, "correct": correct,
                "accuracy": 100.0 * correct / len(items) if items else 0.0}


TASK = ScienceQATask()
