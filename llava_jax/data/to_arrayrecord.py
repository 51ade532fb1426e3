"""Converts a LLaVA JSON / JSONL file and its images into ArrayRecord shards with the images' bytes inline.

Public surface: `convert(json_path, image_root, out_dir, shards=1, progress=True, workers=16, name="train",
writer_options=WRITER_OPTIONS) -> summary dict`, `shard_name(k, num_shards, prefix)` and the command line
    python -m llava_jax.data.to_arrayrecord --json FILE.json|FILE.jsonl [--image-root DIR] --out DIR [--shards N]
(paths local or gs://, through etils.epath). Records keep the source order: shard k of N holds a contiguous range.
--out gets `train-0000k-of-0000N.array_record` (records as `arrayrecord_format.encode_record` writes them: the source
record as it is, the image files' bytes as they are), `ids.txt` (one JSON string per line: each record's example id,
in order), `bad_records.jsonl` (every bad record met: index, id, source "FILE:LINE", reason, detail) and, written
last, `index.json` (format, source, image_root, default_id_prefix, records, shards [{name, start, records}], bad).
Nothing is dropped: a record whose image is missing, empty or unreadable is written with that image marked
unreadable (the reader raises BadSample with its reason); a record that is not a JSON object (or a JSONL line that
is not JSON) is written as {"_not_an_object": value} (plus "_json_error": the parse error) and read as
malformed_record. The summary (records, shards, bytes, bad by reason, the first bad records) is printed as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent import futures
from typing import Any, Iterable, Iterator, Optional

from etils import epath

from llava_jax.data.arrayrecord_format import encode_record
from llava_jax.data.bad_samples import REASONS, BadSample
from llava_jax.data.images import read_image_bytes
from llava_jax.data.llava_records import default_id, example_from_record
from llava_jax.paths import is_remote

INDEX_FILE = "index.json"
IDS_FILE = "ids.txt"
BAD_RECORDS_FILE = "bad_records.jsonl"
FORMAT = "llava-jax-arrayrecord/1"
# Grain reads single records: one record per chunk. snappy: encoded images do not compress (zstd:3, the default,
# spent ~10x the time of snappy on them for nothing) while the JSON headers still shrink.
WRITER_OPTIONS = "group_size:1,snappy"
_FIRST_BAD = 10
_SPACE = re.compile(r"\s*")


def shard_name(k: int, num_shards: int, prefix: str = "train") -> str:
    return f"{prefix}-{k:05d}-of-{num_shards:05d}.array_record"


def _json_list_with_lines(text: str, path: str) -> tuple[list[Any], list[int]]:
    """The records of a JSON list file and the line each starts on. Errors as LlavaJsonSource reports them."""
    decoder, records, lines = json.JSONDecoder(), [], []
    try:
        pos = _SPACE.match(text).end()
        if text[pos:pos + 1] != "[":
            raise ValueError
        pos, line, counted = _SPACE.match(text, pos + 1).end(), 1, 0
        if text[pos:pos + 1] == "]":
            pos += 1
        else:
            while True:
                line, counted = line + text.count("\n", counted, pos), pos
                value, pos = decoder.raw_decode(text, pos)
                records.append(value)
                lines.append(line)
                pos = _SPACE.match(text, pos).end()
                if text[pos:pos + 1] == ",":
                    pos = _SPACE.match(text, pos + 1).end()
                    continue
                if text[pos:pos + 1] != "]":
                    raise ValueError
                pos += 1
                break
        if _SPACE.match(text, pos).end() != len(text):
            raise ValueError
        return records, lines
    except ValueError:
        pass                                      # json.loads names the line and column, as LlavaJsonSource does
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON list of records (or a *.jsonl file), got a {type(value).__name__}")
    raise ValueError(f"{path}: could not locate the records of the JSON list")        # not reached for valid JSON


def _source_entries(json_path: str) -> list[tuple[int, Any, bool]]:
    """(line, record or the line's text, whether it is still text) per record, in order: a JSON list (malformed:
    ValueError with its file, line and column, as LlavaJsonSource says), or *.jsonl (one record per non-empty
    line, parsed by the conversion threads: a parsed record takes several times the memory of its text; a line
    that is not JSON is reported and written as a malformed record instead of stopping the conversion)."""
    text = epath.Path(json_path).read_text(encoding="utf-8")
    if not str(json_path).endswith(".jsonl"):
        records, lines = _json_list_with_lines(text, str(json_path))
        return [(line, value, False) for line, value in zip(lines, records)]
    return [(n, line, True) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse(entry: tuple[int, Any, bool]) -> tuple[int, Any, Optional[str]]:
    """(line, record, None) or, for a JSONL line that is not JSON, (line, None, the parse error)."""
    line, value, is_text = entry
    if not is_text:
        return line, value, None
    try:
        return line, json.loads(value), None
    except json.JSONDecodeError as e:
        return line, None, f"malformed JSON line (column {e.colno}): {e.msg}"


def _read_image(path: epath.Path) -> tuple[Optional[bytes], Optional[str]]:
    """(the file's bytes, None) or (None, "reason: detail") with the reason and detail images.open_image gives."""
    try:
        return read_image_bytes(path), None
    except BadSample as bad:
        return None, str(bad)


def _convert_one(index: int, entry: tuple[int, Any, bool], source_file: str, default_prefix: str,
                 image_root: epath.Path) -> tuple[bytes, str, Optional[dict], int]:
    """(encoded record, example id, bad-record report or None, image bytes) of one source entry."""
    line, record, json_error = _parse(entry)
    where = f"{source_file}:{line}"
    example_id = default_id(default_prefix, index)
    if json_error is not None or not isinstance(record, dict):
        header = {"_not_an_object": record}
        detail = json_error or f"record is a {type(record).__name__}, not an object"
        if json_error is not None:
            header["_json_error"] = json_error
        return encode_record(header, [], where), example_id, _bad(index, None, where, "malformed_record",
                                                                  detail), 0
    example_id = str(record.get("id", example_id))
    try:
        paths = example_from_record(record, index, default_prefix, images=lambda p: p).images
    except BadSample as bad:                         # written as it is: the reader raises the same BadSample
        return encode_record(record, [], where), example_id, _bad(index, example_id, where, bad.reason,
                                                                  bad.detail), 0
    images, errors = zip(*[_read_image(image_root / p) for p in paths]) if paths else ((), ())
    report = None
    first_error = next((error for error in errors if error), None)
    if first_error:
        reason, _, detail = first_error.partition(": ")
        report = _bad(index, example_id, where, reason, detail)
    return (encode_record(record, list(images), where, list(errors)), example_id, report,
            sum(len(image) for image in images if image))


def _bad(index: int, example_id: Optional[str], where: str, reason: str, detail: str) -> dict:
    return {"index": index, "id": example_id or "?", "where": where, "reason": reason, "detail": detail}


def _ordered_map(function, items: Iterable, workers: int) -> Iterator:
    """function(*item) for each item, in order, `workers` threads at a time (image reads are I/O bound)."""
    if workers <= 1:
        yield from (function(*item) for item in items)
        return
    with futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, *item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Progress:
    """"done/total records, rate, MB/s, ETA" on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled, self.stream = total, enabled, stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.done = self.bytes = 0

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= (0.2 if self.tty else 10.0) or self.done == self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        text = (f"to_arrayrecord: {self.done}/{self.total} records ({100.0 * self.done / max(self.total, 1):.1f}%)"
                f"  {rate:,.0f} records/s  {self.bytes / elapsed / 1e6:,.1f} MB/s  "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def convert(json_path: str, image_root: Optional[str], out_dir: str, shards: int = 1, progress: bool = True,
            workers: int = 16, name: str = "train", writer_options: str = WRITER_OPTIONS) -> dict:
    """Converts `json_path` (+ images under `image_root`, default: the JSON file's directory) into `shards`
    ArrayRecord shards in `out_dir` (see the module docstring); returns the summary. Fewer shards are written when
    there are fewer records than shards (each shard holds at least one record)."""
    started = time.monotonic()
    json_path, out_dir = str(json_path), str(out_dir)
    if image_root is None:
        image_root = str(epath.Path(json_path).parent) if is_remote(json_path) else \
            os.path.dirname(os.path.abspath(json_path))
    root, out = epath.Path(image_root), epath.Path(out_dir)
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.glob("*.array_record"))
    if stale or (out / INDEX_FILE).exists():
        raise ValueError(f"--out {out_dir} already holds a converted dataset ({(stale or [INDEX_FILE])[0]}, ...): "
                         "choose an empty directory or delete its *.array_record shards and index.json")
    entries = _source_entries(json_path)
    total = len(entries)
    num_shards = max(1, min(shards, total))
    bounds = [k * total // num_shards for k in range(num_shards + 1)]
    default_prefix = os.path.basename(json_path)
    bar = _Progress(total, progress)
    results = _ordered_map(lambda i: _convert_one(i, entries[i], json_path, default_prefix, root),
                           ((i,) for i in range(total)), workers)
    ids, bad_reports, shard_entries = [], [], []
    counts: collections.Counter = collections.Counter()
    total_bytes = image_bytes = 0
    with tempfile.TemporaryDirectory(prefix="to_arrayrecord_") as scratch:
        from array_record.python.array_record_module import ArrayRecordWriter
        for k in range(num_shards):
            name_k = shard_name(k, num_shards, name)
            local = os.path.join(out_dir, name_k) if not is_remote(out_dir) else os.path.join(scratch, name_k)
            writer = ArrayRecordWriter(local, writer_options)
            for _ in range(bounds[k], bounds[k + 1]):
                data, example_id, report, nbytes = next(results)
                writer.write(data)
                ids.append(example_id)
                image_bytes += nbytes
                if report:
                    counts[report["reason"]] += 1
                    bad_reports.append(report)
                bar.update(len(data))
            writer.close()
            total_bytes += os.path.getsize(local)
            if is_remote(out_dir):
                with open(local, "rb") as src, (out / name_k).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
                os.remove(local)
            shard_entries.append({"name": name_k, "start": bounds[k], "records": bounds[k + 1] - bounds[k]})
    bar.close()
    bad = {reason: counts[reason] for reason in REASONS if counts[reason]}
    (out / IDS_FILE).write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids), encoding="utf-8")
    (out / BAD_RECORDS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bad_reports),
                                        encoding="utf-8")
    index = {"format": FORMAT, "source": json_path, "image_root": str(image_root), "default_id_prefix": default_prefix,
             "records": total, "shards": shard_entries, "ids": IDS_FILE, "bad_records": BAD_RECORDS_FILE, "bad": bad}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    seconds = time.monotonic() - started
    return {"out": out_dir, "records": total, "shards": num_shards, "bytes": total_bytes, "image_bytes": image_bytes,
            "bad": bad, "bad_total": len(bad_reports), "first_bad": bad_reports[:_FIRST_BAD],
            "seconds": round(seconds, 3), "records_per_s": round(total / seconds, 1) if seconds > 0 else None}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.data.to_arrayrecord", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="LLaVA JSON list (*.json) or JSONL (*.jsonl); local or gs://")
    parser.add_argument("--image-root", default=None, help="image paths are relative to it (default: the JSON's dir)")
    parser.add_argument("--out", required=True, help="output directory (local or gs://); must hold no shards yet")
    parser.add_argument("--shards", type=int, default=1, help="number of shards (contiguous ranges, source order)")
    parser.add_argument("--workers", type=int, default=16, help="threads reading images (I/O bound)")
    parser.add_argument("--name", default="train", help="shard file name prefix")
    parser.add_argument("--writer-options", default=WRITER_OPTIONS,
                        help="ArrayRecordWriter options (keep group_size:1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    summary = convert(args.json, args.image_root, args.out, args.shards, progress=not args.no_progress,
                      workers=args.workers, name=args.name, writer_options=args.writer_options)
    if summary["bad_total"]:
        listing = "\n".join(f"  {r['where']} (id {r['id']}): {r['reason']}: {r['detail']}"
                            for r in summary["first_bad"])
        print(f"{summary['bad_total']} bad record(s), written and reported as the training pipeline reports them "
              f"(all in {args.out}/{BAD_RECORDS_FILE}); by reason: {summary['bad']}. First:\n{listing}",
              file=sys.stderr)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
