"""The training loop: set-up, restore or initialise, compile once, then data -> global batch -> train step ->
metrics -> periodic checkpoint, until train.steps or a preemption.

Public surface: `train(config, workdir) -> dict` (summary of the run; "preempted" is True when a preemption
stopped it after saving, and the caller should exit with `preemption.PREEMPTED_EXIT_CODE`).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from llava_jax.checkpoint import CHECKPOINT_DIR, RunCheckpointer, restore_or_init
from llava_jax.config import Config, save_config
from llava_jax.data.bad_samples import BadSampleMonitor
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.evaluate import evaluate
from llava_jax.distributed import maybe_initialize_distributed
from llava_jax.sharding import format_sharding_report, host_batch_to_global, make_mesh, sharding_report
from llava_jax.train.guards import check_step_metrics
from llava_jax.train.flops import peak_flops, train_step_flops
from llava_jax.train.metrics import MetricsLogger
from llava_jax.train.preemption import PREEMPTED_EXIT_CODE, PreemptionWatch
from llava_jax.train.state import make_train_setup
from llava_jax.train.step import compile_train_step, resolve_batch_layout


def train(config: Config, workdir: str) -> dict:
    """Trains up to train.steps from the newest checkpoint in WORKDIR/checkpoints (or checkpoint.load_dir, or
    train.init_from's params, or scratch); saves every checkpoint.every_steps, at the end and on preemption."""
    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.mesh)
    resolve_batch_layout(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        save_config(config, os.path.join(workdir, "config.yaml"))
    setup = make_train_setup(config, mesh)
    data = make_train_iterator(config, jax.process_index(), jax.process_count())
    checkpointer = RunCheckpointer(os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint)
    state, restore_report = restore_or_init(setup, data, checkpointer)
    start_step = int(jax.device_get(state.step))
    logger = MetricsLogger(workdir, config.train.steps, enabled=is_main, start_step=start_step)
    logger.message(format_sharding_report(mesh, sharding_report(setup.abstract_state.params,
                                                                setup.state_shardings.params)))
    logger.message(f"frozen: {', '.join(setup.frozen) or 'nothing'}")
    for line in restore_report:
        logger.message(line)
    bad_samples = BadSampleMonitor(config)

    compile_start = time.time()
    train_step = compile_train_step(setup)
    compile_time = time.time() - compile_start
    logger.message(f"compiled the train step in {compile_time:.1f}s")

    step_flops = train_step_flops(config, setup.frozen)
    device_peak = peak_flops(jax.devices()[0].device_kind)
    tokens_per_step = config.train.batch_size * config.data.max_length
    logger.start(start_step)
    preemption = PreemptionWatch()
    consecutive_bad, last, step, preempted = 0, {}, start_step, False
    try:
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
            preempted = preemption.stop_requested(step) and step < config.train.steps
            if preempted or step % config.checkpoint.every_steps == 0 or step == config.train.steps:
                last["checkpoint_blocking_s"] = checkpointer.save(step, state, data, config)
            evaluated = bool(config.train.eval_every) and step % config.train.eval_every == 0
            if evaluated:
                scores = evaluate(config, state.params, limit=config.train.eval_limit)
                last.update({f"eval/{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
            if evaluated or step % config.train.log_every == 0 or step == config.train.steps or preempted:
                logger.write(step, last)
            logger.progress(step, metrics["loss"], last["tokens_per_s"])
            if preempted:
                logger.message(f"\npreempted: saved a checkpoint at step {step}; exiting with status "
                               f"{PREEMPTED_EXIT_CODE}, run the same command to resume")
                break
    finally:
        checkpointer.close()   # commits a save still in flight, also when training failed
        data.close()
        preemption.close()
        logger.close()
    return {"final_step": step, "preempted": preempted, "compile_time_s": compile_time,
            "final_loss": last.get("loss", float(np.nan)), "state": state}
