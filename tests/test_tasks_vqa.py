"""VQAv2 and TextVQA tasks: the answer normalisation and soft accuracy against lmms-eval 0.7.3 and a transliteration of
the official vqaEval.py on hundreds of hard cases; the tiny fixtures in the release layouts read and scored end to end;
errors that name the file and record."""
import copy
import json
import os
import random
import re
import shutil

import pytest

from llava_jax.tasks import textvqa, vqa_accuracy, vqav2
from llava_jax.tasks.base import read_predictions
from tests.lmms_reference import lmms_module

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tasks")
SUFFIX = "\nAnswer the question using a single word or phrase."

_BASES = [
    "yes", "no", "Yes", "NO", "two", "Two", "2", "ten", "none", "zero", "one", "nine", "eleven", "a dog", "the dog",
    "an apple", "A", "the", "an", "the the", "dogs", "dont", "don't", "cant", "isnt", "whats", "yall'll", "y'allll",
    "somebody'd", "Im", "im", "Ive", "oclock", "o'clock", "wouldn'tve", "let's", "1,000", "1000", "1,000,000", "1,,2",
    "3.5", "3.50", ".5", "5.", "yes.", "Yes.", "yes!", "yes?", "Yes, there is", "no, it is not", "red and white",
    "red/white", "red-white", "red - white", "(red)", "[red]", '"red"', "red;", "e.g. red", "U.S.A.", "mr. smith",
    "it's", "man's hat", "men's", "10:30", "$5", "5%", "@home", "", " ", "  yes  ", "yes\n", "\tyes", "yes\tno",
    "two dogs", "Two Dogs.", "1 ", "on the left", "left", "Left.", "hot dog", "hot-dog", "hotdog", "<3", "x>y", "a+b",
    "snake_case", "back\\slash", "`tick`", "{curly}", "a=b", "i dont know", "I don't know.", "There are two.", "...",
    "." * 40, "a.b.c", "1.5.2", "ZERO", "nine.", "Ten!", "what?!", "wait, what", "1, 2", "1,2 dogs", "Café", "  ",
]
HARD_ANSWERS = sorted({variant for base in _BASES
                       for variant in (base, base.upper(), base + ".", " " + base + " ", base + "!", "The " + base)})


# ---- test-only transliteration of the official GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py ----
_OFFICIAL_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!"]
_OFFICIAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_COMMA = re.compile(r"(\d)(\,)(\d)")


def _official_punctuation(in_text):
    out_text = in_text
    for p in _OFFICIAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_OFFICIAL_COMMA, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _OFFICIAL_PERIOD.sub("", out_text, re.UNICODE)   # sic: re.UNICODE lands in `count`


def _official_digit_article(in_text):
    processor = lmms_module("_task_utils/vqa_eval_metric.py").EvalAIAnswerProcessor   # same maps as vqaEval.py
    out = []
    for word in in_text.lower().split():
        word = processor.NUMBER_MAP.get(word, word)
        if word not in ("a", "an", "the"):
            out.append(word)
    return " ".join(processor.CONTRACTIONS.get(word, word) for word in out)


def _official_vqa_accuracy(res_ans, gt_answers):
    answers = [{"answer": a, "answer_id": i} for i, a in enumerate(gt_answers)]
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    res_ans = _official_digit_article(_official_punctuation(res_ans))
    if len(set(gt_answers)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = _official_punctuation(ans_dic["answer"])
    gt_acc = []
    for gt_ans_datum in answers:
        other = [item for item in answers if item != gt_ans_datum]
        matching = [item for item in other if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)
# ----------------------------------------------------------------------------------------------------------------------


def _processor():
    return lmms_module("_task_utils/vqa_eval_metric.py").EvalAIAnswerProcessor()


def _answer_sets(seed, count):
    """(prediction, 10 human answers) pairs: 0..10 humans give a string that may normalise like the prediction."""
    rng = random.Random(seed)
    cases = []
    for k in range(count):
        prediction = rng.choice(HARD_ANSWERS)
        matches = k % 11
        same = [rng.choice([prediction, prediction.strip(), prediction.lower(), rng.choice(HARD_ANSWERS)])
                for _ in range(matches)]
        cases.append((prediction, same + [rng.choice(HARD_ANSWERS) for _ in range(10 - matches)]))
    return cases


def test_hard_cases_cover_hundreds_of_answers():
    assert len(HARD_ANSWERS) > 500


def test_normalize_answer_equals_evalai_processor_of_lmms_eval():
    processor = _processor()
    for text in HARD_ANSWERS:
        assert vqa_accuracy.normalize_answer(text) == processor(text), repr(text)


def test_punctuation_and_digit_article_steps_equal_lmms_eval():
    processor = _processor()
    for text in HARD_ANSWERS:
        evalai = vqa_accuracy.process_punctuation(text, vqa_accuracy.EVALAI_DIGIT_COMMA_DIGIT)
        assert evalai == processor.process_punctuation(text), repr(text)
        assert vqa_accuracy.process_digit_article(text) == processor.process_digit_article(text), repr(text)


def test_every_contraction_and_number_word_maps_like_lmms_eval():
    processor = _processor()
    words = list(processor.CONTRACTIONS) + list(processor.CONTRACTIONS.values()) + list(processor.NUMBER_MAP)
    for word in words + [word.upper() for word in words]:
        assert vqa_accuracy.process_digit_article(word) == processor.process_digit_article(word), word
        assert vqa_accuracy.normalize_answer(word) == processor(word), word


def test_punctuation_step_equals_official_vqaeval():
    for text in HARD_ANSWERS:
        assert vqa_accuracy.process_punctuation(text) == _official_punctuation(text), repr(text)


def test_normalisation_special_cases():
    assert vqa_accuracy.process_punctuation("1,000") == "1000"
    assert vqa_accuracy.process_punctuation("3.5") == "3.5"
    assert vqa_accuracy.process_punctuation("." * 40) == "." * 8    # the official count=re.UNICODE (32) quirk
    assert vqa_accuracy.normalize_answer("Two Dogs.") == "2 dogs"
    assert vqa_accuracy.normalize_answer("The dont") == "don't"
    assert vqa_accuracy.normalize_answer("Yes, there is") == "yes there is"


def test_vqav2_accuracy_equals_official_vqaeval_on_hard_cases():
    for prediction, answers in _answer_sets(seed=0, count=800):
        assert vqa_accuracy.vqav2_accuracy(prediction, answers) == pytest.approx(
            _official_vqa_accuracy(prediction, answers), abs=1e-12), (prediction, answers)


def test_vqav2_accuracy_equals_lmms_eval_on_annotation_style_answers():
    """Real VQAv2 annotations are already normalised; there lmms-eval (which normalises them again) agrees, except on
    "1,,2"-like predictions, where lmms-eval uses EvalAI's comma pattern instead of vqaEval.py's."""
    process = lmms_module("vqav2/utils.py").vqav2_process_results
    canonical = lambda text: vqa_accuracy.process_digit_article(vqa_accuracy.process_punctuation(text.strip()))
    compared = 0
    for prediction, answers in _answer_sets(seed=1, count=800):
        answers = [canonical(answer) for answer in answers]
        if any(canonical(answer) != answer for answer in answers) or re.search(r"\d,,+\d", prediction):
            continue
        doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]}
        expected = process(copy.deepcopy(doc), [prediction])["exact_match"]
        assert vqa_accuracy.vqav2_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)
        compared += 1
    assert compared > 300


def test_vqav2_accuracy_follows_the_official_identical_answers_rule():
    # all ten humans agree: the official script leaves their answers unprocessed ("yes." never equals "yes")
    assert vqa_accuracy.vqav2_accuracy("yes", ["yes."] * 10) == 0.0
    assert vqa_accuracy.vqav2_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_counts_matching_humans_over_leave_one_out_subsets(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy.vqav2_accuracy("Cat", answers) == pytest.approx(expected)


def test_textvqa_accuracy_equals_lmms_eval_on_hard_cases():
    process = lmms_module("textvqa/utils.py").textvqa_process_results
    for prediction, answers in _answer_sets(seed=2, count=800):
        expected = process({"question_id": 1, "answers": list(answers)}, [prediction])["exact_match"]
        assert vqa_accuracy.textvqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


# ---- VQAv2 task ----

def _write_predictions(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def test_vqav2_reads_the_official_val_layout():
    items = vqav2.TASK.load(f"{FIXTURES}/vqav2")
    assert [item.question_id for item in items] == ["420", "421", "730"]
    assert items[0].prompt == "<image>\nIs the man skiing?" + SUFFIX
    assert items[2].images == [f"{FIXTURES}/vqav2/val2014/COCO_val2014_000000000073.jpg"]
    assert items[1].meta == {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"}


def test_vqav2_scores_a_predictions_file_like_the_official_overall(tmp_path):
    items = vqav2.TASK.load(f"{FIXTURES}/vqav2")
    path = _write_predictions(tmp_path / "p.jsonl", [{"question_id": 420, "answer": "Yes"},
                                                     {"question_id": 421, "answer": "two"},
                                                     {"question_id": 730, "answer": "Red."}])
    # yes: 10 humans -> 1; "2": 2 humans -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "red": 3 humans -> (3 * 2/3 + 7) / 10
    assert vqav2.TASK.score(items, read_predictions(path)) == {
        "task": "vqav2", "n": 3, "missing": 0, "accuracy": 83.33,
        "per_answer_type": {"number": 60.0, "other": 90.0, "yes/no": 100.0}}


def test_vqav2_counts_missing_predictions_as_wrong(tmp_path):
    items = vqav2.TASK.load(f"{FIXTURES}/vqav2")
    path = _write_predictions(tmp_path / "p.jsonl", [{"question_id": 420, "text": "yes"},
                                                     {"question_id": 421, "text": "2"}])
    summary = vqav2.TASK.score(items, read_predictions(path))
    assert (summary["missing"], summary["accuracy"], summary["per_answer_type"]["other"]) == (1, 53.33, 0.0)


def test_vqav2_reads_llava_test_dev_questions_and_writes_a_submission():
    items = vqav2.TASK.load(f"{FIXTURES}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl")
    assert items[0].prompt == "<image>\nIs it raining?" + SUFFIX
    assert items[0].images == [f"{FIXTURES}/vqav2/test2015/COCO_test2015_000000000001.jpg"]
    with pytest.raises(ValueError, match="EvalAI"):
        vqav2.TASK.score(items, {"1000": "no"})
    assert vqav2.submission(items, {"1000": "No, it isnt."}) == [{"question_id": 1000, "answer": "no it isn't"},
                                                                 {"question_id": 1001, "answer": ""}]


def test_vqav2_official_test_dev_questions_use_test2015_images(tmp_path):
    questions = {"data_subtype": "test-dev2015", "questions": [{"question_id": 5, "image_id": 7, "question": "Why?"}]}
    (tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(questions))
    (item,) = vqav2.TASK.load(str(tmp_path))
    assert (item.question_id, item.meta) == ("5", {})
    assert item.images == [f"{tmp_path}/test2015/COCO_test2015_000000000007.jpg"]


def test_vqav2_prompt_suffix_replaces_llavas_and_empty_drops_it():
    path = f"{FIXTURES}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"
    assert vqav2.TASK.load(path, prompt_suffix="Short answer.")[0].prompt == "<image>\nIs it raining?\nShort answer."
    assert vqav2.TASK.load(path, prompt_suffix="", limit=1)[0].prompt == "<image>\nIs it raining?"


def test_vqav2_missing_question_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        vqav2.TASK.load(str(tmp_path))


def test_vqav2_malformed_records_are_named(tmp_path):
    (tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text('{"question_id": 1, "image": "x.jpg"}\n')
    with pytest.raises(ValueError, match=r"test-dev2015.jsonl:1: record lacks \['text'\]"):
        vqav2.TASK.load(str(tmp_path))
    (tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text('\n{"question_id": 1,\n')
    with pytest.raises(ValueError, match=r"test-dev2015.jsonl:2: not a JSON record"):
        vqav2.TASK.load(str(tmp_path))
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"data_subtype": "val2014", "questions": [{"question_id": 1, "question": "q"}]}))
    with pytest.raises(ValueError, match=r"val2014_questions.json: questions\[0\]: record lacks \['image_id'\]"):
        vqav2.TASK.load(str(tmp_path))


# ---- TextVQA task ----

def test_textvqa_reads_llava_ocr_prompts_joined_to_the_official_answers():
    items = textvqa.TASK.load(f"{FIXTURES}/textvqa")
    assert [item.question_id for item in items] == ["34602", "34603", "34604"]
    assert items[0].prompt == ("<image>\nWhat is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, 1.3"
                               + SUFFIX)   # LLaVA's capitalised question, matched to the official one lower-cased
    assert items[2].prompt == "<image>\nWhat year is on the coin?" + SUFFIX
    assert items[1].images == [f"{FIXTURES}/textvqa/train_images/0054c91397f2fe05.jpg"]
    assert items[1].meta["answers"] == ["2", "two"] + ["3"] * 8


def test_textvqa_reads_the_official_file_alone(tmp_path):
    shutil.copy(f"{FIXTURES}/textvqa/TextVQA_0.5.1_val.json", tmp_path)
    items = textvqa.TASK.load(str(tmp_path), prompt_suffix="")
    assert items[0].prompt == "<image>\nwhat is the brand of this camera?"


def test_textvqa_scores_a_predictions_file(tmp_path):
    items = textvqa.TASK.load(f"{FIXTURES}/textvqa")
    path = _write_predictions(tmp_path / "p.jsonl", [{"question_id": 34602, "text": "Dakota."},
                                                     {"question_id": 34603, "text": "2"},
                                                     {"question_id": 34604, "text": "1,990"}])
    # 1 + (2 * 1/3 + 8 * 2/3) / 10 + 1 over 3 questions
    assert textvqa.TASK.score(items, read_predictions(path)) == {"task": "textvqa", "n": 3, "missing": 0,
                                                                 "accuracy": 86.67}
    assert textvqa.TASK.score(items, {"34602": "dakota"})["accuracy"] == 33.33


def test_textvqa_missing_annotation_file_is_named(tmp_path):
    shutil.copy(f"{FIXTURES}/textvqa/llava_textvqa_val_v051_ocr.jsonl", tmp_path)
    with pytest.raises(FileNotFoundError, match="TextVQA_0.5.1_val.json"):
        textvqa.TASK.load(str(tmp_path))


def test_textvqa_unmatched_llava_line_is_named(tmp_path):
    shutil.copy(f"{FIXTURES}/textvqa/TextVQA_0.5.1_val.json", tmp_path)
    (tmp_path / "llava_textvqa_val_v051_ocr.jsonl").write_text(
        json.dumps({"question_id": "003a8ae2ef43b901", "text": "who made it?" + SUFFIX}) + "\n")
    with pytest.raises(ValueError, match=r"ocr.jsonl:1: no question 'who made it\?'"):
        textvqa.TASK.load(str(tmp_path))
