"""Checkpoint cost for a mid-size model (~170M params, float32, AdamW state for every part: ~2 GB of train state).

    python benchmarks/checkpoint_save.py [--hidden 768] [--layers 12] [--saves 3] [--dir DIR]

Prints one JSON object: param count, train-state bytes, per save the seconds the training loop is blocked
(`RunCheckpointer.save` returning: copy to host + small items) and the seconds until the checkpoint is committed
(async write finished), the size on disk, and the time to restore the state into its shardings. Saves run on the
devices of this machine (CPU: set XLA_FLAGS=--xla_force_host_platform_device_count=N for N fake devices).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax.checkpoint import RunCheckpointer  # noqa: E402
from llava_jax.config import load_config  # noqa: E402
from llava_jax.data.pipeline import make_train_iterator  # noqa: E402
from llava_jax.sharding import make_mesh  # noqa: E402
from llava_jax.train.state import make_train_setup  # noqa: E402


def model_overrides(hidden: int, layers: int) -> list[str]:
    return [
        "model.vision.image_size=112", "model.vision.patch_size=14", "model.vision.hidden_size=384",
        "model.vision.num_layers=6", "model.vision.num_heads=6", "model.vision.mlp_dim=1536",
        "model.decoder.vocab_size=32000", f"model.decoder.hidden_size={hidden}", f"model.decoder.num_layers={layers}",
        f"model.decoder.num_heads={hidden // 64}", f"model.decoder.mlp_dim={4 * hidden}", "model.image_token_id=31999",
        "data.max_length=128", "data.synthetic_size=64", "data.num_threads=0", "data.prefetch=0",
        "train.stage=full", "train.batch_size=8", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
    ]


def disk_bytes(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])


def tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def with_dense_moments(state, shardings):
    """The state with random Adam moments: a trained model's moments are dense numbers, while the zeros of a fresh
    state would compress to almost nothing on disk and flatter the size."""
    leaves, treedef = jax.tree_util.tree_flatten(state.opt_state)
    keys = list(jax.random.split(jax.random.PRNGKey(1), len(leaves)))

    def fill(opt_state):
        return treedef.unflatten([jax.random.normal(key, leaf.shape, leaf.dtype) * 1e-3
                                  if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
                                  for key, leaf in zip(keys, jax.tree_util.tree_leaves(opt_state))])
    return state.replace(opt_state=jax.jit(fill, out_shardings=shardings.opt_state)(state.opt_state))


def time_saves(checkpointer: RunCheckpointer, state, data, config, count: int) -> list[dict]:
    """Saves steps 1..count, each committed before the next; seconds blocked and seconds until committed."""
    saves = []
    for step in range(1, count + 1):
        start = time.perf_counter()
        blocking = checkpointer.save(step, state, data, config)
        checkpointer.manager.wait_until_finished()
        saves.append({"blocking_s": round(blocking, 3), "committed_s": round(time.perf_counter() - start, 3)})
    return saves


def time_restore(checkpointer: RunCheckpointer, setup, config, state) -> tuple[float, bool]:
    """Seconds to restore the newest checkpoint into the state's shardings, and whether it is bit-identical."""
    start = time.perf_counter()
    restored = jax.block_until_ready(checkpointer.restore(setup.abstract_state, make_train_iterator(config),
                                                          config).state)
    seconds = time.perf_counter() - start
    identical = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(restored)),
                                                         jax.tree_util.tree_leaves(jax.device_get(state))))
    return seconds, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768, help="decoder hidden size")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--saves", type=int, default=3, help="saves to time (the first includes set-up costs)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    args = parser.parse_args()

    config = load_config(None, model_overrides(args.hidden, args.layers))
    setup = make_train_setup(config, make_mesh(config.mesh))
    state = jax.block_until_ready(with_dense_moments(setup.init_state(config.train.seed), setup.state_shardings))
    root = args.dir or tempfile.mkdtemp(prefix="checkpoint_bench_")
    checkpointer = RunCheckpointer(os.path.join(root, "checkpoints"), config.checkpoint)
    saves = time_saves(checkpointer, state, make_train_iterator(config), config, args.saves)
    size = disk_bytes(os.path.join(root, "checkpoints", str(args.saves)))
    restore_s, identical = time_restore(checkpointer, setup, config, state)
    checkpointer.close()
    if args.dir is None:
        shutil.rmtree(root)

    warm = saves[1:] or saves          # the first save also sets up Orbax's threads and directories
    committed_s = float(np.median([s["committed_s"] for s in warm]))
    print(json.dumps({
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "params": int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.params))),
        "state_bytes": tree_bytes(state), "saves": saves,
        "median_blocking_s": round(float(np.median([s["blocking_s"] for s in warm])), 3),
        "median_committed_s": round(committed_s, 3), "size_on_disk_bytes": size,
        "write_gb_per_s": round(size / 1e9 / committed_s, 3), "restore_s": round(restore_s, 3),
        "restored_bit_identical": identical,
    }, indent=1))


if __name__ == "__main__":
    main()
