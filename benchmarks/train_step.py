"""Train-step throughput on CPU, in one run: our jitted step (configs/bench_cpu.yaml, one device, float32) against
transformers' LlavaForConditionalGeneration with the same dims, weights and batch (AdamW, float32), and each
framework's float32 matmul ceiling.

    python benchmarks/train_step.py [--steps 4] [--rounds 3] [--matmul-size 2048] [--xla-flags FLAGS]
                                    [--set KEY=VALUE ...]

Prints one JSON line: step seconds and tokens/s of both, `ratio` = ours / transformers (goal >= 1.3),
`ceiling_share` = our FLOP/s (`train_step_flops`) / a jitted JAX matmul's FLOP/s (goal >= 0.75), the same share
for transformers against torch's matmul, and both ceilings. Each round times the JAX matmul, our steps, torch's
matmul and the transformers steps (median of --steps runs each); every figure is its best round, since other
processes only ever slow a round down (torch's threads suffer most from a busy core). `--set` overrides the
benchmark config (settings such as the loss chunking, not the dims, or the race is no longer fair).

XLA runs with its default flags, as train.py does (`--xla-flags` adds some, e.g. YNNPACK fusion types). The
process re-executes itself with llava_jax.host_malloc's allocator (TCMalloc if installed, else glibc huge pages),
as train.py does, for both frameworks alike; the JSON line reports the allocator settings, and our compiled HLO's
op counts.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
import time

from _common import emit, load_bench_config, median_seconds, random_batch, single_device_setup

from llava_jax.host_malloc import reexec_with_host_malloc

COUNTED_OPS = ("fusion", "dot", "transpose", "copy")
SETTLE_S = 1.0   # pause before each timing: the previous run's worker threads (OpenMP, Eigen) stop spin-waiting


def jax_matmul(size: int):
    """A blocking run of one jitted float32 [size, size] @ [size, size], compiled and warmed up."""
    import jax
    import jax.numpy as jnp
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (size, size), jnp.float32) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    return lambda: matmul(a, b).block_until_ready()


def torch_matmul(size: int):
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return lambda: torch.mm(a, b)


def hlo_op_counts(compiled) -> dict[str, int]:
    """How many of each COUNTED_OPS instruction the optimised HLO holds (fusion bodies included)."""
    ops = collections.Counter(re.findall(r"\s([a-z][\w-]*)\(", compiled.as_text()))
    return {op: ops[op] for op in COUNTED_OPS}


def our_step(config):
    """(blocking run of one train step, host batch, initial params, compiled step, compile seconds), warmed up."""
    import jax

    from llava_jax.sharding import host_batch_to_global
    from llava_jax.train.step import abstract_batch, compile_train_step
    setup = single_device_setup(config)
    start = time.perf_counter()
    step = compile_train_step(setup)
    compile_s = time.perf_counter() - start
    state = setup.init_state(config.train.seed)
    params = jax.device_get(state.params)
    host_batch = random_batch(config, abstract_batch(config, setup.mesh))
    batch = host_batch_to_global(host_batch, setup.mesh)

    def run():
        nonlocal state
        state, metrics = step(state, batch)
        return float(metrics["loss"])
    run()
    return run, host_batch, params, step, compile_s


def transformers_step(config, params, host_batch: dict):
    """A run of one transformers train step (forward, backward, clipping, AdamW) on the same weights and batch."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_jax.hf import save_hf_llava
    t = config.train
    with tempfile.TemporaryDirectory() as directory:
        save_hf_llava(config.model, params, directory)
        model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2),
                                  eps=t.adam_eps, weight_decay=t.weight_decay)
    input_ids = torch.tensor(host_batch["input_ids"], dtype=torch.long)
    labels = torch.where(torch.tensor(host_batch["loss_mask"]) > 0, input_ids, -100)
    pixels = host_batch["pixel_values"]                                       # [B, I, H, W, C] raw RGB
    pixel_values = torch.tensor(pixels.reshape(-1, *pixels.shape[2:]).transpose(0, 3, 1, 2) / 127.5 - 1.0,
                                dtype=torch.float32)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
        optimizer.step()
        return float(loss.detach())
    run()
    return run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per framework per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--xla-flags", default="", help="added to XLA_FLAGS before jax is imported")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def main() -> None:
    reexec_with_host_malloc()
    args = parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import torch

    from llava_jax.train.flops import train_step_flops
    from llava_jax.train.optimizer import frozen_groups
    torch.set_num_threads(os.cpu_count())
    config = load_bench_config(args.overrides)
    ours, host_batch, params, compiled, compile_s = our_step(config)
    theirs = transformers_step(config, params, host_batch)
    runs = {"jax_matmul": jax_matmul(args.matmul_size), "ours": ours,
            "torch_matmul": torch_matmul(args.matmul_size), "transformers": theirs}
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            time.sleep(SETTLE_S)
            rounds[name].append(median_seconds(run, args.steps))
    seconds = {name: min(times) for name, times in rounds.items()}
    step_flops = train_step_flops(config, frozen_groups(config.train))
    tokens = config.train.batch_size * config.data.max_length
    matmul_flops = 2 * args.matmul_size ** 3
    jax_ceiling, torch_ceiling = matmul_flops / seconds["jax_matmul"], matmul_flops / seconds["torch_matmul"]
    emit({
        "ours_tokens_per_s": round(tokens / seconds["ours"], 1),
        "transformers_tokens_per_s": round(tokens / seconds["transformers"], 1),
        "ratio": round(seconds["transformers"] / seconds["ours"], 3),
        "ceiling_share": round(step_flops / seconds["ours"] / jax_ceiling, 3),
        "transformers_ceiling_share": round(step_flops / seconds["transformers"] / torch_ceiling, 3),
        "ours_step_s": round(seconds["ours"], 4), "transformers_step_s": round(seconds["transformers"], 4),
        "jax_matmul_flops_per_s": round(jax_ceiling), "torch_matmul_flops_per_s": round(torch_ceiling),
        "flops_per_step": step_flops, "ours_compile_s": round(compile_s, 2), "ours_hlo_ops": hlo_op_counts(compiled),
        "round_seconds": {name: [round(t, 4) for t in times] for name, times in rounds.items()},
        "tokens_per_step": tokens, "cpus": os.cpu_count(), "xla_flags": args.xla_flags,
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "overrides": args.overrides,
    })


if __name__ == "__main__":
    main()
