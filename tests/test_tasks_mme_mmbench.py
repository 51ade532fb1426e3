"""The MME and MMBench tasks against lmms-eval 0.7.3's implementations of their official scorers (MME's
parse_pred_ans and per-category aggregation; MMBench_Evaluator.can_infer with circular evaluation), on hundreds of
hand-made answers; their readers on tiny files in the real formats (MME's release folders, MMBench's base64 TSV)."""
import base64
import csv
import io
import itertools
import random
import shutil

import pytest
from PIL import Image

from llava_jax.tasks.base import TaskItem, read_predictions
from llava_jax.tasks.mmbench import TASK as MMBENCH, read_llava_answers
from llava_jax.tasks.mme import COGNITION, PERCEPTION, TASK as MME, parse_yes_no
from tests.lmms_reference import lmms_module

MME_ROOT = "tests/fixtures/tasks/mme/MME_Benchmark_release_version"
SINGLE_WORD = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."

YES_NO_ANSWERS = ["yes", "no", "Yes", "No", "YES", "NO", "Yes.", "No.", " yes", "  yes", "yes ", "y", "n", "Y",
                  "N", "y.", "ye", "nope", "Not", "not really", "None", "Nothing", "noo", "yess", "Yes, there is",
                  "No, there is not", "There is a cow.", "I think yes", "I think no", "Definitely", "", ".", "..yes",
                  "y.e.s", "n.o", "No!", "Yes!", "yes\n", "\nno", "The answer is yes", "Answer: No", "uncertain",
                  "know", "snow", "a yes", "a no", "1", "0", "true", "false", "Y E S", "ye s", "no.\nYes", "YES!!",
                  "nO", "yEs.", "  No  ", "-yes", "(yes)", "'no'"]


@pytest.fixture(scope="module")
def mme_ref():
    return lmms_module("mme/utils.py")


def test_mme_yes_no_parse_equals_lmms_eval(mme_ref):
    for answer in YES_NO_ANSWERS:
        assert parse_yes_no(answer) == mme_ref.parse_pred_ans(answer), answer


def _official_calculation_label(answer):
    """Test-only transliteration of MME's eval_tool/calculation.py on a line LLaVA's convert_answer_to_mme.py
    writes: the answer is the last tab field, read with its line end, lower-cased, then parse_pred_ans."""
    answer = (answer + "\n").lower()
    if answer in ("yes", "no"):
        return answer
    return "yes" if "yes" in answer[:4] else "no" if "no" in answer[:4] else "other"


def test_mme_yes_no_parse_differs_from_calculation_py_only_on_lone_letters_and_periods():
    for answer in YES_NO_ANSWERS:
        llava_answer = answer.strip()   # LLaVA's model_vqa_loader.py strips its outputs
        if llava_answer.lower().replace(".", "") in ("y", "n") or "." in llava_answer[:5]:
            continue
        assert parse_yes_no(llava_answer) == _official_calculation_label(llava_answer), answer


def _mme_items(rng, images_per_subtask=6):
    items = []
    for subtask in PERCEPTION + COGNITION:
        for image in range(images_per_subtask):
            image_id = f"{subtask}/{image}.png"
            for k in range(2):
                items.append(TaskItem(f"{image_id}#{k}", "", [], {"subtask": subtask, "image_id": image_id,
                                                                  "answer": rng.choice(["yes", "no"])}))
    return items


def test_mme_scores_equal_lmms_eval_aggregation(mme_ref):
    rng = random.Random(0)
    items = _mme_items(rng)
    for trial in range(20):
        predictions = {item.question_id: rng.choice(YES_NO_ANSWERS) for item in items if rng.random() > 0.05}
        summary = MME.score(items, predictions)
        results = {"Perception": [], "Cognition": []}
        for item in items:
            doc = {"question_id": item.meta["image_id"], "category": item.meta["subtask"],
                   "answer": item.meta["answer"].capitalize()}
            result = mme_ref.mme_process_results(doc, [predictions.get(item.question_id, "")])
            results["Perception" if item.meta["subtask"] in PERCEPTION else "Cognition"].append(
                next(iter(result.values())))
        assert summary["perception"] == pytest.approx(mme_ref.mme_aggregate_results(results["Perception"]))
        assert summary["cognition"] == pytest.approx(mme_ref.mme_aggregate_results(results["Cognition"]))
        for subtask in PERCEPTION + COGNITION:
            only = [r for r in results["Perception"] + results["Cognition"] if r["category"] == subtask]
            assert summary["subtasks"][subtask]["score"] == pytest.approx(mme_ref.mme_aggregate_results(only))


def test_mme_reads_both_release_layouts_with_llava_prompts():
    items = MME.load(MME_ROOT)
    assert [item.question_id for item in items] == [
        "existence/000000006040.jpg#0", "existence/000000006040.jpg#1", "existence/000000018150.jpg#0",
        "existence/000000018150.jpg#1", "artwork/images/10256.jpg#0", "artwork/images/10256.jpg#1",
        "artwork/images/14777.jpg#0", "artwork/images/14777.jpg#1", "code_reasoning/0001.png#0",
        "code_reasoning/0001.png#1"]
    assert items[4].prompt == f"<image>\nDoes this artwork exist in the form of painting?\n{SINGLE_WORD}"
    assert items[3].prompt == f"<image>\nIs there a cow in this image?\n{SINGLE_WORD}"   # two spaces before
    assert items[4].images == [f"{MME_ROOT}/artwork/images/10256.jpg"]
    assert items[0].images == [f"{MME_ROOT}/existence/000000006040.jpg"]
    assert MME.load(MME_ROOT, prompt_suffix="")[0].prompt == (
        "<image>\nIs there a train in this image? Please answer yes or no.")
    assert len(MME.load(MME_ROOT, limit=3)) == 3


def test_mme_scores_a_llava_answer_file():
    summary = MME.score(MME.load(MME_ROOT), read_predictions("tests/fixtures/tasks/mme/predictions.jsonl"))
    # existence: 3 of 4 right ("There is a cow." is neither), 1 of 2 images -> 75 + 50; artwork: 10256 both
    # right ("Y", "no"), 14777 both wrong -> 50 + 50; code_reasoning: "Yes" right, second missing -> 50 + 0
    assert summary == {"task": "mme", "n": 10, "missing": 1, "perception": 225.0, "cognition": 50.0, "subtasks": {
        "existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
        "artwork": {"acc": 50.0, "acc_plus": 50.0, "score": 100.0},
        "code_reasoning": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}}}


def test_mme_bad_files_name_the_file_and_line(tmp_path):
    root = tmp_path / "MME"
    shutil.copytree(MME_ROOT, root)
    txt = root / "existence/000000006040.txt"
    txt.write_text("Is there a train?\tMaybe\nIs there a bed?\tNo\n")
    with pytest.raises(ValueError, match=r"000000006040.txt:1: expected 'question<TAB>Yes\|No'"):
        MME.load(str(root))
    txt.write_text("Is there a train?\tYes\nIs there a bed?\tNo\nIs there a cat?\tNo\n")
    with pytest.raises(ValueError, match=r"000000006040.txt: MME pairs two questions per image; this file has 3"):
        MME.load(str(root))
    txt.write_text("Is there a train?\tYes\nIs there a bed?\tNo\n")
    (root / "artwork/images/14777.jpg").unlink()
    with pytest.raises(ValueError, match=r"14777.txt: no image 14777.png / .jpg"):
        MME.load(str(root))
    with pytest.raises(ValueError, match="none of the MME subtask folders"):
        MME.load(str(tmp_path))


# --- MMBench ---

@pytest.fixture(scope="module")
def mmbench_ref():
    return lmms_module("mmbench/mmbench_evals.py").MMBench_Evaluator()


MMBENCH_CHOICES = [{"A": "cat", "B": "dog"}, {"A": "1", "B": "2", "C": "3"},
                   {"A": "The sky is blue", "B": "The grass is green", "C": "blue", "D": "A"},
                   {"A": "red", "B": "redder", "C": "green", "D": "yellow"}]
MMBENCH_TEMPLATES = ["{L}", "{l}", "{L}.", "({L})", "({L}).", "{L})", "{L}).", "{L},", "{L}:", ":{L}", ":{L}.",
                     "The answer is {L}", "The answer is {L}.", "The answer is ({L}).", "Answer: {L}",
                     "A. {T}", "{L}. {T}", "{T}", "The answer is {T}.", "It is {T}", "{L} {M}", "{L} or {M}",
                     "({L}) and ({M})", "{T} and {U}", "A cat is {T}", "A dog, so {L}.", "I choose {L} because",
                     "E", "E.", "(E)", "", "none of them", "{L}\n", "\n{L}.", "Option {L}", "**{L}**", "{L}{M}",
                     "Failed to obtain answer via API {L}", "A {L}", "{L} is a letter", "BLUE", "{T}!"]


def _mmbench_answers():
    for choice_map in MMBENCH_CHOICES:
        letters = list(choice_map)
        for template, letter in itertools.product(MMBENCH_TEMPLATES, letters):
            other = letters[(letters.index(letter) + 1) % len(letters)]
            yield choice_map, template.format(L=letter, l=letter.lower(), M=other, T=choice_map[letter],
                                              U=choice_map[other])


def test_mmbench_can_infer_equals_official(mmbench_ref):
    from llava_jax.tasks.choices import mmbench_can_infer
    cases = list(_mmbench_answers())
    assert len(cases) > 400
    unread = 0
    for choice_map, answer in cases:
        official = mmbench_ref.can_infer(answer, dict(choice_map)) or None
        assert mmbench_can_infer(answer, dict(choice_map)) == official, answer
        unread += official is None
    assert 0 < unread < len(cases)


def _png_base64(color):
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]


def _write_tsv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_HEADER)
        writer.writerows(rows)
    return str(path)


MMBENCH_ROWS = [
    [0, "What animal is this?", "nan", "cat", "dog", "bird", "fish", "B", "object_localization",
     _png_base64("red"), "src", "finegrained_perception (instance-level)", "nan", "dev"],
    [1, "Which one is larger?", "Look at the two shapes.", "the square", "the circle", "", "", "A",
     "attribute_comparison", _png_base64("blue"), "src", "finegrained_perception (instance-level)", "", "dev"],
    [2, "How many?", "", "1", "2", "3", "nan", "C", "image_scene", "0", "src", "coarse_perception", "", "dev"],
]


def test_mmbench_reads_the_tsv_one_item_per_rotation(tmp_path):
    items = MMBENCH.load(_write_tsv(tmp_path / "mmbench_dev_20230712.tsv", MMBENCH_ROWS))
    assert [item.question_id for item in items] == ["0", "0@1", "0@2", "0@3", "1", "1@1", "2", "2@1", "2@2"]
    assert items[0].prompt == f"<image>\nWhat animal is this?\nA. cat\nB. dog\nC. bird\nD. fish\n{LETTER}"
    assert items[1].prompt == f"<image>\nWhat animal is this?\nA. dog\nB. bird\nC. fish\nD. cat\n{LETTER}"
    assert [item.meta["answer"] for item in items] == ["B", "A", "D", "C", "A", "B", "C", "B", "A"]
    assert items[5].prompt == (f"<image>\nLook at the two shapes.\nWhich one is larger?\nA. the circle\n"
                               f"B. the square\n{LETTER}")
    assert items[0].images == [base64.b64decode(_png_base64("red"))]
    assert items[6].images == items[0].images   # image "0": the index of the row holding it
    assert MMBENCH.load(str(tmp_path / "mmbench_dev_20230712.tsv"), prompt_suffix="")[6].prompt.endswith("C. 3")


def test_mmbench_scores_circular_and_single_accuracy(tmp_path):
    items = MMBENCH.load(_write_tsv(tmp_path / "dev.tsv", MMBENCH_ROWS))
    path = tmp_path / "answers.jsonl"
    # 0: right in all rotations; 1: right only in rotation 0; 2: rotation 2 missing
    path.write_text("\n".join([
        '{"question_id": "0", "text": "B"}', '{"question_id": "0@1", "text": "The answer is A."}',
        '{"question_id": "0@2", "text": "D. cat"}', '{"question_id": "0@3", "answer": "(C)"}',
        '{"question_id": "1", "text": "the square"}', '{"question_id": "1@1", "text": "I am not sure"}',
        '{"question_id": "2", "text": "C"}', '{"question_id": "2@1", "text": "B"}']))
    summary = MMBENCH.score(items, read_predictions(str(path)))
    assert summary == {
        "task": "mmbench", "n": 3, "n_items": 9, "missing": 1, "unparsed": 1,
        "accuracy": pytest.approx(100 / 3), "accuracy_single": 100.0,
        "categories": {"attribute_comparison": 0.0, "image_scene": 0.0, "object_localization": 100.0},
        "l2_categories": {"coarse_perception": 0.0, "finegrained_perception (instance-level)": 50.0}}


def test_mmbench_reads_llava_all_rounds_answer_files(tmp_path):
    path = tmp_path / "llava-v1.5-7b.jsonl"
    path.write_text('{"question_id": 7, "round_id": 0, "prompt": "q", "text": "B", "options": ["x", "y"]}\n'
                    '{"question_id": 7, "round_id": 1, "prompt": "q", "text": "A", "options": ["y", "x"]}\n')
    assert read_llava_answers(str(path)) == {"7": "B", "7@1": "A"}
    path.write_text('{"question_id": 7, "round_id": 0}\n')
    with pytest.raises(ValueError, match=r"llava-v1.5-7b.jsonl:1: not a LLaVA answer record"):
        read_llava_answers(str(path))


def test_mmbench_circular_accuracy_equals_reference(tmp_path, mmbench_ref):
    rng = random.Random(0)
    rows = []
    for index in range(60):
        options = rng.choice(MMBENCH_CHOICES)
        texts = list(options.values()) + ["nan"] * (4 - len(options))
        rows.append([index, f"Question {index}?", "nan", *texts, rng.choice(list(options)), f"cat{index % 4}",
                     _png_base64("red"), "src", f"l2_{index % 2}", "", "dev"])
    items = MMBENCH.load(_write_tsv(tmp_path / "dev.tsv", rows))
    answers = [answer for _, answer in _mmbench_answers()] + ["A", "B", "C", "D"] * 40
    predictions = {item.question_id: rng.choice(answers) for item in items}
    by_question = {}
    for item in items:   # reference: the official eval_sub_data without its ChatGPT step
        read = mmbench_ref.can_infer(predictions[item.question_id], dict(item.meta["choices"]))
        by_question.setdefault(item.meta["index"], []).append(read == item.meta["answer"])
    summary = MMBENCH.score(items, predictions)
    assert summary["accuracy"] == pytest.approx(100 * sum(map(all, by_question.values())) / len(by_question))
    assert summary["accuracy_single"] == pytest.approx(100 * sum(r[0] for r in by_question.values()) / 60)
    assert 0 < summary["accuracy"] < summary["accuracy_single"]


def test_mmbench_bad_rows_name_the_file_and_line(tmp_path):
    rows = [list(row) for row in MMBENCH_ROWS]
    rows[1][9] = ""
    with pytest.raises(ValueError, match=r"bad.tsv:3: `image` is empty"):
        MMBENCH.load(_write_tsv(tmp_path / "bad.tsv", rows))
    rows[1][9] = "not base64!"
    with pytest.raises(ValueError, match=r"bad.tsv:3: `image` is not base64"):
        MMBENCH.load(_write_tsv(tmp_path / "bad.tsv", rows))
    rows = [list(row) for row in MMBENCH_ROWS]
    rows[2][7] = "D"   # only three options
    with pytest.raises(ValueError, match=r"bad.tsv:4: needs an index, options A and B .* answer 'D'"):
        MMBENCH.load(_write_tsv(tmp_path / "bad.tsv", rows))
    with open(tmp_path / "short.tsv", "w") as f:
        f.write("index\tquestion\tA\n0\tq\ta\n")
    with pytest.raises(ValueError, match=r"short.tsv: missing MMBench columns \['B', 'image', 'category'\]"):
        MMBENCH.load(str(tmp_path / "short.tsv"))
