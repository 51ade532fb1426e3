"""benchmarks/lora_heldout.py at a few steps: one JSON object with every key, sane accuracies and ratios, and LoRA
training fewer parameters with less optimizer state than full fine-tuning (no accuracy goal at this size)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"held_out", "base_steps", "steps", "base_accuracy", "lora_accuracy", "full_accuracy", "lora_over_full",
        "trainable_params", "trainable_ratio", "optimizer_bytes", "optimizer_ratio", "seconds"}


def test_lora_heldout_reports_accuracies_and_smaller_trainable_state(tmp_path):
    command = [sys.executable, os.path.join(REPO, "benchmarks", "lora_heldout.py"), "--held-out", "count",
               "--base-steps", "4", "--steps", "3", "--eval", "8", "--batch-size", "8", "--workdir", str(tmp_path)]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}     # one CPU device, as the demo
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert KEYS <= set(report)
    assert (report["held_out"], report["base_steps"], report["steps"]) == ("count", 4, 3)
    for name in ("base_accuracy", "lora_accuracy", "full_accuracy"):
        assert 0.0 <= report[name] <= 1.0
    assert report["lora_over_full"] is None or report["lora_over_full"] >= 0
    for name in ("trainable", "optimizer"):
        assert 0 < report[f"{name}_ratio"] < 1
    assert 0 < report["trainable_params"]["lora"] < report["trainable_params"]["full"]
    assert 0 < report["optimizer_bytes"]["lora"] < report["optimizer_bytes"]["full"]
    assert "freshly initialised (not in the source): lora/" in done.stderr      # the adapters start fresh
