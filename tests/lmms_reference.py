"""Test-only: lmms-eval's task utilities (lmms-eval==0.7.3, installed with --no-deps by scripts/setup.sh --test) as
independent references for the benchmark scorers. `lmms_module(relative_path)` loads one file of
lmms_eval/tasks/ without executing the package's __init__ (which needs lmms-eval's heavy dependencies); modules it
imports that are not installed (loguru, datasets, openai, ...) are replaced by empty stand-ins, and its
`lmms_eval.*` imports are loaded the same way."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

import pytest

_STUBBED = ("loguru", "datasets", "openai", "requests", "tqdm", "pandas", "lmms_eval.verifiers",
            "lmms_eval.verifiers.openai")


_ROOT: list[str] = []


def _root() -> str:
    if not _ROOT:
        spec = importlib.util.find_spec("lmms_eval")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("lmms-eval is not installed (scripts/setup.sh --test installs it)")
        _ROOT.append(list(spec.submodule_search_locations)[0])
    return _ROOT[0]


class _Anything(types.ModuleType):
    """A stand-in module: every attribute is a callable no-op stand-in (loggers, decorators, classes)."""
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _anything


def _anything(*args, **kwargs):
    return logging.getLogger("lmms_eval_stub") if not args else args[0]


def _package(name: str, path: str) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module


def _install_stubs() -> list[str]:
    """Stand-ins for the modules in _STUBBED that are not installed; returns their names (removed again once the
    lmms-eval file is loaded, so e.g. pyarrow never mistakes a stand-in for pandas)."""
    installed = []
    for name in _STUBBED:
        if name in sys.modules:
            continue
        try:
            if not name.startswith("lmms_eval"):
                importlib.import_module(name)
                continue
        except ImportError:
            pass
        stub = _Anything(name)
        if name == "loguru":
            stub.logger = logging.getLogger("lmms_eval_stub")
        sys.modules[name] = stub
        installed.append(name)
    return installed


def lmms_module(relative_path: str) -> types.ModuleType:
    """lmms_eval/tasks/<relative_path> (e.g. "pope/utils.py") as a module named lmms_eval.tasks.<dotted path>."""
    root = _root()
    _package("lmms_eval", root)
    _package("lmms_eval.tasks", os.path.join(root, "tasks"))
    parts = relative_path[:-len(".py")].split("/")
    for depth in range(1, len(parts)):
        _package("lmms_eval.tasks." + ".".join(parts[:depth]), os.path.join(root, "tasks", *parts[:depth]))
    name = "lmms_eval.tasks." + ".".join(parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tasks", relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module

    class _Finder:   # resolves the file's own lmms_eval.tasks.* imports through lmms_module
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname.startswith("lmms_eval.tasks.") and fullname not in sys.modules:
                candidate = os.path.join(root, "tasks", *fullname.split(".")[2:]) + ".py"
                if os.path.exists(candidate):
                    return importlib.util.spec_from_file_location(fullname, candidate)
            return None
    stubs = _install_stubs()
    sys.meta_path.insert(0, _Finder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.meta_path.remove(_Finder)
        for name in stubs:
            del sys.modules[name]
    return module
