"""Standard benchmark tasks (VQAv2, GQA, TextVQA, POPE, MME, ScienceQA-IMG, MMMU, MMBench): each reads the files a
user downloads for it and scores predictions as the official scorer does (llava_jax.tasks.base).

Public surface: `TASK_NAMES` and `get_task(name) -> Task`.
"""
from __future__ import annotations

import importlib

from llava_jax.tasks.base import Task

TASK_NAMES = ("vqav2", "gqa", "textvqa", "pope", "mme", "scienceqa", "mmmu", "mmbench")


def get_task(name: str) -> Task:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"llava_jax.tasks.{name}").TASK
