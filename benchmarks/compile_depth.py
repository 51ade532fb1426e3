"""Compile time of the train step against decoder depth: AOT lower + compile of configs/bench_cpu.yaml with a
shallow and a deep stack of scanned decoder layers, with no persistent compilation cache.

    python benchmarks/compile_depth.py [--layers 2 32] [--repeats 2]

Prints one JSON line: median seconds per depth (a fresh train set-up each time, depths alternating, after one
untimed warm-up compile) and `ratio` = deep / shallow (goal <= 1.5: a scanned stack compiles one layer body).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402  (after the cache directory is unset)
from _common import emit, load_bench_config, single_device_setup  # noqa: E402

# llava_jax after _common, which puts the repository on sys.path
from llava_jax.train.step import compile_train_step  # noqa: E402


def compile_seconds(layers: int) -> float:
    config = load_bench_config([f"model.decoder.num_layers={layers}", "model.scan_layers=true"])
    setup = single_device_setup(config)
    start = time.perf_counter()
    compile_train_step(setup)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 32], metavar=("SHALLOW", "DEEP"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    compile_seconds(args.layers[0])
    times = {layers: [] for layers in args.layers}
    for _ in range(args.repeats):
        for layers in args.layers:
            times[layers].append(compile_seconds(layers))
    shallow, deep = (statistics.median(times[layers]) for layers in args.layers)
    emit({"shallow_layers": args.layers[0], "deep_layers": args.layers[1], "shallow_compile_s": round(shallow, 2),
          "deep_compile_s": round(deep, 2), "ratio": round(deep / shallow, 3),
          "compile_s": {str(layers): [round(t, 2) for t in ts] for layers, ts in times.items()},
          "backend": jax.default_backend()})


if __name__ == "__main__":
    main()
