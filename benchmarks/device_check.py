"""The GPU proof in one short run: MFU of a ~1.2B-parameter LLaVA stage-2 train step (CLIP-L/336 + a 1B LLaMA-style
decoder, sequence 2048, bfloat16, model.attention=auto), cuDNN against xla attention (outputs and gradients),
compile time, and the memory the step really takes against what the planner said.

    bash benchmarks/device_check.sh             # on a GPU machine; prints and writes device_check.json
    python benchmarks/device_check.py --smoke   # the same code on CPU, tiny model, splash in place of cuDNN

Prints one JSON object. `mfu` = our FLOPs per step (train/flops.py) / step time / the device's bf16 peak;
`attention` holds the largest differences between the kernels at real (non-padding) query positions, relative to
the largest xla value, for a causal right-padded batch and a full (vision-style) one; `memory` holds the device's
peak bytes in use, XLA's estimate for this compilation and the planner's CPU-proxy figure for the same config.
Needs jax with CUDA, flax, optax, orbax-checkpoint, pillow, pyyaml (no data pipeline: batches are random).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import REPO, emit, random_batch  # noqa: E402

SIZES = {   # ~1.2B parameters: CLIP ViT-L/14-336 (0.3B) + a 16-layer, 2048-wide decoder (0.9B)
    "full": ["model.decoder.hidden_size=2048", "model.decoder.num_layers=16", "model.decoder.num_heads=16",
             "model.decoder.num_kv_heads=16", "model.decoder.mlp_dim=5504", "data.max_length=2048",
             "train.batch_size=8"],
    "smoke": ["model.vision.image_size=56", "model.vision.hidden_size=64", "model.vision.num_layers=2",
              "model.vision.num_heads=2", "model.vision.mlp_dim=128", "model.decoder.hidden_size=128",
              "model.decoder.num_layers=2", "model.decoder.num_heads=2", "model.decoder.num_kv_heads=2",
              "model.decoder.mlp_dim=256", "model.decoder.vocab_size=1024", "model.image_token_id=1000",
              "data.max_length=256", "train.batch_size=2"],
}
COMMON = ["model.dtype=bfloat16", "model.remat=full", "model.attention=auto", "data.pack=auto", "train.stage=finetune",
          "train.learning_rate=1e-5", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]
ATTENTION_TOLERANCE = 2e-2       # relative to the largest |xla| value; bfloat16 inputs, float32 accumulation


def train_step_figures(config, steps: int) -> dict:
    import jax

    from llava_jax.runtime import resolve_auto
    from llava_jax.sharding import host_batch_to_global, make_mesh
    from llava_jax.train.flops import peak_flops, train_step_flops
    from llava_jax.train.state import make_train_setup
    from llava_jax.train.step import abstract_batch, compile_train_step, resolve_batch_layout

    config, choices = resolve_auto(config)
    mesh = make_mesh(config.mesh)
    resolve_batch_layout(config, mesh)
    setup = make_train_setup(config, mesh)
    start = time.perf_counter()
    step = compile_train_step(setup)
    compile_s = time.perf_counter() - start
    estimate = step.memory_analysis()
    state = setup.init_state(0)
    batch = host_batch_to_global(random_batch(config, abstract_batch(config, mesh)), mesh)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
    flops = train_step_flops(config, setup.frozen)
    peak = peak_flops(jax.devices()[0].device_kind)
    params = sum(int(x.size) for x in jax.tree_util.tree_leaves(setup.abstract_state.params))
    stats = jax.devices()[0].memory_stats() or {}
    return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "choices": choices,
            "params": params, "compile_s": round(compile_s, 1), "step_s": step_s,
            "tokens_per_s": config.train.batch_size * config.data.max_length / step_s,
            "flops_per_step": flops, "mfu": flops / step_s / (peak * jax.device_count()) if peak else None,
            "loss": float(metrics["loss"]),
            "memory": {"peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
                       "xla_estimate_bytes": estimate.argument_size_in_bytes + estimate.output_size_in_bytes
                       - estimate.alias_size_in_bytes + estimate.temp_size_in_bytes}}


def planner_bytes(config) -> dict:
    """The planner's figure for the same config, on one fake CPU device in its own process."""
    from llava_jax.config import save_config
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "config.yaml")
        save_config(config, path)
        result = subprocess.run([sys.executable, "-m", "llava_jax.plan", "--config", path, "--devices", "1",
                                 "--set", "model.attention=xla"], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if result.returncode:
        return {"error": result.stderr[-2000:]}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"peak_bytes": report["memory_bytes_per_device"]["peak"], "floor_bytes": report.get("floor_bytes")}


def attention_differences(head_dim: int, length: int, other: str = "cudnn") -> dict:
    """Max |other - xla| / max |xla| of outputs and of q/k/v gradients, at real query positions."""
    import jax
    import jax.numpy as jnp

    from llava_jax.models.attention import attention

    keys = jax.random.split(jax.random.key(0), 4)
    shape = (2, length, 8, head_dim)
    q, k, v, cotangent = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    lengths = jnp.array([length, length * 3 // 4])
    segments = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.int32)      # right-padded rows
    real = segments[:, :, None, None] > 0
    results = {}
    for name, causal, segment_ids in (("causal_padded", True, segments), ("full", False, None)):
        def run(kernel, q, k, v):
            out = attention(q, k, v, query_segment_ids=segment_ids, key_segment_ids=segment_ids, causal=causal,
                            kernel=kernel)
            mask = real if segment_ids is not None else True
            return jnp.sum(jnp.where(mask, out.astype(jnp.float32) * cotangent.astype(jnp.float32), 0.0)), out
        figures = {}
        for kernel in ("xla", other):
            (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: run(kernel, *a), argnums=(0, 1, 2),
                                                         has_aux=True))(q, k, v)
            figures[kernel] = (out, *grads)
        mask = real if segment_ids is not None else jnp.ones_like(real)
        diffs = {}
        for index, part in enumerate(("out", "dq", "dk", "dv")):
            x, c = (jnp.where(mask, figures[kn][index].astype(jnp.float32), 0.0) for kn in ("xla", other))
            diffs[part] = float(jnp.max(jnp.abs(c - x)) / jnp.max(jnp.abs(x)))
        results[name] = {**diffs, "kernels": ["xla", other],
                         "within_tolerance": max(diffs.values()) <= ATTENTION_TOLERANCE}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script, not the GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for device_check.json")
    args = parser.parse_args()
    import jax

    from llava_jax.config import load_config
    config = load_config(None, COMMON + SIZES["smoke" if args.smoke else "full"])
    record = {"jax": jax.__version__, "backend": jax.default_backend(), "smoke": args.smoke,
              "step": train_step_figures(config, args.steps), "planner": planner_bytes(config)}
    if jax.default_backend() == "gpu":
        record["attention"] = attention_differences(head_dim=config.model.decoder.head_dim, length=2048)
    else:        # cuDNN needs a GPU: check the comparison itself against splash (Pallas interpreter)
        record["attention"] = attention_differences(head_dim=config.model.decoder.head_dim, length=256,
                                                    other="splash")
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
        json.dump(record, f, indent=1)
    emit(record)


if __name__ == "__main__":
    main()
