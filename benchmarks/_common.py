"""Helpers shared by the train-step benchmarks (train_step.py, compile_depth.py).

Public surface: `BENCH_CONFIG`, `load_bench_config(overrides)`, `single_device_setup(config)`,
`random_batch(config, batch_spec, seed)`, `median_seconds(run, repeats)`, `emit(record)`.
Importing it puts the repository root on sys.path, so `llava_jax` imports work from a checkout.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llava_jax.config import Config, load_config  # noqa: E402

BENCH_CONFIG = os.path.join(REPO, "configs", "bench_cpu.yaml")


def load_bench_config(overrides: Sequence[str] = ()) -> Config:
    return load_config(BENCH_CONFIG, overrides)


def single_device_setup(config: Config):
    """TrainSetup on the first device alone (the benchmark config's mesh is 1 x 1 x 1)."""
    import jax

    from llava_jax.sharding import make_mesh
    from llava_jax.train.state import make_train_setup
    return make_train_setup(config, make_mesh(config.mesh, jax.devices()[:1]))


def random_batch(config: Config, batch_spec: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid host batch in the dtypes of `batch_spec` (the step's abstract batch): per row a 2-token prefix, one
    image's tokens, then text, all of it after the image supervised; random pixels in [0, 255]."""
    rng = np.random.default_rng(seed)
    batch_size, length = batch_spec["input_ids"].shape
    image_tokens = config.model.tokens_per_image
    input_ids = rng.integers(0, config.model.image_token_id, (batch_size, length))
    input_ids[:, 2:2 + image_tokens] = config.model.image_token_id
    loss_mask = np.ones((batch_size, length))
    loss_mask[:, :2 + image_tokens] = 0
    values = {"input_ids": input_ids, "loss_mask": loss_mask, "segment_ids": np.ones((batch_size, length)),
              "positions": np.tile(np.arange(length), (batch_size, 1)),
              "pixel_values": rng.integers(0, 256, batch_spec["pixel_values"].shape),
              "image_mask": np.ones(batch_spec["image_mask"].shape), "num_samples": np.ones(batch_size),
              "bad_samples": np.zeros(batch_spec["bad_samples"].shape)}
    return {key: values[key].astype(spec.dtype) for key, spec in batch_spec.items()}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `run` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(record: dict) -> None:
    """Prints the benchmark's one JSON line."""
    print(json.dumps(record), flush=True)
