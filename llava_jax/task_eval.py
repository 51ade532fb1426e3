"""A benchmark task run with a model: items -> batched greedy answers, sharded over the mesh and the processes ->
predictions JSONL (resumable) -> the task's official summary.

Public surface: `run_task(config, params, task, data, out_dir, ...) -> dict`, `score_predictions(task, data,
predictions_path, ...) -> dict`, `evaluation_config` and `TaskRun` (what a run writes in `out_dir`: predictions.jsonl,
predictions_blind.jsonl, skipped.jsonl, summary.json; submission.json for a split only the benchmark's server
scores, e.g. VQAv2 test-dev).

How the work is spread: the pending items (those without a prediction in out_dir) are ordered by prompt length
(tokens, so similar lengths share a batch and a compiled shape: prompts pad to a multiple of 16) and cut into
global batches of `batch_size` rows (rounded up to the mesh's data x fsdp shards and the process count). Every
process encodes its own contiguous share of each batch (tokenizing, reading images) and the batch runs as one
sharded program (`generate.generate_shares`); the answers are gathered on every process and process 0 appends them
to predictions.jsonl after each batch, so a rerun picks up where a run stopped (out_dir must then be on a file
system every process sees). An item whose prompt or image cannot be used (`data.bad_samples.REASONS`) is skipped,
counted by reason in the summary and listed in skipped.jsonl; it scores as missing.
Evaluation lifts data.max_images to the task's most images per item and data.max_length to what the decoder's
positions leave after the answer, so long multi-image prompts (MMMU) are not refused by a training-time limit.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from etils import epath
import jax

from llava_jax.config import Config
from llava_jax.data.bad_samples import REASONS, BadSample
from llava_jax.data.examples import Example, ExampleEncoder
from llava_jax.data.templates import answer_end_id, get_template
from llava_jax.data.tokenizers import make_tokenizer
from llava_jax.generate import batch_shards, generate_shares, params_mesh
from llava_jax.tasks import get_task
from llava_jax.tasks.base import ServerScored, Task, TaskItem, read_predictions

PREDICTIONS, BLIND_PREDICTIONS, SKIPPED, SUMMARY = ("predictions.jsonl", "predictions_blind.jsonl", "skipped.jsonl",
                                                    "summary.json")
PADDING = -1          # row id of a padding row
OK = -1               # reason code of a row that was encoded


@dataclasses.dataclass
class TaskRun:
    out_dir: epath.Path

    def path(self, name: str) -> epath.Path:
        return self.out_dir / name

    def done(self, name: str) -> dict[str, str]:
        path = self.path(name)
        return read_predictions(str(path)) if path.exists() and path.read_text().strip() else {}

    def append(self, name: str, records: Sequence[dict]) -> None:
        if records and jax.process_index() == 0:
            with self.path(name).open("a") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)


def evaluation_config(config: Config, items: Sequence[TaskItem], max_new_tokens: int) -> Config:
    """`config` with data.max_images >= the items' most images and data.max_length = the decoder's positions less
    the answer (no packing, no sample-length cap)."""
    most_images = max([len(item.images) for item in items] + [config.data.max_images])
    length = config.model.decoder.max_position_embeddings - max_new_tokens
    if length < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"model.decoder.max_position_embeddings={config.model.decoder.max_position_embeddings}")
    data = dataclasses.replace(config.data, max_images=most_images, max_length=length, max_sample_length=None,
                               pack=False)
    return dataclasses.replace(config, data=data)


def _example(item: TaskItem) -> Example:
    return Example(id=item.question_id, turns=[("user", item.prompt), ("assistant", "(answer)")],
                   images=list(item.images))


def _prompt_length(encoder: ExampleEncoder, item: TaskItem) -> int:
    try:
        return len(encoder.tokens(_example(item))[0])
    except BadSample:
        return 0          # encoded (and skipped) with the shortest prompts


class _Progress:
    """One status line on stderr (process 0): items done, rate and ETA."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled and jax.process_index() == 0
        self.start, self.done = time.perf_counter(), 0

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} items, {rate:.1f}/s, "
                         f"ETA {int(eta) // 60}:{int(eta) % 60:02d}  ")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _local_rows(global_rows: int) -> slice:
    share = global_rows // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def _predict(config: Config, params, items: Sequence[TaskItem], run: TaskRun, name: str, batch_size: int,
             max_new_tokens: int, blind: bool, progress: bool) -> None:
    """Appends the answers of the items without one in `name` (and the items skipped) to the run's files."""
    done = run.done(name)
    pending = [item for item in items if item.question_id not in done]
    if not pending:
        return
    tokenizer = make_tokenizer(config.data, config.model)
    encoder = ExampleEncoder(config, tokenizer)
    stop_id = answer_end_id(get_template(config.data.template), tokenizer)
    filler = encoder.eval_example(Example(id="padding", turns=[("user", "?"), ("assistant", "(answer)")]))
    pending.sort(key=lambda item: _prompt_length(encoder, item))
    mesh = params_mesh(params)
    step = int(np.lcm(batch_shards(mesh), jax.process_count()))
    global_rows = -(-batch_size // step) * step
    bar = _Progress(f"{name[:-len('.jsonl')]}", len(pending), progress)
    for start in range(0, len(pending), global_rows):
        batch = pending[start:start + global_rows]
        rows, infos = [], []
        for offset in range(global_rows)[_local_rows(global_rows)]:
            if offset >= len(batch):
                rows.append(filler)
                infos.append((PADDING, OK))
                continue
            try:
                rows.append(encoder.eval_example(_example(batch[offset])))
                infos.append((start + offset, OK))
            except BadSample as bad:
                rows.append(filler)
                infos.append((start + offset, REASONS.index(bad.reason)))
        pixels = np.stack([row["pixel_values"] for row in rows])
        if blind:
            pixels = np.zeros_like(pixels)
        feature_ids = ([row.get("image_feature_ids", np.zeros(0, np.int32)) for row in rows]
                       if config.model.anyres.enabled else None)
        row_infos, tokens = generate_shares(
            config.model, params, mesh, [row["prompt_ids"] for row in rows], pixels,
            np.stack([row["image_mask"] for row in rows]), max_new_tokens, stop_id, tokenizer.pad_id,
            np.array(infos, np.int32), image_feature_ids_list=feature_ids)
        answers, skipped = [], []
        for (index, reason), row_tokens in zip(row_infos.tolist(), tokens):
            if index == PADDING:
                continue
            item = pending[index]
            if reason != OK:
                skipped.append({"question_id": item.question_id, "reason": REASONS[reason]})
                continue
            row_tokens = row_tokens.tolist()
            row_tokens = row_tokens[:row_tokens.index(stop_id)] if stop_id in row_tokens else row_tokens
            answers.append({"question_id": item.question_id, "answer": tokenizer.decode(row_tokens).strip()})
        run.append(name, answers)
        if not blind:
            run.append(SKIPPED, skipped)
        bar.update(len(batch))


def _skipped_counts(run: TaskRun) -> dict[str, int]:
    path = run.path(SKIPPED)
    if not path.exists():
        return {}
    reasons = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            reasons[record["question_id"]] = record["reason"]
    return dict(collections.Counter(reasons.values()))


def _summary(task: Task, items: Sequence[TaskItem], predictions: dict[str, str], run: TaskRun,
             submission_name: str = "submission.json") -> dict:
    """The task's scores, or for a server-scored split the upload file written into the run (`submission`)."""
    try:
        return task.score(items, predictions)
    except ServerScored as server:
        if jax.process_index() == 0:
            run.path(submission_name).write_text(json.dumps(task.submission(items, predictions)))
        return {"task": task.name, "n": len(items), "missing": sum(i.question_id not in predictions for i in items),
                "submission": str(run.path(submission_name)), "scored_by": str(server)}


def run_task(config: Config, params: Any, task: str, data: str, out_dir: str, limit: Optional[int] = None,
             prompt_suffix: Optional[str] = None, batch_size: int = 32, max_new_tokens: int = 128,
             blind: bool = False, progress: bool = True) -> dict:
    """Predicts the task's items (`limit`: the first N) into `out_dir` and returns the summary (also written to
    out_dir/summary.json by process 0): the task's own scores, plus `skipped` (reason -> count), `prompt_suffix`,
    `seconds`, and with `blind` the same scores on blank images under "blind" (every pixel at the normalisation
    mean: how much of the score the image explains)."""
    task_obj = get_task(task)
    items = task_obj.load(data, prompt_suffix, limit)
    if not items:
        raise ValueError(f"task {task}: {data} holds no items")
    config = evaluation_config(config, items, max_new_tokens)
    run = TaskRun(epath.Path(out_dir))
    if jax.process_index() == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _predict(config, params, items, run, PREDICTIONS, batch_size, max_new_tokens, False, progress)
    summary = _summary(task_obj, items, run.done(PREDICTIONS), run)
    summary.update(skipped=_skipped_counts(run), prompt_suffix=task_obj.suffix(prompt_suffix))
    if blind:
        _predict(config, params, items, run, BLIND_PREDICTIONS, batch_size, max_new_tokens, True, progress)
        summary["blind"] = _summary(task_obj, items, run.done(BLIND_PREDICTIONS), run, "submission_blind.json")
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if jax.process_index() == 0:
        run.path(SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def score_predictions(task: str, data: str, predictions_path: str, prompt_suffix: Optional[str] = None) -> dict:
    """The task's summary of existing predictions (JSON or JSONL records with question_id and answer, or LLaVA's
    text), e.g. ones produced by another toolkit."""
    task_obj = get_task(task)
    return task_obj.score(task_obj.load(data, prompt_suffix), read_predictions(predictions_path))
