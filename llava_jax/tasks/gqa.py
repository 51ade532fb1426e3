"""GQA (task "gqa", test-dev balanced): questions from the official release or LLaVA-1.5's question file, scored as
LLaVA does (scripts/convert_gqa_for_eval.py: prediction.rstrip(".").lower(), then the official eval.py exact match).

`data` is a directory holding testdev_balanced_questions.json (official: {qid: {question, imageId, answer,
isBalanced, types: {structural, semantic, ...}, ...}}) and/or LLaVA's llava_gqa_testdev_balanced.jsonl ({question_id,
image, text} per line), or one of those files. With the jsonl, its order and prompts are used and answers come from
the official file beside it (needed to score). Images: <folder>/images/<imageId>.jpg (the jsonl's `image`).
Summary: {"task", "n", "missing", "accuracy", "binary", "open", "per_structural_type", "per_semantic_type"}, percent
with 2 decimals as eval.py prints them, over the questions with isBalanced (all of test-dev balanced); the binary /
open split and the per-type tables need the official `types` (null / {} without them).
"""
from __future__ import annotations

from typing import Optional, Sequence

from etils import epath

from llava_jax.tasks import llava_questions as files
from llava_jax.tasks.base import Task, TaskItem, missing_predictions

OFFICIAL_FILE = "testdev_balanced_questions.json"
LLAVA_FILE = "llava_gqa_testdev_balanced.jsonl"


def _files(data: str) -> tuple[Optional[epath.Path], Optional[epath.Path]]:
    """(official question file or None, LLaVA question file or None); at least one exists."""
    path = epath.Path(data)
    if path.is_dir():
        official, llava = path / OFFICIAL_FILE, path / LLAVA_FILE
    elif path.name.endswith(".jsonl"):
        official, llava = path.parent / OFFICIAL_FILE, path
    else:
        official, llava = path, None
    official = official if official.exists() else None
    llava = llava if llava is not None and llava.exists() else None
    if official is None and llava is None:
        raise FileNotFoundError(f"{path}: no GQA question file ({OFFICIAL_FILE} or {LLAVA_FILE})")
    return official, llava


def _official(path: epath.Path) -> dict[str, dict]:
    content = files.read_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected the official GQA layout {{question_id: {{...}}}}")
    for qid, record in content.items():
        files.require(record, ("question", "imageId", "answer"), f"{path}: question {qid}")
    return content


def prediction_answer(text: str) -> str:
    """convert_gqa_for_eval.py: trailing periods removed, lower-cased (no whitespace stripping)."""
    return text.rstrip(".").lower()


class GQATask(Task):
    name = "gqa"
    prompt_suffix = files.SHORT_ANSWER_SUFFIX

    def load(self, data: str, prompt_suffix: Optional[str] = None, limit: Optional[int] = None) -> list[TaskItem]:
        official_path, llava_path = _files(data)
        folder = (official_path or llava_path).parent
        official = _official(official_path) if official_path is not None else {}
        if llava_path is None:
            questions = [(qid, record["question"], f"{record['imageId']}.jpg") for qid, record in official.items()]
        else:
            questions = []
            for line_number, line in files.read_jsonl(llava_path):
                files.require(line, ("question_id", "image", "text"), f"{llava_path}:{line_number}")
                qid = str(line["question_id"])
                if official and qid not in official:
                    raise ValueError(f"{llava_path}:{line_number}: question {qid} is not in {official_path}")
                questions.append((qid, files.strip_llava_suffix(line["text"]), line["image"]))
        suffix = self.suffix(prompt_suffix)
        items = []
        for qid, question, image in questions[:limit]:
            record = official.get(qid)
            meta = {} if record is None else {"answer": record["answer"], "balanced": record.get("isBalanced", True),
                                              "types": record.get("types", {})}
            items.append(TaskItem(question_id=qid, prompt=files.user_prompt(question, suffix),
                                  images=[str(folder / "images" / image)], meta=meta))
        return items

    def score(self, items: Sequence[TaskItem], predictions: dict[str, str]) -> dict:
        if any("answer" not in item.meta for item in items):
            raise ValueError(f"GQA items without answers: scoring needs the official {OFFICIAL_FILE} next to "
                             f"{LLAVA_FILE}")
        groups: dict[str, dict[str, list[float]]] = {"structural": {}, "semantic": {}, "answer_kind": {}}
        scores = []
        for item in items:
            if not item.meta["balanced"]:
                continue
            prediction = predictions.get(item.question_id)
            score = float(prediction is not None and prediction_answer(prediction) == item.meta["answer"])
            scores.append(score)
            types = item.meta["types"]
            if "structural" in types:
                groups["structural"].setdefault(types["structural"], []).append(score)
                kind = "open" if types["structural"] == "query" else "binary"
                groups["answer_kind"].setdefault(kind, []).append(score)
            if "semantic" in types:
                groups["semantic"].setdefault(types["semantic"], []).append(score)
        kinds = groups["answer_kind"]   # empty when the questions have no `types`
        return {"task": self.name, "n": len(items), "missing": missing_predictions(items, predictions),
                "accuracy": _percent(scores),
                "binary": _percent(kinds.get("binary", [])) if kinds else None,
                "open": _percent(kinds.get("open", [])) if kinds else None,
                "per_structural_type": {t: _percent(v) for t, v in sorted(groups["structural"].items())},
                "per_semantic_type": {t: _percent(v) for t, v in sorted(groups["semantic"].items())}}


def _percent(scores: Sequence[float]) -> float:
    """eval.py's avg(...) * 100 (0 for no questions), rounded as it prints ("{:.2f}")."""
    return round(100 * sum(scores) / len(scores), 2) if scores else 0.0


TASK = GQATask()
