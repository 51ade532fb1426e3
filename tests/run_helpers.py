"""A tiny training run on disk (WORKDIR/config.yaml + one Orbax checkpoint) for the generate / evaluate CLIs."""
import os

import numpy as np
from PIL import Image

from llava_jax.checkpoint import CHECKPOINT_DIR, RunCheckpointer
from llava_jax.config import load_config, save_config
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.sharding import make_mesh
from llava_jax.train.state import make_train_setup
from tests.helpers import TINY_MODEL

TINY_RUN = TINY_MODEL + ["data.source=synthetic", "data.synthetic_size=16", "data.synthetic_eval_size=4",
                         "train.batch_size=2", "data.num_threads=0", "data.prefetch=0"]


def write_tiny_run(workdir: str, step: int = 3, seed: int = 0):
    """Saves a freshly initialised tiny synthetic-data run as checkpoint `step`; returns (config, params)."""
    config = load_config(None, TINY_RUN)
    setup = make_train_setup(config, make_mesh(config.mesh))
    state = setup.init_state(seed)
    os.makedirs(workdir, exist_ok=True)
    save_config(config, os.path.join(workdir, "config.yaml"))
    checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint)
    checkpointer.save(step, state, make_train_iterator(config), config)
    checkpointer.close()
    return config, state.params


def write_image(path: str, size: int = 40) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
