"""The training loop: set-up, compile once, then data -> global batch -> train step -> metrics.

Public surface: `train(config, workdir) -> dict` (summary of the run).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from llava_jax.config import Config, save_config
from llava_jax.data.bad_samples import BadSampleMonitor
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.distributed import maybe_initialize_distributed
from llava_jax.sharding import format_sharding_report, host_batch_to_global, make_mesh, sharding_report
from llava_jax.train.guards import check_step_metrics
from llava_jax.train.flops import peak_flops, train_step_flops
from llava_jax.train.metrics import MetricsLogger
from llava_jax.train.state import make_train_setup
from llava_jax.train.step import compile_train_step, resolve_batch_layout


def train(config: Config, workdir: str) -> dict:
    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.mesh)
    resolve_batch_layout(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        save_config(config, os.path.join(workdir, "config.yaml"))
    logger = MetricsLogger(workdir, config.train.steps, enabled=is_main)
    setup = make_train_setup(config, mesh)
    logger.message(format_sharding_report(mesh, sharding_report(setup.abstract_state.params,
                                                                setup.state_shardings.params)))
    logger.message(f"frozen: {', '.join(setup.frozen) or 'nothing'}")
    state = setup.init_state(config.train.seed)
    data = make_train_iterator(config, jax.process_index(), jax.process_count())
    bad_samples = BadSampleMonitor(config)

    compile_start = time.time()
    train_step = compile_train_step(setup)
    compile_time = time.time() - compile_start
    logger.message(f"compiled the train step in {compile_time:.1f}s")

    step_flops = train_step_flops(config, setup.frozen)
    device_peak = peak_flops(jax.devices()[0].device_kind)
    tokens_per_step = config.train.batch_size * config.data.max_length
    start_step = int(jax.device_get(state.step))
    logger.start(start_step)
    consecutive_bad, last = 0, {}
    for step in range(start_step + 1, config.train.steps + 1):
        data_start = time.time()
        host_batch = next(data)
        bad_samples.update(host_batch)
        batch = host_batch_to_global(host_batch, mesh)
        step_start = time.time()
        state, metrics = train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step_end = time.time()
        consecutive_bad = check_step_metrics(metrics, step, consecutive_bad, config.train.max_bad_steps)
        step_time, data_wait = step_end - step_start, step_start - data_start
        flops_per_s = step_flops / step_time
        last = {**metrics, "step_time_s": step_time, "data_wait_s": data_wait, "compile_time_s": compile_time,
                "tokens_per_s": tokens_per_step / (step_time + data_wait), "flops_per_s": flops_per_s,
                "bad_steps": int(jax.device_get(state.bad_steps)),
                **{f"bad_samples/{k}": v for k, v in bad_samples.counts().items()}}
        if device_peak:
            last["mfu"] = flops_per_s / (device_peak * jax.device_count())
        if step % config.train.log_every == 0 or step == config.train.steps:
            logger.write(step, last)
        logger.progress(step, metrics["loss"], last["tokens_per_s"])
    logger.close()
    return {"final_step": config.train.steps, "compile_time_s": compile_time,
            "final_loss": last.get("loss", float(np.nan)), "state": state}
