"""benchmarks/generation.py at a small setting: its record has every key, positive rates, and greedy float32
generation gives the same tokens as transformers' generate on the exported weights."""
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
RECORD_KEYS = {"batch", "new_tokens", "ours_tokens_per_s", "transformers_tokens_per_s", "speedup", "compile_s",
               "tokens_equal_fraction", "threads", "weight_pass_ms", "torch_weight_pass_ms",
               "speedup_ceiling"}


@pytest.fixture(scope="module")
def generation_benchmark():
    """benchmarks/generation.py as a module (its `_common` import needs benchmarks/ on sys.path)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location("benchmark_generation", os.path.join(BENCHMARKS, "generation.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(BENCHMARKS)


def test_generation_benchmark_reports_rates_and_equal_greedy_tokens(generation_benchmark, monkeypatch):
    monkeypatch.setattr(generation_benchmark, "SETTLE_S", 0.0)
    record = generation_benchmark.measure(batch=2, new_tokens=4, repeats=1, rounds=1)
    assert RECORD_KEYS <= set(record)
    assert (record["batch"], record["new_tokens"], record["threads"]) == (2, 4, os.cpu_count())
    assert record["ours_tokens_per_s"] > 0 and record["transformers_tokens_per_s"] > 0 and record["speedup"] > 0
    assert record["tokens_equal_fraction"] == 1.0
    floor_s = (min(record["ours_prefill_s"], record["transformers_prefill_s"])
               + 3 * min(record["weight_pass_ms"], record["torch_weight_pass_ms"]) / 1e3)   # new_tokens - 1 passes
    assert record["weight_pass_ms"] > 0 and record["torch_weight_pass_ms"] > 0
    assert record["speedup_ceiling"] == pytest.approx(record["transformers_s"] / floor_s, rel=0.02)
    assert len(record["prompt_lengths"]) == 2 and len(set(record["prompt_lengths"])) == 2   # prompts differ in length
