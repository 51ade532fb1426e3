"""The host allocator re-execution (llava_jax.host_malloc): which environment it builds (TCMalloc preloaded, else
the glibc huge-page tunable), and that a real process comes back with it set and its arguments intact."""
import os
import subprocess
import sys

import pytest

from llava_jax import host_malloc

HUGETLB = host_malloc.HUGETLB_TUNABLE
TCMALLOC = "libtcmalloc_minimal.so.4"


@pytest.fixture
def glibc_only(monkeypatch):
    monkeypatch.setattr(host_malloc, "_find_tcmalloc", lambda: None)
    monkeypatch.setattr(host_malloc, "_glibc_has_hugetlb_tunable", lambda: True)
    monkeypatch.setattr(host_malloc, "_thp_enabled", lambda: True)


@pytest.fixture
def with_tcmalloc(glibc_only, monkeypatch):
    monkeypatch.setattr(host_malloc, "_find_tcmalloc", lambda: TCMALLOC)


def test_preloads_tcmalloc_when_installed_and_keeps_the_rest_of_the_environment(with_tcmalloc):
    env = host_malloc.malloc_env({"PATH": "/bin", "LD_PRELOAD": "libother.so"})
    assert env == {"PATH": "/bin", "LD_PRELOAD": f"{TCMALLOC}:libother.so", **host_malloc.TCMALLOC_ENV}


def test_a_users_tcmalloc_settings_win(with_tcmalloc):
    threshold = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
    assert host_malloc.malloc_env({threshold: "5"})[threshold] == "5"


def test_falls_back_to_the_glibc_tunable_and_appends_it_to_a_users_other_tunables(glibc_only):
    assert host_malloc.malloc_env({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGETLB}
    env = host_malloc.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB}"


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},       # the user's choice wins
                                 {"GLIBC_TUNABLES": f"glibc.malloc.tcache_count=0:{HUGETLB}"},   # already set
                                 {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"},           # the user's allocator
                                 {"LD_PRELOAD": TCMALLOC},                               # already preloaded
                                 {host_malloc.OPT_OUT_ENV: "1"}])
def test_leaves_the_environment_alone(with_tcmalloc, env):
    assert host_malloc.malloc_env(env) is None


@pytest.mark.parametrize("missing", ["_glibc_has_hugetlb_tunable", "_thp_enabled"])
def test_does_nothing_without_tcmalloc_glibc_support_or_transparent_huge_pages(glibc_only, monkeypatch, missing):
    monkeypatch.setattr(host_malloc, missing, lambda: False)
    assert host_malloc.malloc_env({}) is None


@pytest.mark.skipif(host_malloc.malloc_env({}) is None, reason="neither TCMalloc nor glibc >= 2.35 with THP")
def test_a_process_reexecutes_once_with_the_allocator_and_the_same_arguments():
    code = ("import os, sys; from llava_jax.host_malloc import reexec_with_host_malloc; "
            "print('start', flush=True); reexec_with_host_malloc(); "
            "print(os.environ.get('LD_PRELOAD', ''), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", host_malloc.OPT_OUT_ENV)}
    expected = host_malloc.malloc_env(env)
    out = subprocess.run([sys.executable, "-c", code, "a", "--b"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    preload, tunables = expected.get("LD_PRELOAD", ""), expected.get("GLIBC_TUNABLES", "")
    assert out[:3] == ["start", "start", f"{preload} {tunables} ['a', '--b']"]
    assert preload or tunables == HUGETLB
