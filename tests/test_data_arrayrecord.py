"""ArrayRecord conversion (llava_jax.data.to_arrayrecord) and its reader (ArrayRecordSource): same records, same
order, image bytes inline, the same Examples and BadSamples as LlavaJsonSource, bad records reported, never dropped."""
import json
import pickle

import numpy as np
import pytest
from data_helpers import png_bytes, record, write_image, write_json

from llava_jax.data.arrayrecord_format import decode_record
from llava_jax.data.arrayrecord_source import ArrayRecordSource
from llava_jax.data.bad_samples import BadSample
from llava_jax.data.images import open_image
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.to_arrayrecord import convert, main


def read_shard(path):
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(str(path))
    records = reader.read(list(range(reader.num_records())))
    reader.close()
    return [decode_record(r) for r in records]


def varied_records(tmp_path):
    """Images (PNG, JPEG, one grey) and records: one image, several images, text only, no id, answers, image_mode,
    a system turn, an absolute image path."""
    write_image(tmp_path / "red.png", (9, 7), (200, 30, 30))
    write_image(tmp_path / "blue.jpg", (6, 10), (20, 30, 220), fmt="JPEG")
    (tmp_path / "sub").mkdir(exist_ok=True)
    write_image(tmp_path / "sub" / "grey.png", (5, 5), 128, mode="L")
    multi = record("multi", "<image> and <image>: same?", "no", image=["red.png", "sub/grey.png"])
    multi["conversations"][0]["value"] = "<image> and <image>: same?"
    no_id = record("x", image="blue.jpg")
    del no_id["id"]
    with_system = record("sys", image=str(tmp_path / "red.png"))
    with_system["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    return [record("a", image="red.png"), multi, record("text", "Say hi.", "hi", image=None), no_id,
            {**record("ans", image="blue.jpg"), "answers": ["red", "Red"], "image_mode": "base"}, with_system,
            record("numeric_id", image="sub/grey.png") | {"id": 17}]


def assert_same_example(ours, theirs):
    assert (ours.id, ours.turns, ours.answers, ours.image_mode) == (theirs.id, theirs.turns, theirs.answers,
                                                                   theirs.image_mode)
    assert len(ours.images) == len(theirs.images) and all(isinstance(image, bytes) for image in ours.images)
    for inline, path in zip(ours.images, theirs.images):
        np.testing.assert_array_equal(np.asarray(open_image(inline)), np.asarray(open_image(path)))


def bad_of(source, index):
    with pytest.raises(BadSample) as info:
        source[index]
    return info.value.reason, info.value.detail, info.value.example_id


def test_shards_hold_contiguous_ranges_in_source_order(tmp_path):
    records = [record(f"s{i}", image=None) for i in range(7)]
    summary = convert(write_json(tmp_path / "d.json", records), None, tmp_path / "out", shards=3, progress=False)
    names = [f"train-0000{k}-of-00003.array_record" for k in range(3)]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == names
    assert [(s["start"], s["records"]) for s in index["shards"]] == [(0, 2), (2, 2), (4, 3)]
    assert [[header["id"] for header, _ in read_shard(tmp_path / "out" / n)] for n in names] == [
        ["s0", "s1"], ["s2", "s3"], ["s4", "s5", "s6"]]
    ids = [f"s{i}" for i in range(7)]
    assert [json.loads(line) for line in (tmp_path / "out" / "ids.txt").read_text().splitlines()] == ids
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert len(source) == 7 and [source[i].id for i in range(7)] == ids
    assert (summary["records"], summary["shards"], summary["bad"]) == (7, 3, {})


def test_more_shards_than_records_writes_one_record_per_shard(tmp_path):
    summary = convert(write_json(tmp_path / "d.json", [record("a", image=None), record("b", image=None)]), None,
                      tmp_path / "out", shards=5, progress=False)
    assert summary["shards"] == 2 and len(list((tmp_path / "out").glob("*-of-00002.array_record"))) == 2


def test_image_bytes_are_inline_exactly_as_in_the_files(tmp_path):
    records = varied_records(tmp_path)
    convert(write_json(tmp_path / "d.json", records), str(tmp_path), tmp_path / "out", progress=False)
    decoded = read_shard(tmp_path / "out" / "train-00000-of-00001.array_record")
    header, images = decoded[1]
    assert images == [(tmp_path / "red.png").read_bytes(), (tmp_path / "sub" / "grey.png").read_bytes()]
    assert decoded[4][1] == [(tmp_path / "blue.jpg").read_bytes()]                 # JPEG not re-encoded
    assert decoded[2][1] == [] and header["image"] == ["red.png", "sub/grey.png"]  # the record as in the source


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_examples_equal_llava_json_source_examples(tmp_path, jsonl):
    records = varied_records(tmp_path)
    json_path = write_json(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, jsonl)
    convert(json_path, str(tmp_path), tmp_path / "out", shards=2, progress=False)
    ours, theirs = ArrayRecordSource(str(tmp_path / "out")), LlavaJsonSource(json_path, str(tmp_path))
    assert len(ours) == len(theirs) == len(records)
    for i in range(len(records)):
        assert_same_example(ours[i], theirs[i])
    assert ours[3].id == theirs[3].id == f"{'d.jsonl' if jsonl else 'd.json'}:3"            # no "id": the default


def test_malformed_records_are_written_and_raise_the_same_bad_sample(tmp_path):
    records = [record("ok", image=None), ["not", "an", "object"], "text", {"id": "noconv"},
               {"id": "role", "conversations": [{"from": "robot", "value": "x"}]},
               {**record("img", image=None), "image": 3}, {**record("ans", image=None), "answers": "red"},
               {"conversations": []}]
    json_path = write_json(tmp_path / "d.jsonl", records, jsonl=True)
    summary = convert(json_path, None, tmp_path / "out", shards=3, progress=False)
    ours, theirs = ArrayRecordSource(str(tmp_path / "out")), LlavaJsonSource(json_path)
    assert len(ours) == len(records)
    for i in range(1, len(records)):
        assert bad_of(ours, i) == bad_of(theirs, i)
        assert bad_of(ours, i)[0] == "malformed_record"
    assert summary["bad"] == {"malformed_record": 7} and summary["bad_total"] == 7
    first = summary["first_bad"][0]
    assert (first["where"], first["reason"], first["detail"]) == (f"{json_path}:2", "malformed_record",
                                                                  "record is a list, not an object")
    listed = [json.loads(line) for line in (tmp_path / "out" / "bad_records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in listed] == list(range(1, 8)) and listed[2]["id"] == "noconv"


def test_missing_and_empty_images_are_written_counted_and_raise_on_read(tmp_path):
    write_image(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    records = [record("ok", image="ok.png"), record("gone", image="missing.png"),
               record("two", "<image> <image>", image=["ok.png", "empty.png"])]
    records[2]["conversations"][0]["value"] = "<image> <image>"
    json_path = write_json(tmp_path / "d.jsonl", records, jsonl=True)
    summary = convert(json_path, None, tmp_path / "out", progress=False)
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert len(source) == 3 and source[0].images == [(tmp_path / "ok.png").read_bytes()]
    assert bad_of(source, 1) == ("missing_image", f"{tmp_path / 'missing.png'}: no such file", "gone")
    assert bad_of(source, 2) == ("empty_image", f"{tmp_path / 'empty.png'}: file has 0 bytes", "two")
    assert summary["bad"] == {"missing_image": 1, "empty_image": 1}
    assert [(r["where"], r["id"]) for r in summary["first_bad"]] == [(f"{json_path}:2", "gone"),
                                                                      (f"{json_path}:3", "two")]
    shard = tmp_path / "out" / "train-00000-of-00001.array_record"
    assert source.describe(1) == f"{shard} record 1 (source {json_path}:2)"


def test_unparsable_jsonl_line_is_written_and_reported_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record("a", image=None)) + "\n\n" + '{"id": "b", oops}\n' +
                    json.dumps(record("c", image=None)) + "\n")
    summary = convert(str(path), None, tmp_path / "out", progress=False)
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert len(source) == 3 and source[2].id == "c"
    reason, detail, _ = bad_of(source, 1)
    assert reason == "malformed_record" and detail.startswith("malformed JSON line (column 13)")
    assert summary["bad"] == {"malformed_record": 1} and summary["first_bad"][0]["where"] == f"{path}:3"


def test_json_list_records_keep_their_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record("a", image=None), record("b", image=None)], indent=2))
    convert(str(path), None, tmp_path / "out", progress=False)
    source = ArrayRecordSource(str(tmp_path / "out"))
    lines = path.read_text().splitlines()
    second = next(n for n, text in enumerate(lines, 1) if '"b"' in text) - 1          # its "{" line
    assert source.describe(1).endswith(f"(source {path}:{second})") and lines[second - 1].strip() == "{"


def test_malformed_json_list_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]')
    with pytest.raises(ValueError, match=r"broken.json:3:14: malformed JSON"):
        convert(str(path), None, tmp_path / "out", progress=False)


def test_cli_prints_the_summary_json_and_progress_on_stderr(tmp_path, capsys):
    write_image(tmp_path / "img.png")
    json_path = write_json(tmp_path / "d.json", [record(f"s{i}") for i in range(4)] + [record("bad", image="no.png")])
    main(["--json", json_path, "--image-root", str(tmp_path), "--out", str(tmp_path / "out"), "--shards", "2"])
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["records"], summary["shards"], summary["bad"]) == (5, 2, {"missing_image": 1})
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.array_record"))
    assert summary["image_bytes"] == 4 * len(png_bytes())
    assert "5/5 records (100.0%)" in err and "records/s" in err and "ETA" in err
    assert f"{json_path}:1 (id bad): missing_image: {tmp_path / 'no.png'}: no such file" in err


def test_refuses_an_out_directory_that_holds_shards(tmp_path):
    json_path = write_json(tmp_path / "d.json", [record("a", image=None)])
    convert(json_path, None, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="already holds a converted dataset"):
        convert(json_path, None, tmp_path / "out", progress=False)


def test_glob_of_some_shards_keeps_source_indices_and_default_ids(tmp_path):
    records = [record(f"s{i}", image=None) for i in range(6)]
    for r in records[3:]:
        del r["id"]
    convert(write_json(tmp_path / "d.json", records), None, tmp_path / "out", shards=3, progress=False)
    source = ArrayRecordSource(str(tmp_path / "out" / "train-0000[12]-of-00003.array_record"))
    assert [source[i].id for i in range(len(source))] == ["s2", "d.json:3", "d.json:4", "d.json:5"]
    assert repr(pickle.loads(pickle.dumps(source))) == repr(source) and pickle.loads(pickle.dumps(source))[1].id == \
        "d.json:3"


def test_gs_paths_go_through_epath(tmp_path, monkeypatch):
    """--json, --image-root and --out on a "gs://" bucket (an in-memory fsspec filesystem stands in for GCS)."""
    import fsspec
    from etils.epath import backend, gpath
    memory = fsspec.filesystem("memory")
    monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: memory if str(path).startswith(
        "gs://") else fsspec.filesystem("file"))
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    memory.pipe("gs://bucket/images/img.png", png_bytes())
    records = [record("a"), record("b", image=None), record("c", image="gone.png")]
    memory.pipe("gs://bucket/d.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    summary = convert("gs://bucket/d.jsonl", "gs://bucket/images", "gs://bucket/out", shards=2, progress=False)
    assert summary["bad"] == {"missing_image": 1} and summary["first_bad"][0]["where"] == "gs://bucket/d.jsonl:3"
    local = tmp_path / "copy"
    local.mkdir()
    for path in memory.ls("gs://bucket/out", detail=False):
        (local / path.rsplit("/", 1)[-1]).write_bytes(memory.cat(path))
    source = ArrayRecordSource(str(local))
    assert [source[i].id for i in range(2)] == ["a", "b"] and source[0].images == [png_bytes()]
    assert bad_of(source, 2) == ("missing_image", "gs://bucket/images/gone.png: no such file", "c")


def test_encoded_training_samples_are_identical(tmp_path, tiny_config):
    from llava_jax.data.examples import ExampleEncoder
    from llava_jax.data.tokenizers import make_tokenizer
    config = tiny_config("data.max_images=2")
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    json_path = write_json(tmp_path / "d.json", varied_records(tmp_path))
    convert(json_path, str(tmp_path), tmp_path / "out", shards=2, progress=False)
    ours, theirs = ArrayRecordSource(str(tmp_path / "out")), LlavaJsonSource(json_path, str(tmp_path))
    for i in range(len(ours)):
        a, b = encoder.sample(ours[i]), encoder.sample(theirs[i])
        assert a.keys() == b.keys() and a["_id"] == b["_id"]
        for key in ("input_ids", "loss_mask", "pixel_values", "image_mask"):
            np.testing.assert_array_equal(a[key], b[key])


def test_shards_without_an_index_count_their_records_and_name_default_ids_from_the_source(tmp_path):
    records = [record("s0", image=None), record("s1", image=None), record("s2", image=None)]
    del records[2]["id"]
    convert(write_json(tmp_path / "d.json", records), None, tmp_path / "out", shards=2, progress=False)
    (tmp_path / "out" / "index.json").unlink()
    source = ArrayRecordSource(str(tmp_path / "out" / "*.array_record"))
    assert len(source) == 3 and [source[i].id for i in range(3)] == ["s0", "s1", "d.json:2"]
    with pytest.raises(ValueError, match="no index.json"):
        ArrayRecordSource(str(tmp_path / "out"))
