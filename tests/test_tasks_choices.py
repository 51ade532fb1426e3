"""Answer extraction (tasks/choices.py) and the ScienceQA-IMG and MMMU tasks, against independent references:
a transliteration of LLaVA's eval_science_qa.py (below) and lmms-eval 0.7.3's MMMU utils (the official MMMU
eval_utils.py), on hundreds of hand-made answers; the tasks' readers on tiny files in the real formats."""
import io
import itertools
import json
import random
import re
import shutil
import types

import pytest
from PIL import Image

from llava_jax.tasks import choices
from llava_jax.tasks.base import read_predictions
from llava_jax.tasks.mmmu import TASK as MMMU
from llava_jax.tasks.scienceqa import TASK as SCIENCEQA
from tests.lmms_reference import lmms_module

FIXTURES = "tests/fixtures/tasks"
SQA_SUFFIX = "Answer with the option's letter from the given choices directly."


def _official_sqa_pred_idx(text, num_choices):
    """Test-only transliteration of LLaVA's llava/eval/eval_science_qa.py (__main__ loop + get_pred_idx)."""
    options = ["A", "B", "C", "D", "E"]
    pred_text = text.replace("\n", ". ")
    if pred_text.strip() in options:
        answer = pred_text.strip()
    elif len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
        answer = pred_text[0]
    elif "The answer is " in pred_text:
        match = re.compile(r"The answer is ([A-E])\.").search(pred_text)
        if match:
            answer = match.group(1)
        else:
            match = re.compile(r"The answer is ([A-E])").search(pred_text)
            answer = match.group(1) if match else "FAILED"
    else:
        answer = "FAILED"
    prediction = answer.replace("\n", ". ")
    if prediction in options[:num_choices]:
        return options.index(prediction)
    for pattern in (r"^([A-E])\. ", r"The answer is ([A-E])\.", r"The answer is ([A-E])"):
        match = re.compile(pattern).search(prediction)
        if match and match.group(1) in options[:num_choices]:
            return options.index(match.group(1))
    return -1


LETTER_TEMPLATES = ["{L}", "{l}", " {L} ", "({L})", "{L}.", "{L}. ", "{L}. {T}", "{L}.{T}", "{L}) {T}", "{L}:",
                    "The answer is {L}.", "The answer is {L}", "The answer is ({L}).", "the answer is {L}",
                    "Answer: {L}", "{L}\n", "\n{L}", "{L}.\nBecause {T}.", "I think {L}", "{L} and {M}",
                    "({L}) or ({M})", "{L}. {T} The answer is {M}.", "{T}", "The answer is {T}.",
                    "It is {T}, so the answer is {L}", "{L},", "**{L}**", "Option {L}", "{L} {M}", "{l}.",
                    "The correct option is {L} because {T} is right and {M} is not right here",
                    "I would say that {T} is the best choice here"]
OPTION_SETS = [["cat", "dog"], ["0:4", "4:0", "2:2"], ["Maryland", "New Hampshire", "Rhode Island", "Vermont"],
               ["red", "green", "blue", "yellow", "A pink one"]]


def _letter_answers():
    for options in OPTION_SETS:
        letters = choices.option_letters(len(options))
        for template, (k, letter) in itertools.product(LETTER_TEMPLATES, enumerate(letters + ["E", "F"])):
            other = letters[(k + 1) % len(letters)]
            text = options[k % len(options)]
            yield options, template.format(L=letter, l=letter.lower(), M=other, T=text)
    for text in ["", "FAILED", "None", "N/A", "E", "The answer is E.", "A.B", "A.  x", "(A", "a. cat"]:
        yield OPTION_SETS[1], text


def test_scienceqa_letters_equal_llava_eval_science_qa():
    cases = list(_letter_answers())
    assert len(cases) > 500
    for options, text in cases:
        assert choices.scienceqa_choice_index(text, len(options)) == _official_sqa_pred_idx(text, len(options)), text


@pytest.fixture(scope="module")
def mmmu_ref():
    return lmms_module("mmmu/utils.py")


@pytest.fixture
def seeded_official_random(monkeypatch):
    """Makes the official parser's random.choice the seeded pick ours documents; `seed[0]` is the question id."""
    import sys
    seed = [""]
    mcq = sys.modules["lmms_eval.tasks._task_utils.mmmu_mcq_utils"]
    monkeypatch.setattr(mcq, "random", types.SimpleNamespace(choice=lambda seq: random.Random(seed[0]).choice(seq)))
    return seed


def test_mmmu_multi_choice_parse_equals_official(mmmu_ref, seeded_official_random):
    cases = list(_letter_answers()) + [
        (OPTION_SETS[2], "The colony shown on the map is clearly New Hampshire, not Vermont."),
        (OPTION_SETS[2], "Looking at the map, the colony is rhode island for sure."),
        (OPTION_SETS[2], "New Hampshire"),
        (OPTION_SETS[0], "Neither a cat nor a dog appears anywhere in it"),
        (OPTION_SETS[3], "The colour in the picture is a mix of blue and green, mostly green"),
        (["<image 1>", "<image 2>"], "The correct figure is shown in <image 2> of the set"),
    ]
    guesses = 0
    for k, (options, text) in enumerate(cases):
        seeded_official_random[0] = question_id = f"validation_Art_{k}"
        index2ans, all_choices = mmmu_ref.get_multi_choice_info(options)
        letter, guessed = choices.mmmu_parse_multi_choice(text, options, seed=question_id)
        assert letter == mmmu_ref.parse_multi_choice_response(text, all_choices, index2ans), text
        guesses += guessed
    assert 0 < guesses < len(cases)


def test_mmmu_multi_choice_fallback_is_deterministic_per_question():
    picks = {choices.mmmu_parse_multi_choice("no idea", OPTION_SETS[3], seed="validation_Math_7") for _ in range(5)}
    assert len(picks) == 1 and next(iter(picks))[1] is True


OPEN_GOLDS = ["3", "3.0", "1,000", "1000", "0.5", "-2", "1e3", "Paris", "a", "24/7", "x^2", "2.345", "12 cm",
              ["24/7", "3.429"], ["0.5", "1/2"]]
OPEN_RESPONSES = ["3", "3.0", "3.00", "The answer is 3.", "x = 3", "so it is 3.001", "1,000", "1000", "1000.0",
                  "so the result is 1000.", "1e3", "the value is 1.0e3", "0.5", ".5", "1/2", "-2", "It is -2.0",
                  "Paris", "It is paris.", "The capital is Paris. It is big", "A", "a", "the answer is a",
                  "it is a cat", "24/7", "3.429", "The result is 3.43", "x^2", "2.345", "2.35", "12 cm",
                  "The length is 12 cm.", "12", "Thus 12,000 people", "", "I don't know", "Therefore, 7.\n8",
                  "answer : 5", "could be 4 or 5", "The final answer is 2.34!", "is"]


def test_mmmu_open_parse_and_eval_equal_official(mmmu_ref):
    cases = list(itertools.product(OPEN_GOLDS, OPEN_RESPONSES))
    assert len(cases) > 500
    rights = 0
    for gold, response in cases:
        ours = choices.mmmu_parse_open(response)
        official = mmmu_ref.parse_open_response(response)
        assert set(ours) == set(official) and len(ours) == len(official), response
        right = choices.mmmu_eval_open(gold, ours)
        assert right == mmmu_ref.eval_open(gold, official), (gold, response)
        rights += right
    assert 0 < rights < len(cases)


def test_mmmu_eval_multi_choice_equals_official(mmmu_ref):
    for gold, letter in itertools.product(["A", "B", ["A", "C"]], "ABCD"):
        assert choices.mmmu_eval_multi_choice(gold, letter) == mmmu_ref.eval_multi_choice(gold, letter)


# --- ScienceQA task ---

def _sqa_copy(tmp_path):
    root = tmp_path / "scienceqa"
    shutil.copytree(f"{FIXTURES}/scienceqa", root)
    return root


def test_scienceqa_reads_the_img_test_problems_with_llava_prompts():
    items = SCIENCEQA.load(f"{FIXTURES}/scienceqa")
    assert [item.question_id for item in items] == ["5", "11", "42"]   # 15 has no image, 20 is train
    assert items[1].prompt == ("<image>\nWhat is the name of the colony shown?\nA. Maryland\nB. New Hampshire\n"
                               f"C. Rhode Island\nD. Vermont\n{SQA_SUFFIX}")
    assert items[0].prompt.startswith("<image>\nContext: People can use the engineering-design process.\nGordon")
    assert items[0].images == [f"{FIXTURES}/scienceqa/images/test/5/image.png"]
    assert SCIENCEQA.load(f"{FIXTURES}/scienceqa", prompt_suffix="")[1].prompt.endswith("D. Vermont")


def test_scienceqa_llava_question_file_gives_the_same_items(tmp_path):
    release = SCIENCEQA.load(f"{FIXTURES}/scienceqa")
    assert SCIENCEQA.load(f"{FIXTURES}/scienceqa/llava_test_CQM-A.json") == release
    root = _sqa_copy(tmp_path)
    (root / "problems.json").unlink()   # answers from the gpt turns, option counts from the text
    assert SCIENCEQA.load(str(root / "llava_test_CQM-A.json")) == [
        type(item)(item.question_id, item.prompt, [str(root / "images/test" / item.question_id / "image.png")],
                   item.meta) for item in release]


def test_scienceqa_scores_a_llava_answer_file():
    items = SCIENCEQA.load(f"{FIXTURES}/scienceqa")
    summary = SCIENCEQA.score(items, read_predictions(f"{FIXTURES}/scienceqa/predictions.jsonl"))
    # 5: "B" right; 11: "The answer is A." wrong (B); 42: "E. 3:1" right
    assert summary == {"task": "scienceqa", "n": 3, "missing": 0, "unparsed": 0, "correct": 2,
                       "accuracy": pytest.approx(200 / 3)}
    summary = SCIENCEQA.score(items, {"5": "b", "11": "B"})
    assert (summary["correct"], summary["missing"], summary["unparsed"]) == (1, 1, 1)


def test_scienceqa_bad_files_name_the_file_and_record(tmp_path):
    root = _sqa_copy(tmp_path)
    problems = json.loads((root / "problems.json").read_text())
    problems["11"]["answer"] = 7
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=r"problems.json: problem '11'"):
        SCIENCEQA.load(str(root))
    (root / "problems.json").write_text("{not json")
    with pytest.raises(ValueError, match="problems.json: not valid JSON"):
        SCIENCEQA.load(str(root))
    (root / "problems.json").unlink()
    records = json.loads((root / "llava_test_CQM-A.json").read_text())
    (root / "llava_test_CQM-A.json").write_text(json.dumps(records[:1] + [{"id": "11", "image": "11/image.png"}]))
    with pytest.raises(ValueError, match=r"llava_test_CQM-A.json: record 2 needs"):
        SCIENCEQA.load(str(root / "llava_test_CQM-A.json"))
    (root / "llava_test_CQM-A.json").write_text(json.dumps(records))
    (root / "images/test/42/image.png").unlink()
    with pytest.raises(ValueError, match=r"problem '42': image .*42/image.png not found"):
        SCIENCEQA.load(str(root / "llava_test_CQM-A.json"))


# --- MMMU task ---

def _png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), color).save(buffer, "PNG")
    return buffer.getvalue()


def _mmmu_row(subject, k, question, options, answer, kind="multiple-choice", images=1):
    row = {"id": f"validation_{subject}_{k}", "question": question, "options": repr(options), "explanation": "",
           "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy", "question_type": kind,
           "subfield": "x"}
    for n in range(1, 8):
        row[f"image_{n}"] = {"bytes": _png((40 * n, 0, 0)), "path": f"{n}.png"} if n <= images else None
    return row


def _write_mmmu(root, rows_by_subject):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for subject, rows in rows_by_subject.items():
        (root / subject).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), str(root / subject / "validation-00000-of-00001.parquet"))
    return root


MMMU_ROWS = {
    "Art_Theory": [
        _mmmu_row("Art_Theory", 1, "<image 1> Which artist painted this?", ["Monet", "Manet", "Degas"], "B"),
        _mmmu_row("Art_Theory", 2, "Compare <image 2> and <image 1>.", ["<image 3>", "same", "<image 1>"], "A",
                  images=3),
    ],
    "Math": [
        _mmmu_row("Math", 1, "What is x in <image 1>?", [], "3", kind="open"),
        _mmmu_row("Math", 2, "Give 1/2 as a decimal <image 1>", [], "['0.5', '.5']", kind="open"),
    ],
}


def test_mmmu_reads_the_parquet_release_with_interleaved_images(tmp_path):
    items = MMMU.load(str(_write_mmmu(tmp_path / "MMMU", MMMU_ROWS)))
    assert [item.question_id for item in items] == ["validation_Art_Theory_1", "validation_Art_Theory_2",
                                                    "validation_Math_1", "validation_Math_2"]
    assert items[0].prompt == ("<image> Which artist painted this?\nA. Monet\nB. Manet\nC. Degas\n\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[1].prompt.startswith("Compare <image> and <image>.\nA. <image>\nB. same\nC. <image>\n\n")
    assert items[1].images == [_png((80, 0, 0)), _png((40, 0, 0)), _png((120, 0, 0)), _png((40, 0, 0))]
    assert items[2].prompt == "What is x in <image>?\n\nAnswer the question using a single word or phrase."
    assert items[3].meta["answer"] == ["0.5", ".5"]
    assert MMMU.load(str(tmp_path / "MMMU"), prompt_suffix="")[2].prompt == "What is x in <image>?"
    assert len(MMMU.load(str(tmp_path / "MMMU"), limit=3)) == 3


def test_mmmu_scores_per_subject_discipline_and_overall(tmp_path):
    items = MMMU.load(str(_write_mmmu(tmp_path / "MMMU", MMMU_ROWS)))
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": "validation_Art_Theory_1", "text": "(B) Manet"},
        {"question_id": "validation_Art_Theory_2", "text": "C"},
        {"question_id": "validation_Math_1", "answer": "so x = 3.0"}]))
    summary = MMMU.score(items, read_predictions(str(path)))
    assert summary == {"task": "mmmu", "n": 4, "missing": 1, "unparsed": 0, "overall": {"num": 4, "acc": 0.5},
                       "disciplines": {"Art and Design": {"num": 2, "acc": 0.5}, "Science": {"num": 2, "acc": 0.5}},
                       "subjects": {"Art_Theory": {"num": 2, "acc": 0.5}, "Math": {"num": 2, "acc": 0.5}}}
    assert MMMU.score(items, {"validation_Math_2": "The answer is .5"})["subjects"]["Math"]["acc"] == 0.5


def test_mmmu_overall_accuracy_equals_official_aggregate(tmp_path, mmmu_ref, seeded_official_random):
    rng = random.Random(0)
    subjects = ["Art", "Math", "Pharmacy", "History", "Finance"]
    rows = {s: [] for s in subjects}
    for k in range(200):
        subject = subjects[k % len(subjects)]
        if k % 3:
            options = rng.choice(OPTION_SETS)
            rows[subject].append(_mmmu_row(subject, k, f"Q{k} <image 1>", options,
                                           rng.choice(choices.option_letters(len(options)))))
        else:
            rows[subject].append(_mmmu_row(subject, k, f"Q{k} <image 1>", [], rng.choice(OPEN_GOLDS[:13]), "open"))
    items = MMMU.load(str(_write_mmmu(tmp_path / "MMMU", rows)))
    answers = [text for _, text in _letter_answers()] + OPEN_RESPONSES
    predictions = {item.question_id: rng.choice(answers) for item in items}
    results = []
    for subject_rows in rows.values():
        for row in subject_rows:
            seeded_official_random[0] = row["id"]
            results.append(mmmu_ref.mmmu_process_results(row, [predictions[row["id"]]])["mmmu_acc"])
    summary = MMMU.score(items, predictions)
    assert summary["overall"]["acc"] == mmmu_ref.mmmu_aggregate_results(results)
    assert 0.1 < summary["overall"]["acc"] < 0.9


def test_mmmu_bad_records_name_the_file_and_row(tmp_path):
    rows = {"Math": [_mmmu_row("Math", 1, "Q <image 1>", ["a", "b"], "A"),
                     _mmmu_row("Math", 2, "Q <image 2>", ["a", "b"], "A")]}
    with pytest.raises(ValueError, match=r"Math/validation-00000-of-00001.parquet: row 1 .* <image 2>"):
        MMMU.load(str(_write_mmmu(tmp_path / "one", rows)))
    rows["Math"][1] = dict(_mmmu_row("Math", 2, "Q", ["a"], "A"), options="[a, b")
    with pytest.raises(ValueError, match=r"row 1 \(id 'validation_Math_2'\): options"):
        MMMU.load(str(_write_mmmu(tmp_path / "two", rows)))
    with pytest.raises(ValueError, match="no MMMU <Subject>/validation"):
        MMMU.load(str(tmp_path))
