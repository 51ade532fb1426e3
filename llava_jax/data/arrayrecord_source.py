"""A LLaVA dataset converted by `python -m llava_jax.data.to_arrayrecord`, read with random access through Grain.

Public surface: `ArrayRecordSource(path)`: path is the converter's --out directory (local or gs://; its index.json
lists the shards) or a glob / list of shard files; `__len__`, `__getitem__(i) -> Example` (the Example
LlavaJsonSource gives for the same record, via `llava_records.example_from_record`, with the images' encoded bytes
inline; BadSample for a malformed record or an image the converter could not read) and
`describe(i)` ("SHARD record k (source FILE:LINE)").
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
from typing import Any, Optional, Sequence, Union

from etils import epath

from llava_jax.data.arrayrecord_format import decode_record
from llava_jax.data.bad_samples import REASONS, BadSample
from llava_jax.data.examples import Example
from llava_jax.data.llava_records import default_id, example_from_record
from llava_jax.data.to_arrayrecord import INDEX_FILE

_FORMAT_KEYS = ("_image_sizes", "_source", "_image_errors")


def _load_index(directory: epath.Path) -> Optional[dict]:
    index_path = directory / INDEX_FILE
    return json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else None


def _resolve(path: Union[str, Sequence[str]]) -> tuple[list[str], list[Optional[int]], list[int], Optional[str]]:
    """(shard paths in order, their record counts (None: unknown), the source index of each shard's first record,
    the default id prefix (None: from each record's source file))."""
    if not isinstance(path, str):
        shards = [str(p) for p in path]
    elif epath.Path(path).is_dir():
        directory = epath.Path(path)
        index = _load_index(directory)
        if index is None:
            raise ValueError(f"{path}: no {INDEX_FILE}; is it the --out directory of "
                             "python -m llava_jax.data.to_arrayrecord (or pass a glob of its shards)?")
        return ([str(directory / s["name"]) for s in index["shards"]], [s["records"] for s in index["shards"]],
                [s["start"] for s in index["shards"]], index["default_id_prefix"])
    elif any(c in path for c in "*?["):
        parent, pattern = os.path.split(path)
        shards = sorted(str(p) for p in epath.Path(parent or ".").glob(pattern))
        if not shards:
            raise ValueError(f"{path}: no ArrayRecord shard matches")
    else:
        shards = [path]
    parents = {str(epath.Path(s).parent) for s in shards}
    index = _load_index(epath.Path(parents.pop())) if len(parents) == 1 else None
    by_name = {s["name"]: s for s in index["shards"]} if index else {}
    if by_name and all(epath.Path(s).name in by_name for s in shards):
        entries = [by_name[epath.Path(s).name] for s in shards]
        return shards, [e["records"] for e in entries], [e["start"] for e in entries], index["default_id_prefix"]
    return shards, [None] * len(shards), [], None          # starts: counted from the shards themselves


def _count_records(shard: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader
    if not epath.Path(shard).exists():
        raise FileNotFoundError(f"{shard}: no such ArrayRecord shard or directory")
    reader = ArrayRecordReader(shard)
    try:
        return reader.num_records()
    finally:
        reader.close()


class ArrayRecordSource:
    """Records in shard order (the converter keeps the source order, so index i is the source's record i when the
    source is the whole --out directory)."""

    def __init__(self, path: Union[str, Sequence[str]]):
        import grain.python as grain
        self.path = path if isinstance(path, str) else list(map(str, path))
        self.shards, counts, starts, self._default_prefix = _resolve(path)
        if counts[0] is None:
            counts = [_count_records(shard) for shard in self.shards]
        # "file[0:n]": Grain need not open every shard to count its records (many shards on GCS)
        self._data = grain.ArrayRecordDataSource([f"{s}[0:{n}]" for s, n in zip(self.shards, counts)])
        self._ends = list(itertools.accumulate(counts))
        self._starts = starts or [end - n for end, n in zip(self._ends, counts)]

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r})"

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, record within the shard) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {self!r} ({len(self)} records)")
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def describe(self, index: int) -> str:
        shard, k = self._locate(index)
        where = f"{self.shards[shard]} record {k}"
        try:
            source = decode_record(self._data[index])[0].get("_source")
        except Exception:                       # noqa: BLE001 -- describing must not fail
            source = None
        return f"{where} (source {source})" if source else where

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        shard, k = self._locate(index)
        try:
            header, images = decode_record(self._data[index])
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise BadSample("malformed_record", f"cannot decode the converted record ({type(e).__name__}: {e})"
                            ) from None
        if "_json_error" in header:
            raise BadSample("malformed_record", header["_json_error"])
        source_index = self._starts[shard] + k
        prefix = self._default_prefix or os.path.basename(str(header.get("_source", "")).rpartition(":")[0])
        record: Any = (header["_not_an_object"] if "_not_an_object" in header
                       else {key: value for key, value in header.items() if key not in _FORMAT_KEYS})
        errors = header.get("_image_errors") or [None] * len(images)

        def inline(paths: list[str]) -> list[Any]:
            example_id = str(record.get("id", default_id(prefix, source_index)))
            if len(paths) != len(images):
                raise BadSample("malformed_record", f"the converted record holds {len(images)} image(s) for "
                                f"{len(paths)} path(s); convert the dataset again", example_id)
            for image, error in zip(images, errors):
                if image is None:
                    reason, _, detail = (error or "missing_image: unreadable when converted").partition(": ")
                    if reason not in REASONS:
                        reason, detail = "corrupt_image", error
                    raise BadSample(reason, detail, example_id)
            return images
        return example_from_record(record, source_index, prefix, inline)
