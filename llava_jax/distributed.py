"""Multi-host start-up. Public surface: `maybe_initialize_distributed()`; call it before anything touches devices.

Initialises `jax.distributed` when the environment says this is one of several processes:
  - explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any platform; CPU uses gloo collectives);
  - TPU pod slices (TPU_WORKER_HOSTNAMES lists several hosts) and SLURM / Open MPI jobs with several tasks,
    where JAX discovers the cluster itself.
"""
from __future__ import annotations

import os

import jax


def _cluster_size_from_env(env) -> int:
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return len(hosts)


def maybe_initialize_distributed() -> bool:
    """Returns True if this process joined a multi-process run."""
    env = os.environ
    if jax.distributed.is_initialized():
        return True
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # only affects CPU devices
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]),
                                   initialization_timeout=int(env.get("JAX_INIT_TIMEOUT_S", "300")))
        return True
    if _cluster_size_from_env(env) > 1:
        jax.distributed.initialize()
        return True
    return False
