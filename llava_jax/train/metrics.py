"""Run metrics: one JSON object per logged step in WORKDIR/metrics.jsonl, TensorBoard scalars in WORKDIR/tb/
(tensorboardX, no TensorFlow), and a live progress line. Public surface: `MetricsLogger`.

Only process 0 writes; other processes' loggers are silent. A run resumed at step k first drops the records of
steps after k (written before the interruption, and a torn last line), so metrics.jsonl holds each step once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from tensorboardX import SummaryWriter


class MetricsLogger:
    def __init__(self, workdir: str, total_steps: int, enabled: bool = True, stream=sys.stdout, start_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream
        self._start_time: Optional[float] = None
        self._start_step = 0
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            drop_records_after(path, start_step)
            self._jsonl = open(path, "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def start(self, step: int) -> None:
        """Marks where timing for the ETA starts (after compilation)."""
        self._start_time, self._start_step = time.time(), step

    def write(self, step: int, metrics: dict) -> None:
        """Appends one record {"step": step, "time": unix seconds when written, **metrics} and mirrors numeric
        values to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        eta = ""
        if self._start_time is not None and step > self._start_step:
            per_step = (time.time() - self._start_time) / (step - self._start_step)
            eta = f" | ETA {_format_seconds(per_step * (self.total_steps - step))}"
        self.stream.write(f"\rstep {step}/{self.total_steps} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s{eta}   ")
        if step == self.total_steps:
            self.stream.write("\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def drop_records_after(path: str, step: int) -> None:
    """Rewrites the JSONL file at `path` keeping only whole records of steps <= `step`."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                kept.append(line.rstrip("\n") + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
