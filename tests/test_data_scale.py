"""Data at scale: JSONL files are indexed (line offsets) and read a line at a time from any thread or process, and
benchmarks/data_scale.py reports memory and throughput per format and size."""
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from data_helpers import ids_of, record, write_image, write_json

from llava_jax.data.bad_samples import BadDataError, BadSample
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.data.sources import LlavaJsonSource, index_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jsonl_with_blank_lines(path, count):
    """`count` records "r0".. with a blank line (and a whitespace-only one) before every third record."""
    lines = []
    for i in range(count):
        if i % 3 == 0:
            lines += ["", "   "]
        lines.append(json.dumps(record(f"r{i}", f"Question {i} \u2028 é?", f"answer {i}"), ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_index_holds_offsets_not_records(tmp_path):
    path = jsonl_with_blank_lines(tmp_path / "d.jsonl", 7)
    offsets, lengths, lines = index_jsonl(path)
    assert offsets.dtype == lengths.dtype == lines.dtype == np.int64 and len(offsets) == 7
    raw = open(path, "rb").read()
    assert [json.loads(raw[o:o + n])["id"] for o, n in zip(offsets, lengths)] == [f"r{i}" for i in range(7)]
    source = LlavaJsonSource(path)
    assert source._records is None                                   # nothing parsed is kept
    assert [source[i].id for i in range(7)] == [f"r{i}" for i in range(7)]
    assert source[0].turns[0][1] == "<image>\nQuestion 0 \u2028 é?"   # a raw U+2028 in a string: not a line break
    assert source.describe(0) == f"{path} line 3" and source.describe(3) == f"{path} line 8"
    assert source[-1].id == "r6"
    with pytest.raises(IndexError):
        source[7]


def test_jsonl_reads_from_many_threads_match_sequential_reads(tmp_path):
    source = LlavaJsonSource(jsonl_with_blank_lines(tmp_path / "d.jsonl", 200))
    order = list(np.random.default_rng(0).permutation(200)) * 5
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: source[int(i)].id, order))
    assert ids == [f"r{i}" for i in order]


def _ids_in_child(source, queue):
    queue.put([source[i].id for i in (5, 0, 9)])


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")         # the child only reads files, no JAX
def test_jsonl_source_reads_after_fork_and_after_pickling(tmp_path):
    source = LlavaJsonSource(jsonl_with_blank_lines(tmp_path / "d.jsonl", 10))
    assert source[1].id == "r1"                                      # the parent has opened its descriptor
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_ids_in_child, args=(source, queue))
    child.start()
    assert queue.get(timeout=30) == ["r5", "r0", "r9"]
    child.join(30)
    assert source[2].id == "r2"                                      # the parent's descriptor still works
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i].id for i in range(10)] == [f"r{i}" for i in range(10)]


def test_malformed_jsonl_line_fails_at_load_by_default(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(record("a")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2:1: malformed JSON line: not UTF-8"):
        LlavaJsonSource(str(path))


def test_unvalidated_malformed_jsonl_line_is_a_bad_sample_naming_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record("a")) + "\n\n" + '{"id": "b", oops}\n')
    source = LlavaJsonSource(str(path), validate=False)
    assert len(source) == 2 and source[0].id == "a"
    with pytest.raises(BadSample, match=r"malformed_record: .*bad.jsonl:3:\d+: malformed JSON line"):
        source[1]


def _unvalidated_pipeline(monkeypatch, tiny_config, tmp_path, policy):
    """A JSONL file of 4 good records and 2 malformed lines, read unvalidated through the pipeline."""
    import llava_jax.data.sources as sources
    write_image(tmp_path / "img.png")
    lines = [json.dumps(record(f"g{i}")) for i in range(4)] + ['{"id": "x", oops}', "[1, 2"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    original = sources.LlavaJsonSource.__init__
    monkeypatch.setattr(sources.LlavaJsonSource, "__init__",
                        lambda self, path, root=None, validate=True: original(self, path, root, validate=False))
    return make_train_iterator(tiny_config("data.source=llava_json", f"data.json_path={tmp_path / 'd.jsonl'}",
                                           "train.batch_size=6", "data.prefetch=0",
                                           f"data.bad_sample_policy={policy}"))


def test_unvalidated_malformed_lines_are_skipped_and_counted_by_the_pipeline(monkeypatch, tiny_config, tmp_path):
    batch = next(_unvalidated_pipeline(monkeypatch, tiny_config, tmp_path, "skip"))
    assert all(i.startswith("g") for i in ids_of(batch))
    reports = [r for row in batch["_bad"] for r in json.loads(row)]
    assert sorted(r["where"] for r in reports) == [f"{tmp_path / 'd.jsonl'} line 5", f"{tmp_path / 'd.jsonl'} line 6"]
    assert {r["reason"] for r in reports} == {"malformed_record"}


def test_unvalidated_malformed_line_under_policy_error_stops_naming_it(monkeypatch, tiny_config, tmp_path):
    with pytest.raises(BadDataError, match=r"d.jsonl line [56]"):
        next(_unvalidated_pipeline(monkeypatch, tiny_config, tmp_path, "error"))


def test_jsonl_and_json_list_give_the_same_training_batches(tiny_config, tmp_path):
    records = []
    for i in range(8):
        write_image(tmp_path / f"img{i}.png", (12, 8), (30 * i, 100, 200))
        records.append(record(f"s{i}", f"Question {i}?", f"answer {i}", f"img{i}.png"))
    common = ["data.source=llava_json", "train.batch_size=4", "data.num_threads=2"]
    batches = []
    for name, jsonl in (("d.json", False), ("d.jsonl", True)):
        json_path = write_json(tmp_path / name, records, jsonl)
        iterator = make_train_iterator(tiny_config(*common, f"data.json_path={json_path}"))
        batches.append([next(iterator) for _ in range(3)])
    for a, b in zip(*batches):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_data_scale_benchmark_reports_memory_and_throughput_per_format_and_size(tmp_path):
    output = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "data_scale.py"), "--sizes", "50,200", "--samples", "16",
         "--batch-size", "8", "--image-size", "28", "--pool", "4", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    result = json.loads(output.strip().splitlines()[-1])
    assert set(result["results"]) == {"jsonl", "arrayrecord"}
    for fmt in ("jsonl", "arrayrecord"):
        assert set(result["results"][fmt]) == {"50", "200"}
        for run in result["results"][fmt].values():
            assert {"rss_peak_mb", "rss_after_imports_mb", "startup_s", "samples_per_s", "samples", "bad_samples",
                    "write_s", "disk_mb"} <= set(run)
            assert run["rss_peak_mb"] >= run["rss_after_imports_mb"] > 0 and run["samples_per_s"] > 0
            assert run["samples"] == 16 and run["bad_samples"] == 0
    assert os.listdir(tmp_path) == []                                 # datasets removed unless --keep
