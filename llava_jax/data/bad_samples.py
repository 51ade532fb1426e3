"""Bad input: what counts as a bad sample, how it is replaced, and how the training loop counts it.

Public surface: `REASONS`, `BadSample` (raised while reading one record), `BadDataError` (stops the run),
`load_with_replacement(load, index, size, describe, policy)`, `bad_sample_error` and `BadSampleMonitor(config)` with
`update(batch)`, `counts()`, `total_seen`. Bad samples travel as host-only batch metadata ("_bad", "_num_samples"),
so the counts are right with worker processes too.
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


class BadSampleMonitor:
    """Counts bad samples from batch metadata; raises BadDataError once their fraction is too high.

    The fraction is checked when at least `data.bad_fraction_min_samples` samples were seen, so a single bad
    record in the first batch does not stop a run.
    """

    def __init__(self, config):
        self.max_fraction = config.data.max_bad_fraction
        self.min_samples = config.data.bad_fraction_min_samples
        self.total_seen = 0
        self._counts: collections.Counter = collections.Counter()
        self._examples: list[dict[str, str]] = []

    def update(self, batch: dict[str, Any]) -> None:
        self.total_seen += int(np.sum(batch["_num_samples"]))
        for row in np.asarray(batch["_bad"]).reshape(-1):
            for entry in json.loads(str(row)):
                self._counts[entry["reason"]] += 1
                if len(self._examples) < _EXAMPLES_IN_ERROR:
                    self._examples.append(entry)
        bad = sum(self._counts.values())
        if self.total_seen >= self.min_samples and bad > self.max_fraction * self.total_seen:
            listing = "\n".join(f"  {e['where']} (id {e['id']}): {e['reason']}: {e['detail']}"
                                for e in self._examples)
            raise BadDataError(
                f"{bad} of {self.total_seen} samples were bad ({bad / self.total_seen:.2%} > data.max_bad_fraction="
                f"{self.max_fraction:.2%}); by reason: {dict(self._counts)}. First bad samples:\n{listing}")

    def counts(self) -> dict[str, int]:
        return dict(self._counts)
