"""What the training loop costs around the train step: train.py's steady-state steps/s against the bare compiled
step on device-resident batches (same process, alternating rounds).

    python benchmarks/loop_overhead.py [--steps 60] [--rounds 2] [--pipelines demo heavy]

Pipelines: `demo` (configs/demo.yaml: synthetic shapes drawn on the fly) and `heavy` (the demo model fed from
LLaVA JSON: 336 px photo-like JPEGs decoded, padded and resized by the pipeline's threads). The loop figure is
wall-clock steps/s of train.py's loop over its last --steps steps (from the "time" of their metrics records, one
per step); the bare figure is --steps calls of the compiled step on batches already on the devices, each timed to
its completion (median). Prints one JSON object per pipeline: steps/s of both and their ratio (goal >= 0.97).
--cores split (default) runs XLA on one core and the host (loop + data pipeline) on the others, as an accelerator
host runs them; --cores shared lets the pipeline's threads take the cores the CPU "device" computes on.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import REPO, emit  # noqa: E402
from data_pipeline import write_dataset  # noqa: E402

WARMUP_STEPS = 10
LOG_EVERY = 10                   # a metrics record (with its wall-clock time) every 10 steps, as a real run logs


def pipeline_overrides(name: str, directory: str) -> list[str]:
    if name == "demo":
        return []
    json_path = write_dataset(directory, 256, 336)
    with open(json_path) as f:
        records = json.load(f)
    for record in records:          # short enough for the demo's 64-token rows (byte tokenizer)
        record["conversations"] = [{"from": "human", "value": "<image>\nWhat is it?"},
                                   {"from": "gpt", "value": "gradients"}]
    with open(json_path, "w") as f:
        json.dump(records, f)
    return ["data.source=llava_json", f"data.json_path={json_path}", "data.synthetic_eval_size=1"]


def bare_steps_per_s(config, steps: int) -> float:
    import jax

    from llava_jax.data.pipeline import make_train_iterator
    from llava_jax.runtime import resolve_auto
    from llava_jax.sharding import host_batch_to_global, make_mesh
    from llava_jax.train.state import make_train_setup
    from llava_jax.train.step import compile_train_step, resolve_batch_layout

    config, _ = resolve_auto(config)
    mesh = make_mesh(config.mesh)
    resolve_batch_layout(config, mesh)
    setup = make_train_setup(config, mesh)
    step = compile_train_step(setup)
    state = setup.init_state(config.train.seed)
    data = make_train_iterator(config)
    batches = [host_batch_to_global(next(data), mesh) for _ in range(8)]
    data.close()
    times = []
    for k in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[k % len(batches)])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times[WARMUP_STEPS:])


def loop_steps_per_s(config, steps: int, workdir: str) -> float:
    from llava_jax.train.loop import train
    config.train.steps = WARMUP_STEPS + steps
    config.train.log_every = LOG_EVERY
    config.checkpoint.every_steps = 10 ** 9
    train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if WARMUP_STEPS <= r["step"] < config.train.steps]  # not the save
    return (records[-1]["step"] - records[0]["step"]) / (records[-1]["time"] - records[0]["time"])


def split_cores() -> str:
    """Emulates an accelerator host on a CPU machine: XLA's threads (created when the backend starts) on core 0, the
    host's threads (this one, and the data pipeline's, created later) on the other cores. On an accelerator the
    device computes while the host reads data; on a plain CPU run the pipeline takes the cores the step needs."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return "shared (one core)"
    os.sched_setaffinity(0, {cores[0]})
    import jax
    jax.devices()                                   # XLA:CPU's thread pool starts here, on core 0
    os.sched_setaffinity(0, set(cores[1:]))         # this thread and every thread started from now on
    return f"xla on core {cores[0]}, host on {cores[1:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pipelines", nargs="+", default=["demo", "heavy"], choices=["demo", "heavy"])
    parser.add_argument("--cores", choices=["shared", "split"], default="split",
                        help="split: XLA on one core, the host on the others (an accelerator host's situation)")
    args = parser.parse_args()
    cores = split_cores() if args.cores == "split" else "shared"
    from llava_jax.config import load_config
    for name in args.pipelines:
        with tempfile.TemporaryDirectory() as directory:
            overrides = pipeline_overrides(name, directory)
            bare, loop = [], []
            for k in range(args.rounds):
                bare.append(bare_steps_per_s(load_config(os.path.join(REPO, "configs", "demo.yaml"), overrides),
                                             args.steps))
                loop.append(loop_steps_per_s(load_config(os.path.join(REPO, "configs", "demo.yaml"), overrides),
                                             args.steps, os.path.join(directory, f"run{k}")))
            emit({"pipeline": name, "cores": cores, "steps": args.steps, "rounds": args.rounds,
                  "bare_steps_per_s": statistics.median(bare), "loop_steps_per_s": statistics.median(loop),
                  "ratio": statistics.median(loop) / statistics.median(bare), "bare_all": bare, "loop_all": loop})


if __name__ == "__main__":
    main()
