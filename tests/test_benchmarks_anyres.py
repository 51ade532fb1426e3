"""benchmarks/anyres_padding.py at tiny sizes: it prints one JSON object with both settings, and packing pads less."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTING_KEYS = {"padding_share", "samples_per_batch", "samples_per_row", "image_token_share", "text_token_share",
                "text_only_sample_share", "rows_with_all_image_slots_used", "bad_samples"}


def run_benchmark(*args: str) -> dict:
    command = [sys.executable, os.path.join(REPO, "benchmarks", "anyres_padding.py"), *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_anyres_padding_reports_both_settings_and_packing_pads_less():
    report = run_benchmark("--records", "120", "--batches", "3", "--batch-size", "4", "--max-images", "2")
    assert SETTING_KEYS <= set(report["unpacked"]) and SETTING_KEYS <= set(report["packed"])
    assert {"packed_over_unpacked", "offline_first_fit_decreasing", "goal_met", "image_tokens_by_size"} <= set(report)
    unpacked, packed = report["unpacked"], report["packed"]
    assert unpacked["samples_per_row"] == 1.0
    assert packed["samples_per_row"] > 1.0
    assert 0 < packed["padding_share"] < unpacked["padding_share"] < 1
    assert 1176 <= min(report["image_tokens_by_size"].values()) <= max(report["image_tokens_by_size"].values()) <= 2928
    assert sum(unpacked["bad_samples"].values()) == 0
