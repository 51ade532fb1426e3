"""GQA and POPE tasks: the scorers against transliterations of the official scripts (LLaVA's convert_gqa_for_eval.py +
GQA eval.py; LLaVA's eval_pope.py) and lmms-eval 0.7.3's POPE metrics on hundreds of hard cases; the tiny fixtures
read and scored end to end; errors that name the file and line."""
import json
import os
import random
import shutil

import pytest

from llava_jax.tasks import gqa, pope
from llava_jax.tasks.base import TaskItem, read_predictions
from tests.lmms_reference import lmms_module

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tasks")
SUFFIX = "\nAnswer the question using a single word or phrase."

GQA_GOLDS = ["yes", "no", "left", "right", "red", "dark brown", "man", "2", "t-shirt", "hot dog", "table", "white"]
GQA_PREDICTIONS = sorted({variant for gold in GQA_GOLDS + ["Yes, it is", "the man", "two", "", " ", "nothing"]
                          for variant in (gold, gold.upper(), gold.capitalize(), gold + ".", gold + "..", " " + gold,
                                          gold + " ", gold + ". ", gold + "!", "." + gold, gold + "\n", "The " + gold)})
_POPE_BASES = [
    "Yes", "No", "yes", "no", "YES", "NO", "Yes.", "No.", "no.", "yes,", "no,", "Yes, there is a dog.",
    "No, there is no dog.", "There is no dog.", "There is not a dog.", "not sure", "Not", "nope", "None",
    "I do not see one.", "Yes. No.", "No. Yes.", "yes,no", "no,yes", "No-", "Nothing", "", " ", ".",
    "The image shows a dog. There is no cat.", "There is a dog, no cat", "Yes there is no doubt",
    "no\nyes", "yes\nno", "It is not", "It's notable", "Nobody", "know", "No!", "no!", "(no)", "Yes, not"]
POPE_ANSWERS = sorted({variant for base in _POPE_BASES
                       for variant in (base, base + ".", base.lower(), base.upper(), "Well, " + base,
                                       base + " I think.", base.replace(" ", "  "), "No doubt: " + base)})


# ---- test-only transliteration of LLaVA scripts/convert_gqa_for_eval.py + GQA's official eval.py accuracy ----
def _official_gqa(questions, answers):
    predictions = {qid: text.rstrip(".").lower() for qid, text in answers.items()}   # convert_gqa_for_eval.py
    scores = {"accuracy": [], "binary": [], "open": [], "structural": {}, "semantic": {}}
    for qid, question in questions.items():
        if not question["isBalanced"]:
            continue
        score = float(1 if predictions[qid] == question["answer"] else 0)
        scores["accuracy"].append(score)
        scores["structural"].setdefault(question["types"]["structural"], []).append(score)
        scores["semantic"].setdefault(question["types"]["semantic"], []).append(score)
        scores["open" if question["types"]["structural"] == "query" else "binary"].append(score)
    avg = lambda values: float(sum(values)) / len(values) if values else 0
    printed = lambda value: float("{:.2f}".format(value * 100))   # eval.py prints "{score:.2f}%"
    return {"accuracy": printed(avg(scores["accuracy"])), "binary": printed(avg(scores["binary"])),
            "open": printed(avg(scores["open"])),
            "per_structural_type": {t: printed(avg(v)) for t, v in scores["structural"].items()},
            "per_semantic_type": {t: printed(avg(v)) for t, v in scores["semantic"].items()}}


# ---- test-only transliteration of LLaVA llava/eval/eval_pope.py (eval_pope per category) ----
def _official_pope(texts, labels):
    answers = []
    for text in texts:
        if text.find(".") != -1:
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        answers.append("no" if ("No" in words or "not" in words or "no" in words) else "yes")
    label_list = [0 if label == "no" else 1 for label in labels]
    pred_list = [0 if answer == "no" else 1 for answer in answers]
    yes_ratio = pred_list.count(1) / len(pred_list)
    tp = sum(p == 1 and l == 1 for p, l in zip(pred_list, label_list))
    fp = sum(p == 1 and l == 0 for p, l in zip(pred_list, label_list))
    tn = sum(p == 0 and l == 0 for p, l in zip(pred_list, label_list))
    fn = sum(p == 0 and l == 1 for p, l in zip(pred_list, label_list))
    precision = float(tp) / float(tp + fp)
    recall = float(tp) / float(tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    acc = (tp + tn) / (tp + tn + fp + fn)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}, answers
# ----------------------------------------------------------------------------------------------------------------------


def _write_predictions(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


# ---- GQA ----

def _gqa_cases(seed, count):
    rng = random.Random(seed)
    structural = ["verify", "query", "logical", "choose", "compare"]
    semantic = ["attr", "rel", "obj", "cat", "global"]
    questions, answers = {}, {}
    for k in range(count):
        gold = rng.choice(GQA_GOLDS)
        answer = rng.choice([rng.choice(GQA_PREDICTIONS), gold, gold.capitalize() + "."])
        questions[str(k)] = {"answer": gold, "isBalanced": k % 17 != 0,
                             "types": {"structural": rng.choice(structural), "semantic": rng.choice(semantic)}}
        answers[str(k)] = answer
    return questions, answers


def _gqa_items(questions):
    return [TaskItem(question_id=qid, prompt="", images=[],
                     meta={"answer": q["answer"], "balanced": q["isBalanced"], "types": q["types"]})
            for qid, q in questions.items()]


def test_hard_cases_cover_hundreds_of_answers():
    assert len(GQA_PREDICTIONS) > 150 and len(POPE_ANSWERS) > 200


def test_gqa_each_prediction_scores_like_convert_gqa_for_eval_and_eval_py():
    questions, answers = _gqa_cases(seed=0, count=1200)
    for qid, question in questions.items():
        question = dict(question, isBalanced=True)
        single = {qid: question}
        ours = gqa.TASK.score(_gqa_items(single), {qid: answers[qid]})["accuracy"]
        assert ours == _official_gqa(single, {qid: answers[qid]})["accuracy"], (answers[qid], question["answer"])


def test_gqa_summary_equals_official_eval_py_on_hard_cases():
    questions, answers = _gqa_cases(seed=1, count=1500)
    summary = gqa.TASK.score(_gqa_items(questions), answers)
    official = _official_gqa(questions, answers)
    assert {key: summary[key] for key in official} == official
    assert (summary["n"], summary["missing"]) == (1500, 0)


def test_gqa_prediction_keeps_whitespace_like_llava():
    assert gqa.prediction_answer("Left.. ") == "left.. "
    assert gqa.prediction_answer("Left..") == "left"


def test_gqa_reads_llava_questions_with_official_answers():
    items = gqa.TASK.load(f"{FIXTURES}/gqa")
    assert [item.question_id for item in items] == ["20968379", "20968380", "201640614"]
    assert items[0].prompt == "<image>\nDo the shorts have dark color?" + SUFFIX
    assert items[2].images == [f"{FIXTURES}/gqa/images/n161313.jpg"]
    assert items[1].meta["answer"] == "left" and items[1].meta["types"]["structural"] == "query"


def test_gqa_reads_the_official_file_alone(tmp_path):
    shutil.copy(f"{FIXTURES}/gqa/testdev_balanced_questions.json", tmp_path)
    items = gqa.TASK.load(str(tmp_path), prompt_suffix="Be brief.")
    assert items[1].prompt == "<image>\nOn which side is the cup?\nBe brief."
    assert items[1].images == [f"{tmp_path}/images/n288870.jpg"]


def test_gqa_scores_a_llava_answers_file(tmp_path):
    items = gqa.TASK.load(f"{FIXTURES}/gqa")
    path = _write_predictions(tmp_path / "merge.jsonl", [{"question_id": "20968379", "text": "Yes."},
                                                         {"question_id": "20968380", "text": "Left "},
                                                         {"question_id": "201640614", "text": "No"}])
    # "left " keeps its space (LLaVA's converter only strips periods) and is wrong
    assert gqa.TASK.score(items, read_predictions(path)) == {
        "task": "gqa", "n": 3, "missing": 0, "accuracy": 66.67, "binary": 100.0, "open": 0.0,
        "per_structural_type": {"logical": 100.0, "query": 0.0, "verify": 100.0},
        "per_semantic_type": {"attr": 100.0, "obj": 100.0, "rel": 0.0}}
    assert gqa.TASK.score(items, {"20968379": "yes"})["missing"] == 2


def test_gqa_without_official_answers_cannot_score(tmp_path):
    shutil.copy(f"{FIXTURES}/gqa/llava_gqa_testdev_balanced.jsonl", tmp_path)
    items = gqa.TASK.load(str(tmp_path))
    with pytest.raises(ValueError, match="testdev_balanced_questions.json"):
        gqa.TASK.score(items, {})


def test_gqa_missing_files_and_bad_records_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        gqa.TASK.load(str(tmp_path))
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({"7": {"question": "q", "imageId": "n1"}}))
    with pytest.raises(ValueError, match=r"testdev_balanced_questions.json: question 7: record lacks \['answer'\]"):
        gqa.TASK.load(str(tmp_path))


# ---- POPE ----

def _pope_cases(seed, count):
    rng = random.Random(seed)
    return [(rng.choice(POPE_ANSWERS), rng.choice(["yes", "no"])) for _ in range(count)]


def _pope_items(cases, category):
    return [TaskItem(question_id=f"{category}{k}", prompt="", images=[], meta={"category": category, "label": label})
            for k, (_, label) in enumerate(cases)]


def test_pope_metrics_equal_eval_pope_per_category_on_hard_cases():
    cases = {category: _pope_cases(seed, 300) for seed, category in enumerate(["adversarial", "popular", "random"])}
    items = [item for category, rows in cases.items() for item in _pope_items(rows, category)]
    predictions = {f"{category}{k}": text for category, rows in cases.items() for k, (text, _) in enumerate(rows)}
    summary = pope.TASK.score(items, predictions)
    for category, rows in cases.items():
        official, _ = _official_pope([text for text, _ in rows], [label for _, label in rows])
        for metric, value in official.items():
            assert summary["per_category"][category][metric] == pytest.approx(value, abs=1e-12), (category, metric)
    for metric in pope.METRICS:
        assert summary["mean"][metric] == pytest.approx(
            sum(summary["per_category"][c][metric] for c in cases) / 3, abs=1e-12)


def test_pope_each_answer_reads_like_eval_pope():
    for text in POPE_ANSWERS:
        _, (answer, _, _) = _official_pope([text, "Yes", "Yes"], ["yes", "yes", "no"])   # no zero division
        assert pope.answer_is_no(text) == (answer == "no"), repr(text)


def test_pope_metrics_equal_lmms_eval_on_yes_no_answers():
    """lmms-eval's aggregations (precision, recall, F1, accuracy) on the answers eval_pope.py reads as yes / no."""
    utils = lmms_module("pope/utils.py")
    rows = _pope_cases(seed=7, count=600)
    _, answers = _official_pope([text for text, _ in rows], [label for _, label in rows])
    results = [utils.pope_process_results({"question_id": k, "answer": label}, [answer])["pope_accuracy"]
               for k, ((_, label), answer) in enumerate(zip(rows, answers))]
    ours = pope.TASK.score(_pope_items(rows, "random"), {f"random{k}": text for k, (text, _) in enumerate(rows)})
    metrics = ours["per_category"]["random"]
    assert metrics["accuracy"] == pytest.approx(utils.pope_aggregate_accuracy(results), abs=1e-12)
    assert metrics["precision"] == pytest.approx(utils.pope_aggregate_precision(results), abs=1e-12)
    assert metrics["recall"] == pytest.approx(utils.pope_aggregate_recall(results), abs=1e-12)
    assert metrics["f1"] == pytest.approx(utils.pope_aggregate_f1_score(results), abs=1e-12)


def test_pope_reads_llava_questions_paired_with_annotation_lines():
    items = pope.TASK.load(f"{FIXTURES}/pope")
    assert [item.question_id for item in items] == [str(k) for k in range(1, 9)]
    assert items[0].prompt == "<image>\nIs there a snowboard in the image?" + SUFFIX
    assert items[0].images == [f"{FIXTURES}/pope/val2014/COCO_val2014_000000310196.jpg"]
    assert [(item.meta["category"], item.meta["label"]) for item in items[3:6]] == [
        ("adversarial", "no"), ("popular", "yes"), ("popular", "no")]


def test_pope_reads_the_annotation_files_alone(tmp_path):
    shutil.copytree(f"{FIXTURES}/pope/coco", tmp_path / "coco")
    items = pope.TASK.load(str(tmp_path), prompt_suffix="")
    assert [item.question_id for item in items[:5]] == ["adversarial/1", "adversarial/2", "adversarial/3",
                                                        "adversarial/4", "popular/1"]
    assert items[0].prompt == "<image>\nIs there a snowboard in the image?"


def test_pope_scores_a_llava_answers_file(tmp_path):
    items = pope.TASK.load(f"{FIXTURES}/pope")
    # labels: adversarial yes no yes no, popular yes no, random yes no
    texts = ["Yes, there is.", "No.", "There is no truck.", "Yes", "yes", "Not at all", "Yes"]
    path = _write_predictions(tmp_path / "answers.jsonl",
                              [{"question_id": k, "text": text} for k, text in enumerate(texts, 1)])
    summary = pope.TASK.score(items, read_predictions(path))
    assert (summary["n"], summary["missing"]) == (8, 1)
    # adversarial: TP 1, TN 1, FN 1, FP 1
    assert summary["per_category"]["adversarial"] == {"n": 4, "accuracy": 0.5, "precision": 0.5, "recall": 0.5,
                                                      "f1": 0.5, "yes_ratio": 0.5, "tp": 1, "fp": 1, "tn": 1, "fn": 1}
    # popular: "Not at all" has none of the words "No", "not", "no": eval_pope.py reads it as "yes"
    assert summary["per_category"]["popular"]["fp"] == 1 and summary["per_category"]["popular"]["accuracy"] == 0.5
    # random: "Yes" on a yes, the missing answer to a "no" counts as a wrong "yes"
    assert summary["per_category"]["random"] == {"n": 2, "accuracy": 0.5, "precision": 0.5, "recall": 1.0,
                                                 "f1": pytest.approx(2 / 3), "yes_ratio": 1.0,
                                                 "tp": 1, "fp": 1, "tn": 0, "fn": 0}
    assert summary["mean"]["accuracy"] == pytest.approx(0.5)
    assert summary["mean"]["f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)


def test_pope_missing_annotations_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_pope_"):
        pope.TASK.load(str(tmp_path))


def test_pope_bad_lines_are_named(tmp_path):
    shutil.copytree(f"{FIXTURES}/pope/coco", tmp_path / "coco")
    llava = tmp_path / "llava_pope_test.jsonl"
    llava.write_text(json.dumps({"question_id": 1, "image": "other.jpg", "text": "q", "category": "random"}) + "\n")
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl:1: image 'other.jpg' .*coco_pope_random.json:1"):
        pope.TASK.load(str(tmp_path))
    llava.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "q", "category": "odd"}) + "\n")
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl:1: category 'odd' has no annotation file"):
        pope.TASK.load(str(tmp_path))
    shutil.copy(f"{FIXTURES}/pope/llava_pope_test.jsonl", tmp_path)
    (tmp_path / "coco" / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 1, "image": "x.jpg", "text": "q", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random.json:1: label must be 'yes' or 'no'"):
        pope.TASK.load(str(tmp_path))
