"""Random-access data sources yielding `Example`s: LLaVA JSON / JSONL, converted ArrayRecord shards, TFDS
(array_record, no TensorFlow), synthetic.

Public surface: `LlavaJsonSource(json_path, image_root, validate=True)`, `TfdsSource(name, data_dir, split, image_key,
question_key, answer_key)`, `train_sources(config) -> [(source, weight)]`, `eval_sources(config) -> [source]`
(data.source arrayrecord: `arrayrecord_source.ArrayRecordSource`), `index_jsonl(path)`, `open_binary(path)`
(and `llava_jax.paths.is_remote`).
A source has `__len__`, `__getitem__(i) -> Example` (raises BadSample for a malformed record; images stay
unread references) and `describe(i)` (file and line/record for error messages). Paths may be local or remote
(gs://, s3://, ...: read through etils.epath); local files are read with plain file calls.
Scale: a *.jsonl file is indexed (byte offsets of its lines, 24 bytes per record) and a record is parsed when it is
read; a JSON list is parsed whole into memory. Large datasets: JSONL, or ArrayRecord shards
(`python -m llava_jax.data.to_arrayrecord`, `data.source=arrayrecord`: memory flat in the dataset size). Shards are
opened by array_record's C++ reader, not epath: gs:// shards go through its own GCS client (needs network; untested
here), so a gcsfuse mount or a local copy of the shards is the tested way.
"""
from __future__ import annotations

import json
import os
import threading
from array import array
from typing import Any, Optional

import numpy as np

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.examples import Example
from llava_jax.data.llava_records import example_from_record
from llava_jax.data.synthetic import SyntheticSource
from llava_jax.data.templates import IMAGE_PLACEHOLDER
from llava_jax.paths import is_remote


def open_binary(path: str):
    """A binary file object for a local path (builtin open: fast) or a remote one (etils.epath)."""
    if is_remote(path):
        from etils import epath
        return epath.Path(path).open("rb")
    return open(path, "rb")


def _load_json_list(path: str) -> list[Any]:
    """A JSON list of records, parsed whole. Malformed JSON raises ValueError with the file, line and column."""
    with open_binary(path) as f:
        text = f.read().decode("utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records (or a *.jsonl file), got a "
                         f"{type(records).__name__}")
    return records


def _parse_line(raw: bytes) -> Any:
    """One JSONL line -> its JSON value; json.JSONDecodeError or UnicodeDecodeError (not UTF-8) if malformed."""
    return json.loads(raw.decode("utf-8"))


def _line_error(error: ValueError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.colno}: malformed JSON line: {error.msg}"
    return f"1: malformed JSON line: not UTF-8 ({error})"


def index_jsonl(path: str, validate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over a JSONL file: (byte offset, byte length, 1-based line number) of each non-blank line, int64
    [records] each. validate: every line is parsed (then dropped) so a malformed one fails here, as loading a JSON
    list does: ValueError "file:line:col: malformed JSON line" (costs one json.loads per record, no memory)."""
    offsets, lengths, lines = array("q"), array("q"), array("q")
    position = 0
    with open_binary(path) as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                if validate:
                    try:
                        _parse_line(line)
                    except ValueError as e:           # JSONDecodeError and UnicodeDecodeError are ValueErrors
                        raise ValueError(f"{path}:{line_number}:{_line_error(e)}") from None
                offsets.append(position)
                lengths.append(len(line))
                lines.append(line_number)
            position += len(line)
    return tuple(np.frombuffer(a, np.int64).copy() if len(a) else np.zeros(0, np.int64)
                 for a in (offsets, lengths, lines))


class _LineReader:
    """Reads byte ranges of one file from any thread or (forked or unpickled) process: a local file is read with
    os.pread on a descriptor opened lazily per process (pread has no shared file position, so threads need no
    lock); a remote one through one epath file object per thread and process."""

    def __init__(self, path: str):
        self.path = path
        self._remote = is_remote(path)
        self._fd, self._fd_pid = None, None
        self._lock = threading.Lock()
        self._local = threading.local()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def read(self, offset: int, length: int) -> bytes:
        if not self._remote:
            return os.pread(self._descriptor(), length, offset)
        handle = getattr(self._local, "handle", None)
        if handle is None or self._local.pid != os.getpid():
            handle = self._local.handle = open_binary(self.path)
            self._local.pid = os.getpid()
        handle.seek(offset)
        return handle.read(length)

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:        # first read in this process (also after a fork)
            with self._lock:
                if self._fd is None or self._fd_pid != pid:
                    self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), pid
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def _default_image_root(json_path: str) -> str:
    if is_remote(json_path):
        return json_path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(json_path))


class LlavaJsonSource:
    """Records {"id", "image": path | [paths] (optional), "conversations": [{"from": "human"|"gpt"|"system",
    "value"}], "answers": [..] (optional, evaluation), "image_mode": "anyres" | "base" (optional, LLaVA-NeXT
    models)}; image paths are relative to image_root (default: the JSON file's directory) and read only when a
    sample is built.

    *.jsonl: `index_jsonl` keeps three int64 per record (offset, length, line) and `__getitem__` reads and parses
    that one line (thread- and fork-safe, `_LineReader`). Malformed JSON: found by the index pass (validate=True,
    the default), which raises ValueError "file:line:col" before training starts, as a JSON list does; with
    validate=False (faster start on huge files) a malformed line raises BadSample("malformed_record", naming the
    file and line) when it is read, which data.bad_sample_policy skips (counted) or turns into an error. Any other
    file is a JSON list, parsed whole (fine up to ~100K records; convert larger ones to JSONL or ArrayRecord)."""

    def __init__(self, json_path: str, image_root: Optional[str] = None, validate: bool = True):
        self.path = os.fspath(json_path)
        self.image_root = image_root if image_root is not None else _default_image_root(self.path)
        self._default_id_prefix = self.path.rsplit("/", 1)[-1]
        if self.path.endswith(".jsonl"):
            self._records = None
            self._offsets, self._lengths, self._lines = index_jsonl(self.path, validate)
            self._reader = _LineReader(self.path)
        else:
            self._records = _load_json_list(self.path)
            self._lines = None

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._offsets)

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path!r}, image_root={self.image_root!r})"

    def describe(self, index: int) -> str:
        return f"{self.path} line {self._lines[index]}" if self._lines is not None else f"{self.path} record {index}"

    def _record(self, index: int) -> Any:
        if self._records is not None:
            return self._records[index]
        raw = self._reader.read(int(self._offsets[index]), int(self._lengths[index]))
        try:
            return _parse_line(raw)
        except ValueError as e:
            raise BadSample("malformed_record", f"{self.path}:{self._lines[index]}:{_line_error(e)}") from None

    def __getitem__(self, index: int) -> Example:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self!r}: index {index} out of range for {len(self)} records")
        index = index % len(self)
        return example_from_record(self._record(index), index, self._default_id_prefix, self._image_paths)

    def _image_paths(self, paths: list[str]) -> list[str]:
        return [os.path.join(self.image_root, p) for p in paths]


def _texts(value: Any) -> list[str]:
    """A TFDS text feature (bytes, str, or a sequence of them) as a list of str."""
    if isinstance(value, (bytes, str, np.bytes_, np.str_)):
        value = [value]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]


class TfdsSource:
    """A prepared TFDS dataset read with tfds.data_source (array_record; no TensorFlow). The image feature is
    read undecoded (PIL decodes it); question_key None means caption data (the prompt is the image alone)."""

    def __init__(self, name: str, data_dir: Optional[str], split: str, image_key: str,
                 question_key: Optional[str], answer_key: str):
        import tensorflow_datasets as tfds
        self.name, self.split = name, split
        self.keys = {"image": image_key, "question": question_key, "answer": answer_key}
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        for role, key in self.keys.items():
            if key is not None and key not in features:
                raise ValueError(f"data.tfds_{role}_key: {key!r} is not a feature of TFDS dataset {name} "
                                 f"(features: {sorted(features.keys())})")
        skip = {image_key: tfds.decode.SkipDecoding()} if isinstance(features[image_key], tfds.features.Image) else None
        self._data = tfds.data_source(name, split=split, data_dir=data_dir, decoders=skip, download=False)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, split={self.split})"

    def describe(self, index: int) -> str:
        return f"tfds {self.name} split {self.split} record {index}"

    def __getitem__(self, index: int) -> Example:
        record = self._data[index]
        example_id = f"{self.name}/{self.split}/{index}"
        answers = _texts(record[self.keys["answer"]])
        if not answers:
            raise BadSample("malformed_record", f"no answer in feature {self.keys['answer']!r}", example_id)
        prompt = IMAGE_PLACEHOLDER
        if self.keys["question"] is not None:
            prompt += "\n" + _texts(record[self.keys["question"]])[0]
        return Example(example_id, [("user", prompt), ("assistant", answers[0])], [record[self.keys["image"]]],
                       answers)


def _arrayrecord_source(path: str):
    from llava_jax.data.arrayrecord_source import ArrayRecordSource
    return ArrayRecordSource(path)


def _source(kind: str, config, split: str, json_path=None, image_root=None, tfds_name=None, arrayrecord_path=None):
    data = config.data
    if kind == "synthetic":
        size = data.synthetic_size if split == "train" else data.synthetic_eval_size
        return SyntheticSource(split, size, config.model.vision.image_size, data.synthetic_seed,
                               data.synthetic_question_kinds)
    if kind == "llava_json":
        return LlavaJsonSource(json_path, image_root)
    if kind == "arrayrecord":
        return _arrayrecord_source(arrayrecord_path)
    return TfdsSource(tfds_name, data.tfds_data_dir, data.tfds_split if split == "train" else data.tfds_eval_split,
                      data.tfds_image_key, data.tfds_question_key, data.tfds_answer_key)


def train_sources(config) -> list[tuple[Any, float]]:
    """(source, weight) per training source: data.source, or each entry of data.mixture."""
    data = config.data
    if data.source != "mixture":
        return [(_source(data.source, config, "train", data.json_path, data.image_root, data.tfds_name,
                         data.arrayrecord_path), 1.0)]
    return [(_source(e.source, config, "train", e.json_path, e.image_root, e.tfds_name, e.arrayrecord_path), e.weight)
            for e in data.mixture]


def eval_sources(config) -> list[Any]:
    """data.eval_json_path, else data.eval_arrayrecord_path, if set; otherwise the eval split of the synthetic / TFDS
    source(s) (llava_json and arrayrecord training sources have no eval split)."""
    data = config.data
    if data.eval_json_path:
        return [LlavaJsonSource(data.eval_json_path, data.image_root)]
    if data.eval_arrayrecord_path:
        return [_arrayrecord_source(data.eval_arrayrecord_path)]
    kinds = [(e.source, e.tfds_name) for e in data.mixture] if data.source == "mixture" else [(data.source,
                                                                                                 data.tfds_name)]
    sources = [_source(kind, config, "eval", tfds_name=name) for kind, name in kinds
               if kind not in ("llava_json", "arrayrecord")]
    if not sources:
        raise ValueError("data.eval_json_path or data.eval_arrayrecord_path: required for evaluation when every "
                         "training source is llava_json or arrayrecord")
    return sources
