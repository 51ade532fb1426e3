"""Runs on disk for tests: `train.py` subprocesses (TrainProcess) and a tiny saved run for the generate / evaluate
CLIs (write_tiny_run)."""
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from llava_jax.checkpoint import CHECKPOINT_DIR, RunCheckpointer
from llava_jax.config import load_config, save_config
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.sharding import make_mesh
from llava_jax.train.state import make_train_setup
from tests.helpers import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 300
POLL_S = 0.01
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


class TrainProcess:
    """`python train.py --config CONFIG --workdir WORKDIR [--set ...]`; its output goes to WORKDIR.<n>.log for
    the n-th process started on that workdir."""

    def __init__(self, config_path: str, workdir: str, *overrides: str, env: dict | None = None):
        self.workdir = workdir
        self.log_path = next(path for path in (f"{workdir}.{n}.log" for n in range(100)) if not os.path.exists(path))
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
               "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
               **(env or {})}
        command = [sys.executable, "train.py", "--config", config_path, "--workdir", workdir]
        command += ["--set", *overrides] if overrides else []
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait(self, expected_status: int = 0) -> str:
        try:
            status = self.process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"train.py did not finish in {RUN_TIMEOUT_S}s:\n{self.output()[-3000:]}")
        assert status == expected_status, f"exit status {status}:\n{self.output()[-3000:]}"
        return self.output()

    def wait_until(self, condition, what: str) -> None:
        deadline = time.time() + RUN_TIMEOUT_S
        while not condition():
            assert self.process.poll() is None, f"train.py exited before {what}:\n{self.output()[-3000:]}"
            assert time.time() < deadline, f"no {what} after {RUN_TIMEOUT_S}s:\n{self.output()[-3000:]}"
            time.sleep(POLL_S)

    def signal(self, signum: int) -> None:
        assert self.process.poll() is None, f"train.py finished before the signal:\n{self.output()[-3000:]}"
        os.kill(self.process.pid, signum)
