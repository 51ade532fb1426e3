"""Remote paths (gs://...) through etils.epath: JSON / JSONL records and their images read from an in-memory
file system registered as fsspec's "gs" protocol (no network), giving the same examples and batches as local files."""
import json

import fsspec
import numpy as np
import pytest
from data_helpers import ids_of, png_bytes, record, write_image, write_json
from fsspec.implementations.memory import MemoryFileSystem

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.images import image_size_hw, open_image
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.data.sources import LlavaJsonSource


class InMemoryGcs(MemoryFileSystem):
    """fsspec's memory file system answering gs:// paths (etils.epath sends gs:// to fsspec's "gcs" protocol)."""
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.rstrip("/")


@pytest.fixture
def gcs():
    """An empty in-memory gs://bucket; returns a function writing bytes to gs://bucket/<name> (returns the path)."""
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, InMemoryGcs, clobber=True)
    InMemoryGcs.store.clear()

    def put(name: str, data: bytes) -> str:
        from etils import epath
        path = epath.Path(f"gs://bucket/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"gs://bucket/{name}"
    yield put
    InMemoryGcs.store.clear()


def test_the_in_memory_file_system_is_what_epath_reads(gcs):
    from etils import epath
    gcs("x/a.txt", b"hello")
    assert epath.Path("gs://bucket/x/a.txt").read_bytes() == b"hello"
    assert [str(p) for p in epath.Path("gs://bucket/x").glob("*.txt")] == ["gs://bucket/x/a.txt"]


@pytest.mark.parametrize("jsonl", [False, True])
def test_remote_json_and_jsonl_give_the_local_files_examples(gcs, tmp_path, jsonl):
    records = [record("a", image="img/1.png"), record("b", image=None), record("c")]
    local = write_json(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, jsonl)
    remote = gcs("data/" + local.rsplit("/", 1)[-1], open(local, "rb").read())
    source = LlavaJsonSource(remote)
    assert len(source) == 3 and source.image_root == "gs://bucket/data"
    assert [source[i].turns for i in range(3)] == [LlavaJsonSource(local)[i].turns for i in range(3)]
    assert source[0].images == ["gs://bucket/data/img/1.png"] and source[1].images == []
    assert source.describe(2) == (f"{remote} line 3" if jsonl else f"{remote} record 2")


def test_remote_jsonl_reports_a_malformed_line_with_its_path(gcs):
    path = gcs("bad.jsonl", (json.dumps(record("a")) + "\n{oops}\n").encode())
    with pytest.raises(ValueError, match=r"gs://bucket/bad.jsonl:2:\d+: malformed JSON line"):
        LlavaJsonSource(path)


def test_remote_images_decode_like_local_ones(gcs, tmp_path):
    data = png_bytes((12, 8), (10, 200, 30))
    remote = gcs("img/a.png", data)
    local = write_image(tmp_path / "a.png", (12, 8), (10, 200, 30))
    assert image_size_hw(remote) == image_size_hw(local) == (8, 12)
    np.testing.assert_array_equal(np.asarray(open_image(remote)), np.asarray(open_image(local)))


def test_missing_and_empty_remote_images_are_bad_samples(gcs):
    empty = gcs("img/empty.png", b"")
    with pytest.raises(BadSample, match="missing_image: gs://bucket/img/nope.png: no such file"):
        open_image("gs://bucket/img/nope.png")
    with pytest.raises(BadSample, match="empty_image"):
        image_size_hw(empty)
    broken = gcs("img/broken.png", b"not a png")
    with pytest.raises(BadSample, match="corrupt_image: gs://bucket/img/broken.png"):
        open_image(broken)


def test_training_batches_from_a_remote_jsonl_equal_the_local_ones(gcs, tiny_config, tmp_path):
    records = []
    for i in range(6):
        write_image(tmp_path / f"img{i}.png", (12, 8), (40 * i, 100, 200))
        gcs(f"data/img{i}.png", open(tmp_path / f"img{i}.png", "rb").read())
        records.append(record(f"s{i}", f"Question {i}?", f"answer {i}", f"img{i}.png"))
    local = write_json(tmp_path / "d.jsonl", records, jsonl=True)
    remote = gcs("data/d.jsonl", open(local, "rb").read())
    common = ["train.batch_size=3", "data.num_threads=2", "data.prefetch=0"]
    local_iterator = make_train_iterator(tiny_config("data.source=llava_json", f"data.json_path={local}", *common))
    remote_iterator = make_train_iterator(tiny_config("data.source=llava_json", f"data.json_path={remote}", *common))
    for _ in range(3):
        a, b = next(local_iterator), next(remote_iterator)
        assert ids_of(a) == ids_of(b) and (a["bad_samples"] == 0).all()
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
