"""Preemption: finish the current step, save a checkpoint, exit with PREEMPTED_EXIT_CODE; rerunning resumes.

Public surface: `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "temporary failure, run the same command again"),
`SHARED_FLAG_EVERY`, `PreemptionWatch()` with `stop_requested(step)` (call it after every step, on every process)
and `close()`.

One process: SIGTERM sets a flag that the loop reads after the step in flight (no device work). Several processes:
JAX's preemption service (on by default once jax.distributed is initialised; it listens for SIGTERM and the TPU
maintenance notice) picks one step at which every process stops (`multihost_utils.reached_preemption_sync_point`,
a lookup in the coordination service, not a device collective), so all of them save the same step. Without that
service the processes share their SIGTERM flags with a collective, only every SHARED_FLAG_EVERY steps (a
preempted multi-host run then saves up to that many steps after the signal; the grace period of a preemption,
~30 s on TPU VMs, covers that for any step time under a few seconds).
"""
from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 75
SHARED_FLAG_EVERY = 10


class PreemptionWatch:
    def __init__(self):
        self._signalled = False
        self._use_sync_point = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        # JAX's service installs its own SIGTERM notifier; a Python handler would replace it.
        self._previous_handler = None if self._use_sync_point else signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def stop_requested(self, step: int) -> bool:
        """True once training should save and stop after `step` (the same answer on every process)."""
        if self._use_sync_point:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            return step % SHARED_FLAG_EVERY == 0 and bool(
                np.any(multihost_utils.process_allgather(np.int32(self._signalled))))
        return self._signalled

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
