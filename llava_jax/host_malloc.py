"""Host malloc settings for training on CPU.

XLA's CPU runtime allocates each step's temporaries afresh (330 MB for configs/bench_cpu.yaml). Under glibc's
defaults such blocks are fresh mmaps, so every step faults in and zeroes them 4 KiB at a time: 81k page faults
and ~15 % of the bench step's CPU time. `glibc.malloc.hugetlb=1` makes malloc back large blocks with transparent
huge pages (2 MiB; needs THP mode `madvise` or `always`): ~640 faults per step, and the bench step runs 0.55 ->
0.50 s (`python benchmarks/train_step.py`). glibc reads its tunables only when a process starts, hence the
re-execution. It changes speed only, never results. Set LLAVA_JAX_KEEP_MALLOC=1 to opt out.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
OPT_OUT_ENV = "LLAVA_JAX_KEEP_MALLOC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_has_hugetlb_tunable() -> bool:
    """glibc >= 2.35 (where glibc.malloc.hugetlb appeared) on Linux."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):   # not glibc (macOS, musl, Windows)
        return False
    return name == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)


def _thp_enabled() -> bool:
    try:
        with open(THP_MODE_FILE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def malloc_tunables_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with MALLOC_TUNABLES added to GLIBC_TUNABLES, or None when there is nothing to change: opted out,
    every tunable already named there (a user's own value wins), or no glibc/THP that would use them."""
    current = env.get("GLIBC_TUNABLES", "")
    named = {item.split("=")[0] for item in current.split(":") if item}
    missing = [tunable for tunable in MALLOC_TUNABLES if tunable.split("=")[0] not in named]
    if env.get(OPT_OUT_ENV) or not missing or not (_glibc_has_hugetlb_tunable() and _thp_enabled()):
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [current, *missing]))}


def reexec_with_malloc_tunables() -> None:
    """Re-executes this Python command line (same interpreter, flags and arguments) with MALLOC_TUNABLES set, once;
    returns normally when they are already in effect or do not apply. Call it before any work starts."""
    env = malloc_tunables_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
