"""Answer extraction for the multiple-choice and short-answer benchmarks, one function per official variant.

Public surface: `scienceqa_choice_index` (LLaVA's eval_science_qa.py), `mmmu_parse_multi_choice`,
`mmmu_parse_open`, `mmmu_eval_multi_choice`, `mmmu_eval_open` (MMMU's eval_utils.py; the random pick for an
unmatched multiple-choice answer is seeded by the question id), `mmbench_can_infer` (MMBench's can_infer without
the ChatGPT fallback) and `option_letters(n)`.
"""
from __future__ import annotations

import random
import re
import string
from typing import Sequence, Union

Number = float
OpenCandidate = Union[str, Number]


def option_letters(n: int) -> list[str]:
    return list(string.ascii_uppercase[:n])


# --- ScienceQA: LLaVA's llava/eval/eval_science_qa.py ---

_SQA_OPTIONS = ("A", "B", "C", "D", "E")


def _scienceqa_letter(text: str) -> str:
    """The option letter LLaVA's script reads from `text`, or "FAILED"."""
    text = text.replace("\n", ". ")
    if text.strip() in _SQA_OPTIONS:
        return text.strip()
    if len(text) >= 3 and text[0] in _SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    if "The answer is " in text:
        match = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
        if match:
            return match.group(1)
    return "FAILED"


def scienceqa_choice_index(text: str, num_choices: int) -> int:
    """The chosen option's index (0-based) in a problem with `num_choices` options, -1 when none is read."""
    letter = _scienceqa_letter(text)
    valid = _SQA_OPTIONS[:num_choices]
    return valid.index(letter) if letter in valid else -1


# --- MMMU: MMMU-Benchmark/MMMU eval/eval_utils.py ---

def mmmu_parse_multi_choice(response: str, options: Sequence[str], seed: str) -> tuple[str, bool]:
    """(letter, guessed): the official parse of a multiple-choice answer. When nothing matches, the official picks
    a random letter; here the pick is `random.Random(seed).choice` (seed: the question id), and guessed=True."""
    letters = option_letters(len(options))
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    by_text = False
    bracketed = [c for c in letters if f"({c})" in response]
    candidates = bracketed or [c for c in letters if f"{c} " in response] or [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, option in zip(letters, options) if option.lower() in response.lower()]
        by_text = True
    if not candidates:
        return random.Random(seed).choice(letters), True
    if len(candidates) == 1:
        return candidates[0], False
    if by_text:
        positions = [response.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))], False


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _mmmu_numbers(text: str) -> list[str]:
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text)


def _mmmu_normalize(text: str) -> list[OpenCandidate]:
    """A number (commas dropped, rounded to 2 decimals) or the lower-cased string (1 char: padded with a space)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _mmmu_key_responses(response: str) -> list[str]:
    """The tails after the last answer indicator ("is ", "so ", ...; "=" in the last sentence) of each sentence."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for k, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if k == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def mmmu_parse_open(response: str) -> list[OpenCandidate]:
    """The official candidate answers (normalized strings and numbers) read from an open-question response."""
    keys = _mmmu_key_responses(response)
    candidates = keys + [number for key in keys for number in _mmmu_numbers(key)]
    normalized = [value for candidate in candidates for value in _mmmu_normalize(candidate)]
    return list(dict.fromkeys(normalized))   # the official de-duplicates through a set; order does not matter


def mmmu_eval_multi_choice(gold: Union[str, list[str]], letter: str) -> bool:
    return letter in gold if isinstance(gold, list) else letter == gold


def mmmu_eval_open(gold: Union[str, list[str]], candidates: Sequence[OpenCandidate]) -> bool:
    """Correct when a string candidate contains a normalized gold string, or a number candidate equals a gold
    number."""
    golds = [value for answer in (gold if isinstance(gold, list) else [gold]) for value in _mmmu_normalize(answer)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in golds):
                return True
        elif candidate in golds:
            return True
    return False


# --- MMBench: the official evaluator's can_infer (as in lmms-eval's MMBench_Evaluator), no ChatGPT fallback ---

_MMBENCH_LETTERS = "ABCDE"
_MMBENCH_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                     (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def _mmbench_infer_option(answer: str) -> str | None:
    if "Failed to obtain answer via API" in answer:
        return None
    words = [word.strip() for word in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in words for c in _MMBENCH_LETTERS)

    # a bare letter; "A" in a longer answer (> 3 words) may be the article, so it falls through to the wrappers
    if count() == 1 and not ("A" in words and len(words) > 3):
        return next(c for c in _MMBENCH_LETTERS if c in words)
    for prefix, suffix in _MMBENCH_WRAPPERS:
        if count(prefix, suffix) == 1:
            return next(c for c in _MMBENCH_LETTERS if prefix + c + suffix in words)
    return None


def _mmbench_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    answer = answer.lower()
    matches = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return matches[0] if len(matches) == 1 else None


def mmbench_can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """The option letter MMBench reads from `answer` (letter forms first, then a unique option text), or None.
    `choices`: letter -> option text as shown to the model. Letters are looked for in A-E whatever the count."""
    return _mmbench_infer_option(answer) or _mmbench_infer_text(answer, choices)
