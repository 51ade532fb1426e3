"""The VQA answer normalisation and the 10-human soft accuracy, shared by VQAv2 and TextVQA.

Public surface: `process_punctuation` (with vqaEval.py's `DIGIT_COMMA_DIGIT` or EvalAI's `EVALAI_DIGIT_COMMA_DIGIT`
test), `process_digit_article`, `normalize_answer` (EvalAI's answer processor, used by TextVQA's m4c evaluator and
LLaVA's VQAv2 submission converter), `vqav2_accuracy` (the official vqaEval.py rule) and `textvqa_accuracy` (m4c
TextVQAAccuracyEvaluator). Accuracies are fractions in [0, 1] for one question.
"""
from __future__ import annotations

import re
from typing import Sequence

# Official contractions map (vqaEval.py == EvalAI), quirks kept: "somebody'd" -> "somebodyd", and the capitalised
# keys ("Im", "Ive") can never match because words are lower-cased first.
_CONTRACTIONS = dict(pair.split("=", 1) for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
# The official pattern "(?!<=\d)(\.)(?!\d)" is a typo for a look-behind: it removes every "." not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32   # the official code passes re.UNICODE (== 32) as sub()'s `count`: at most 32 periods go
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")           # vqaEval.py's commaStrip
EVALAI_DIGIT_COMMA_DIGIT = re.compile(r"\d,+\d")   # EvalAI's COMMA_STRIP


def process_punctuation(text: str, digit_comma_digit: re.Pattern = DIGIT_COMMA_DIGIT) -> str:
    """Each punctuation mark is deleted when it touches a space somewhere in `text` (or `text` has a comma between
    digits, as in "1,000"), else replaced by a space; then periods not followed by a digit are removed ("3.5" stays)."""
    delete_all = digit_comma_digit.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        delete = delete_all or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words to digits ("two" -> "2"), articles dropped, contractions restored, single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor (m4c_evaluator.EvalAIAnswerProcessor): lower-case, drop "," and "?", split "'s",
    whitespace to spaces, then `process_punctuation` and `process_digit_article`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, EVALAI_DIGIT_COMMA_DIGIT))


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the len(answers) subsets that leave one human out of min(#humans in the subset saying it / 3, 1)."""
    matches = sum(answer == prediction for answer in answers)
    scores = [min(1.0, (matches - (answer == prediction)) / 3) for answer in answers]
    return sum(scores) / len(scores)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official vqaEval.py: the prediction is whitespace-cleaned, punctuation- and digit/article-processed; the human
    answers are only punctuation-processed, and only when they are not all identical (as the official script does)."""
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    prediction = process_digit_article(process_punctuation(prediction))
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return _leave_one_out(prediction, answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """m4c TextVQAAccuracyEvaluator: prediction and every human answer through `normalize_answer`, then the
    leave-one-out soft accuracy (0 when the prediction matches no human)."""
    return _leave_one_out(normalize_answer(prediction), [normalize_answer(answer) for answer in answers])
