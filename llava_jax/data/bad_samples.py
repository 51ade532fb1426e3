"""Bad input: what counts as a bad sample, how it is replaced, and how the training loop counts it.

Public surface: `REASONS`, `BadSample` (raised while reading one record), `BadDataError` (stops the run),
`load_with_replacement(load, index, size, describe, policy)`, `bad_sample_error`, `bad_sample_vector(bad_json)` and
`BadSampleMonitor(config)` with `add(samples, counts)`, `note_examples(batch)`, `update(batch)`, `counts()`,
`total_seen`. Bad samples travel in the batch: each row's counts by reason ("bad_samples", "num_samples"; the train
step sums them over the GLOBAL batch, so with several processes every one of them sees the same counts and takes
the same decision at the same step) and, host-only, the details for error messages ("_bad" JSON).
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable

import numpy as np

REASONS = ("missing_image", "corrupt_image", "empty_image", "malformed_record", "image_count_mismatch",
           "too_many_images", "too_long")
MAX_REPLACEMENT_ATTEMPTS = 100
_EXAMPLES_IN_ERROR = 10


class BadSample(Exception):
    """One record cannot become a training sample; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str, example_id: str | None = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.example_id = example_id


class BadDataError(RuntimeError):
    """Raised instead of skipping: policy `error`, too many bad samples, or no valid replacement."""


def _report(bad: BadSample, where: str) -> dict[str, str]:
    return {"id": bad.example_id or "?", "reason": bad.reason, "where": where, "detail": bad.detail}


def bad_sample_error(bad: BadSample, where: str) -> BadDataError:
    """The error for policy `error`: names the file and record (`where`), the example id and the reason."""
    return BadDataError(f"bad sample in {where} (id {bad.example_id or '?'}): {bad}. Fix or remove it, or set "
                        "data.bad_sample_policy=skip")


def load_with_replacement(load: Callable[[int], dict], index: int, size: int, describe: Callable[[int], str],
                          policy: str) -> dict:
    """Returns `load(index)`, or under policy `skip` the first good `load(index + k)` (mod size).

    Only the requested index is reported as bad (in the sample's "_bad" list): a bad record met while searching
    for a replacement is reported by its own slot, so every record is counted once per time it is drawn.
    """
    reported: list[dict[str, str]] = []
    for attempt in range(min(size, MAX_REPLACEMENT_ATTEMPTS)):
        candidate = (index + attempt) % size
        try:
            sample = load(candidate)
        except BadSample as bad:
            if policy == "error":
                raise bad_sample_error(bad, describe(candidate)) from None
            if attempt == 0:
                reported.append(_report(bad, describe(candidate)))
            continue
        sample["_bad"] = json.dumps(reported)
        return sample
    raise BadDataError(f"no valid sample among the {min(size, MAX_REPLACEMENT_ATTEMPTS)} records following "
                       f"{describe(index)}; the first was bad because {reported[0]['reason']}: "
                       f"{reported[0]['detail']}")


def bad_sample_vector(bad_json: str) -> np.ndarray:
    """A row's "_bad" JSON list -> int32 [len(REASONS)] counts by reason."""
    counts = collections.Counter(entry["reason"] for entry in json.loads(bad_json))
    return np.array([counts[reason] for reason in REASONS], np.int32)


class BadSampleMonitor:
    """Counts bad samples; raises BadDataError once their fraction is too high.

    The training loop `add`s the global counts the train step summed (identical on every process); `update(batch)`
    counts one host batch alone. The fraction is checked when at least `data.bad_fraction_min_samples` samples were
    seen, so a single bad record in the first batch does not stop a run. The error lists the first bad samples
    this process read (`note_examples`).
    """

    def __init__(self, config):
        self.max_fraction = config.data.max_bad_fraction
        self.min_samples = config.data.bad_fraction_min_samples
        self.total_seen = 0
        self._counts: collections.Counter = collections.Counter()
        self._examples: list[dict[str, str]] = []

    def note_examples(self, batch: dict[str, Any]) -> None:
        """Keeps the details of the first bad samples of this process's host batch, for the error message."""
        for row in np.asarray(batch["_bad"]).reshape(-1):
            for entry in json.loads(str(row)):
                if len(self._examples) < _EXAMPLES_IN_ERROR:
                    self._examples.append(entry)

    def update(self, batch: dict[str, Any]) -> None:
        """Counts one host batch on its own (one process)."""
        self.note_examples(batch)
        counts = np.asarray(batch["bad_samples"]).reshape(-1, len(REASONS)).sum(axis=0)
        self.add(int(np.sum(batch["num_samples"])), dict(zip(REASONS, counts.tolist())))

    def add(self, samples: int, counts: dict[str, int]) -> None:
        """Adds `samples` drawn samples and the bad ones among them by reason; raises BadDataError above
        data.max_bad_fraction."""
        self.total_seen += samples
        self._counts.update({reason: int(count) for reason, count in counts.items() if count})
        bad = sum(self._counts.values())
        if self.total_seen >= self.min_samples and bad > self.max_fraction * self.total_seen:
            listing = "\n".join(f"  {e['where']} (id {e['id']}): {e['reason']}: {e['detail']}"
                                for e in self._examples)
            raise BadDataError(
                f"{bad} of {self.total_seen} samples were bad ({bad / self.total_seen:.2%} > data.max_bad_fraction="
                f"{self.max_fraction:.2%}); by reason: {dict(self._counts)}. First bad samples:\n{listing}")

    def counts(self) -> dict[str, int]:
        return dict(self._counts)
