"""The host memory allocator for training: TCMalloc when installed, else glibc malloc backed by huge pages.

Public surface: `malloc_env(env)`, `reexec_with_host_malloc()` (train.py and benchmarks/train_step.py call it first).

XLA's CPU runtime allocates each step's temporaries afresh (330 MB for configs/bench_cpu.yaml). Under glibc's
defaults such blocks are fresh mmaps, so every step faults in and zeroes them 4 KiB at a time (81k page faults,
~15 % of the bench step's CPU time). TCMalloc (`libtcmalloc_minimal.so.4` or `libtcmalloc.so.4`, Debian/Ubuntu
packages libtcmalloc-minimal4 / libgoogle-perftools4) keeps freed blocks for reuse: no faults at all,
and the bench step runs 0-10 % faster than with the glibc fallback, `glibc.malloc.hugetlb=1`, which backs large blocks
with transparent huge pages (2 MiB; ~500 faults per step, still zeroed by the kernel). The allocator is chosen when a
process starts (LD_PRELOAD, GLIBC_TUNABLES), hence the re-execution. It changes speed only, never results. An
allocator already in LD_PRELOAD or a glibc.malloc.hugetlb the user set wins; LLAVA_JAX_KEEP_MALLOC=1 opts out.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from typing import Optional

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
# TCMalloc prints a warning for every allocation above 1 GiB by default (checkpoint buffers of big models).
TCMALLOC_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
OPT_OUT_ENV = "LLAVA_JAX_KEEP_MALLOC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _find_tcmalloc() -> Optional[str]:
    """The soname of an installed TCMalloc (found through the dynamic linker's cache), or None."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


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


def _named_tunables(env: Mapping[str, str]) -> set[str]:
    return {item.split("=")[0] for item in env.get("GLIBC_TUNABLES", "").split(":") if item}


def malloc_env(env: Mapping[str, str]) -> Optional[dict[str, str]]:
    """`env` with TCMalloc preloaded, or else the glibc huge-page tunable added; None when there is nothing to
    change: opted out, the user's own choice (an allocator in LD_PRELOAD, glibc.malloc.hugetlb in GLIBC_TUNABLES),
    or neither TCMalloc nor a glibc + THP that would use the tunable."""
    preload = env.get("LD_PRELOAD", "")
    if (env.get(OPT_OUT_ENV) or any(allocator in preload for allocator in PRELOADED_ALLOCATORS)
            or HUGETLB_TUNABLE.split("=")[0] in _named_tunables(env)):
        return None
    tcmalloc = _find_tcmalloc()
    if tcmalloc is not None:
        return {**TCMALLOC_ENV, **env, "LD_PRELOAD": ":".join(filter(None, [tcmalloc, preload]))}
    if not (_glibc_has_hugetlb_tunable() and _thp_enabled()):
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), HUGETLB_TUNABLE]))}


def reexec_with_host_malloc() -> None:
    """Re-executes this Python command line (same interpreter, flags and arguments) with `malloc_env`, once;
    returns normally when it is already in effect or does not apply. Call it before any work starts."""
    env = malloc_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
