"""The glibc malloc tunables re-execution (llava_jax.host_malloc): which environment it builds, and that a real
process comes back with them set and its arguments intact."""
import os
import subprocess
import sys

import pytest

from llava_jax import host_malloc

HUGETLB = "glibc.malloc.hugetlb=1"


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(host_malloc, "_glibc_has_hugetlb_tunable", lambda: True)
    monkeypatch.setattr(host_malloc, "_thp_enabled", lambda: True)


def test_adds_the_tunable_and_keeps_the_rest_of_the_environment(supported):
    env = host_malloc.malloc_tunables_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGETLB}


def test_appends_to_a_users_other_tunables(supported):
    env = host_malloc.malloc_tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB}"


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},       # the user's choice wins
                                 {"GLIBC_TUNABLES": f"glibc.malloc.tcache_count=0:{HUGETLB}"},   # already set
                                 {host_malloc.OPT_OUT_ENV: "1"}])
def test_leaves_the_environment_alone(supported, env):
    assert host_malloc.malloc_tunables_env(env) is None


@pytest.mark.parametrize("missing", ["_glibc_has_hugetlb_tunable", "_thp_enabled"])
def test_does_nothing_without_glibc_support_or_transparent_huge_pages(supported, monkeypatch, missing):
    monkeypatch.setattr(host_malloc, missing, lambda: False)
    assert host_malloc.malloc_tunables_env({}) is None


@pytest.mark.skipif(not (host_malloc._glibc_has_hugetlb_tunable() and host_malloc._thp_enabled()),
                    reason="needs glibc >= 2.35 and transparent huge pages")
def test_a_process_reexecutes_once_with_the_tunable_and_the_same_arguments():
    code = ("import os, sys; from llava_jax.host_malloc import reexec_with_malloc_tunables; "
            "print('start', flush=True); reexec_with_malloc_tunables(); "
            "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.OPT_OUT_ENV)}
    out = subprocess.run([sys.executable, "-c", code, "a", "--b"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    assert out[:3] == ["start", "start", f"{HUGETLB} ['a', '--b']"]
