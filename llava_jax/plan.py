"""AOT memory planner: compiles the real train step for N devices from abstract shapes only (no parameter is
materialised, no data or tokenizer is read) and reports what one device has to hold.

    python -m llava_jax.plan --config PATH [--set KEY=VALUE ...] [--devices N] [--topology NAME]
                             [--device-memory-gib G] [--search] [--explain N]

Prints one JSON object: per-device bytes from XLA's memory analysis (arguments, outputs, aliased, temporaries and
peak = arguments + outputs - aliased + temporaries), parameter and optimizer-state bytes per device (abstract state
x shardings), the floor beside the peak (`floor_bytes`, `floor_gib`, `floor_parts`: params + gradients + optimizer
state + the layer inputs full remat keeps, see `llava_jax.plan_floor`) and `peak_over_floor`, FLOPs per step (ours
from `train_step_flops`, and XLA's cost analysis, which counts a loop body once, so the scans over layers and
micro-batches are under-counted there), the mesh, and `fits` (peak <= G GiB). `--search` compiles other layouts
and adds the largest micro-batch (`train.micro_batch_size`: rows per data-parallel replica, i.e. per device when
mesh.tensor=1) and, at that size, the cheapest remat policy that fit. `--explain N` lists the N largest buffers
live at the peak, with the JAX op that made each (`llava_jax.plan_explain`).

The devices are fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax is
first imported, so this module imports jax lazily), but the step is traced as an accelerator runs it: inside
`cpu_layout.accelerator_layout()`, so none of the CPU-only operand layouts (optimization barriers, the Dense
gradient's custom VJP) is in the plan. model.attention=auto still resolves to the xla kernel here (the CPU's), which
keeps [heads, T, T] float32 scores where splash / cuDNN keep none. XLA:CPU also computes bfloat16 matmuls in
float32 (its float normalization converts their operands and results, and whole layer stacks around them), so the
figures err on the high side of an accelerator's.

`--topology NAME` (e.g. v5e:4x4, v5p:2x2x4) compiles for that TPU slice instead, with XLA:TPU itself, on this CPU
machine (libtpu's ahead-of-time compiler: `pip install libtpu` or `jax[tpu]`; no TPU needed): model.attention /
data.pack `auto` resolve as on a TPU (splash, packed), and the figures are the ones that TPU would allocate. XLA:TPU
refuses to compile a step larger than the chip's memory; plan on a larger chip with the same count (v5p: 95 GiB)
and compare with `--device-memory-gib`.

Public surface: `plan_step(config, devices, device_memory_bytes, explain=0) -> dict`, `tpu_devices(topology)`,
`lower_for_accelerator(setup)`, `compile_for_accelerator(setup, compiler_options=None)`,
`search_layouts(config, devices, device_memory_bytes) -> dict`, `main(argv)`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from llava_jax.config import Config, load_config

GIB = 2 ** 30
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Remat policies from the least recomputation (and most memory) to the most.
REMAT_BY_RECOMPUTE = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


def use_fake_cpu_devices(count: int) -> None:
    """Makes jax, when first imported, run on `count` CPU devices (replacing any device-count flag already set)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def tpu_devices(topology: str) -> list:
    """The devices of a TPU slice to compile for, without a TPU (libtpu's topology descriptions)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")      # nothing runs on the slice; jax itself stays on the CPU
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compiling only: no chip to guard with a lockfile
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - a missing libtpu and a bad name both end here
        raise SystemExit(f"--topology {topology}: no TPU topology ({type(e).__name__}: {str(e)[:200]}); it needs "
                         "libtpu (pip install libtpu, the version jax[tpu] names) and a name like v5e:4x4") from e


def cpu_devices(count: int) -> list:
    import jax
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise SystemExit(f"--devices {count}: jax was imported with only {len(devices)} CPU devices; run the planner "
                         f"as its own process (python -m llava_jax.plan) or set XLA_FLAGS={DEVICE_COUNT_FLAG}={count}")
    return devices[:count]


def memory_figures(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable; peak counts donated (aliased) buffers once."""
    stats = compiled.memory_analysis()
    figures = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
               "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
               "generated_code": stats.generated_code_size_in_bytes}
    figures["peak"] = figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
    return figures


def xla_flops(compiled) -> Optional[float]:
    """FLOPs per device from XLA's cost analysis (None where the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def count_params(tree: Any) -> int:
    import jax
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def lower_for_accelerator(setup):
    """The train step of `setup` traced and lowered as an accelerator runs it (see the module doc) against abstract
    inputs: inside `accelerator_layout()`, so without the CPU-only operand layouts."""
    import flax.linen as nn
    import jax

    from llava_jax.models.cpu_layout import accelerator_layout
    from llava_jax.sharding import LOGICAL_RULES
    from llava_jax.train.step import abstract_batch, jit_train_step, resolve_batch_layout

    resolve_batch_layout(setup.config, setup.mesh)
    batch = abstract_batch(setup.config, setup.mesh)
    with accelerator_layout(), jax.set_mesh(setup.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        return jit_train_step(setup).lower(setup.abstract_state, batch)


def compile_for_accelerator(setup, compiler_options: Optional[dict] = None):
    """`lower_for_accelerator(setup)` compiled; `compiler_options` (XLA debug options, e.g. a dump directory) go to
    this one compilation."""
    return lower_for_accelerator(setup).compile(compiler_options=compiler_options)


def plan_step(config: Config, devices: Sequence, device_memory_bytes: float, explain: int = 0) -> dict:
    """Compiles the train step of `config` for `devices` (never materialising state) and reports its footprint;
    `explain` > 0 compiles once more and adds that many of the largest buffers live at the peak (`plan_explain`)."""
    from llava_jax.plan_explain import explain_peak
    from llava_jax.plan_floor import memory_floor
    from llava_jax.sharding import make_mesh, sharding_report
    from llava_jax.train.flops import train_step_flops
    from llava_jax.train.optimizer import split_params
    from llava_jax.train.state import make_train_setup

    from llava_jax.runtime import resolve_auto

    config = resolve_auto(config, devices[0].platform)[0]
    mesh = make_mesh(config.mesh, devices)
    setup = make_train_setup(config, mesh)
    start = time.perf_counter()
    try:
        compiled = compile_for_accelerator(setup)
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a step larger than the chip
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise SystemExit(f"{devices[0].device_kind}: {str(e).splitlines()[0][:300]}; plan on a larger chip with the "
                         f"same device count (e.g. --topology v5p:...) to see the figures") from e
    compile_s = time.perf_counter() - start
    state, shardings = setup.abstract_state, setup.state_shardings
    memory = memory_figures(compiled)
    floor = memory_floor(setup)
    step_flops = train_step_flops(config, setup.frozen)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    explained = {"peak_buffers": explain_peak(lambda options: compile_for_accelerator(setup, options), explain)
                 } if explain > 0 else {}
    return {
        "devices": len(devices), "platform": devices[0].platform, "mesh": dict(mesh.shape),
        "batch_size": config.train.batch_size, "grad_accum_steps": config.train.grad_accum_steps,
        "micro_batch_size": config.train.batch_size // config.train.grad_accum_steps // replicas,
        "sequence_length": config.data.max_length, "dtype": config.model.dtype, "remat": config.model.remat,
        "attention": config.model.attention, "pack": config.data.pack, "frozen": list(setup.frozen),
        "params": count_params(state.params),
        "trainable_params": count_params(split_params(state.params, setup.frozen)[0]),
        "param_bytes_per_device": sharding_report(state.params, shardings.params)["per_device_bytes"],
        "optimizer_bytes_per_device": sharding_report(state.opt_state, shardings.opt_state)["per_device_bytes"],
        "optimizer_state_dtype": config.train.optimizer_state_dtype,
        "memory_bytes_per_device": memory, "peak_gib": round(memory["peak"] / GIB, 3),
        "floor_bytes": floor["bytes"], "floor_gib": round(floor["bytes"] / GIB, 3), "floor_parts": floor["parts"],
        "peak_over_floor": memory["peak"] / floor["bytes"],
        "device_memory_gib": round(device_memory_bytes / GIB, 3), "fits": memory["peak"] <= device_memory_bytes,
        "flops_per_step": step_flops, "flops_per_step_per_device": step_flops / len(devices),
        "xla_flops_per_device": xla_flops(compiled), "compile_s": round(compile_s, 2), **explained,
    }


def micro_batch_sizes(config: Config, device_count: int) -> list[int]:
    """Rows per data-parallel replica that split the global batch evenly, largest first."""
    from llava_jax.sharding import resolve_mesh_shape
    data, fsdp, _ = resolve_mesh_shape(config.mesh, device_count)
    per_replica = config.train.batch_size // (data * fsdp)
    return [size for size in range(per_replica, 0, -1) if per_replica % size == 0]


def with_layout(config: Config, micro_batch_size: int, remat: str) -> Config:
    layout = copy.deepcopy(config)
    layout.train.micro_batch_size, layout.train.grad_accum_steps = micro_batch_size, 1
    layout.model.remat = remat
    return layout


def layout_summary(report: dict) -> dict:
    return {"micro_batch_size": report["micro_batch_size"], "grad_accum_steps": report["grad_accum_steps"],
            "remat": report["remat"], "peak_bytes": report["memory_bytes_per_device"]["peak"],
            "peak_gib": report["peak_gib"], "fits": report["fits"],
            "overrides": [f"train.micro_batch_size={report['micro_batch_size']}", f"model.remat={report['remat']}"]}


def search_layouts(config: Config, devices: Sequence, device_memory_bytes: float) -> dict:
    """The largest micro-batch that fits with full remat, then the cheapest remat policy that fits at that size.

    Returns {"best": summary or None, "tried": [summary, ...]}; each summary carries the overrides to apply.
    """
    tried = []

    def attempt(micro_batch_size: int, remat: str) -> dict:
        tried.append(layout_summary(plan_step(with_layout(config, micro_batch_size, remat), devices,
                                              device_memory_bytes)))
        return tried[-1]

    for size in micro_batch_sizes(config, len(devices)):
        probe = attempt(size, "full")
        if probe["fits"]:
            cheaper = (attempt(size, remat) for remat in REMAT_BY_RECOMPUTE[:-1])
            return {"best": next((s for s in cheaper if s["fits"]), probe), "tried": tried}
    return {"best": None, "tried": tried}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (default: config defaults only)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set train.micro_batch_size=1 model.remat=full")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices to plan for: fake CPU devices (default 8), or with --topology the first N "
                             "chips of the slice (e.g. one chip)")
    parser.add_argument("--topology", default=None, metavar="NAME",
                        help="compile for this TPU slice with XLA:TPU (e.g. v5e:4x4; needs libtpu, not a TPU)")
    parser.add_argument("--device-memory-gib", type=float, default=16.0, help="memory of one device, GiB")
    parser.add_argument("--search", action="store_true",
                        help="also find the largest micro-batch and the cheapest remat policy that fit")
    parser.add_argument("--explain", type=int, default=0, metavar="N",
                        help="compile once more and list the N largest buffers live at the peak (peak_buffers)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.topology:
        devices = tpu_devices(args.topology)[:args.devices]
    else:
        count = args.devices or 8
        if "jax" not in sys.modules:
            use_fake_cpu_devices(count)
        devices = cpu_devices(count)
    memory_bytes = args.device_memory_gib * GIB
    report = {"config": args.config, "overrides": args.overrides,
              **plan_step(config, devices, memory_bytes, explain=args.explain)}
    if args.search:
        report["search"] = search_layouts(config, devices, memory_bytes)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
