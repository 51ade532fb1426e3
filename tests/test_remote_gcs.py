"""gs:// end to end against a local fake GCS server (tests/fake_gcs.py), through the real client libraries: gcsfs
(etils.epath), google-cloud-cpp (array_record's native reader) and tensorstore's gcs driver (Orbax checkpoints).
No network: the server runs on localhost and every client is pointed at it by environment variables."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from data_helpers import ids_of, image_dataset, record, write_json

from llava_jax.config import load_config
from llava_jax.data.arrayrecord_source import ArrayRecordSource
from llava_jax.data.bad_samples import BadSample
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.data.to_arrayrecord import convert, main as to_arrayrecord_main
from tests.fake_gcs import fake_gcs  # noqa: F401 -- the fixture (test arguments of that name)
from tests.run_helpers import REPO

# A shard or bucket that is not there must fail within this. (A GCS endpoint that cannot be reached at all is
# another matter: array_record's reader then retries for minutes.)
FAST_FAILURE_S = 15


def native_reads(gcs, name_part: str) -> list:
    """Requests for objects containing `name_part` sent by google-cloud-cpp (array_record's reader)."""
    return [r for r in gcs.server.requests if name_part in r[1] and r[3].startswith("gl-cpp/")]


def outcome(source: ArrayRecordSource, i: int):
    """The example's fields and inline image bytes, or the BadSample's (reason, detail, id)."""
    try:
        e = source[i]
    except BadSample as bad:
        return bad.reason, bad.detail, bad.example_id
    return e.id, e.turns, e.answers, e.image_mode, e.images


# ---------------------------------------------------------------------------------------- the three clients

def test_epath_reads_writes_lists_and_deletes_through_gcsfs(fake_gcs):
    from etils import epath
    path = epath.Path(fake_gcs.url("dir/a.bin"))
    path.write_bytes(b"hello world")
    assert fake_gcs.get("dir/a.bin") == b"hello world" and path.read_bytes() == b"hello world"
    assert path.exists() and epath.Path(fake_gcs.url("dir")).is_dir()
    assert [p.name for p in epath.Path(fake_gcs.url("dir")).iterdir()] == ["a.bin"]
    with path.open("rb") as f:
        f.seek(6)
        assert f.read(3) == b"wor"                                      # a ranged read
    epath.Path(fake_gcs.url("dir")).rmtree()
    assert fake_gcs.names() == [] and not path.exists()
    assert any(r[3].startswith("python-gcsfs/") for r in fake_gcs.server.requests)


# ------------------------------------------------------------------------------------- a. ArrayRecord shards

def test_converted_shards_on_gcs_read_back_through_array_records_native_reader(fake_gcs, tmp_path, tiny_config):
    json_path = image_dataset(tmp_path, 9)
    with open(json_path) as f:
        records = json.load(f)
    records.append(record("text", "Say hi.", "hi", image=None))
    records.append(record("gone", image="gone.png"))                    # a missing image: written, read as bad
    write_json(json_path, records)
    out = fake_gcs.url("shards")
    summary = to_arrayrecord_main(["--json", json_path, "--out", out, "--shards", "3", "--no-progress",
                                   "--workers", "2"])
    assert summary["records"] == 11 and summary["shards"] == 3 and summary["bad"] == {"missing_image": 1}
    assert fake_gcs.names("shards/") == sorted(
        ["shards/bad_records.jsonl", "shards/ids.txt", "shards/index.json"]
        + [f"shards/train-0000{k}-of-00003.array_record" for k in range(3)])
    convert(json_path, None, str(tmp_path / "local"), shards=3, progress=False, workers=2)

    remote, local = ArrayRecordSource(out), ArrayRecordSource(str(tmp_path / "local"))
    assert remote.shards[0] == out + "/train-00000-of-00003.array_record"
    assert len(remote) == len(local) == 11
    assert [outcome(remote, i) for i in range(11)] == [outcome(local, i) for i in range(11)]
    assert outcome(remote, 10)[:2] == ("missing_image", f"{tmp_path}/gone.png: no such file")
    assert native_reads(fake_gcs, "train-0000"), "array_record did not read the shards itself"
    assert remote.describe(10).startswith(out + "/train-00002-of-00003.array_record record")

    # a glob of remote shards (matched through gcsfs, counted from the index.json beside them) and the batches
    globbed = ArrayRecordSource(out + "/train-0000[12]-of-00003.array_record")
    assert [globbed[i].id for i in range(3)] == [local[i].id for i in range(3, 6)]
    common = ["data.source=arrayrecord", "train.batch_size=4", "data.num_threads=2", "data.prefetch=0"]
    remote_batches = make_train_iterator(tiny_config(*common, f"data.arrayrecord_path={out}"))
    local_batches = make_train_iterator(tiny_config(*common, f"data.arrayrecord_path={tmp_path / 'local'}"))
    for _ in range(3):                                                  # 12 samples: past the end of the epoch
        a, b = next(remote_batches), next(local_batches)
        assert ids_of(a) == ids_of(b)
        for key in ("input_ids", "loss_mask", "pixel_values", "bad_samples"):
            np.testing.assert_array_equal(a[key], b[key])

    fake_gcs.server.delete(fake_gcs.bucket, "shards/index.json")      # now the native reader counts the records
    unindexed = ArrayRecordSource(out + "/*.array_record")
    assert len(unindexed) == 11 and [unindexed[i].id for i in range(10)] == [local[i].id for i in range(10)]


def test_the_converter_command_writes_to_gcs_from_a_fresh_process(fake_gcs, tmp_path):
    """`python -m llava_jax.data.to_arrayrecord --out gs://...`: a new process, pointed at the server by the
    environment alone (fake_gcs.env), as a user's job would be by its credentials."""
    json_path = image_dataset(tmp_path, 3)
    env = {**os.environ, **fake_gcs.env, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "llava_jax.data.to_arrayrecord", "--json", json_path, "--out",
                           fake_gcs.url("cli"), "--shards", "2", "--no-progress", "--workers", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["records"] == 3
    source = ArrayRecordSource(fake_gcs.url("cli"))
    assert [source[i].id for i in range(3)] == ["s0", "s1", "s2"]
    with open(tmp_path / "img2.png", "rb") as f:
        assert source[2].images == [f.read()]


# ------------------------------------------------------------------------ c. missing shards and buckets

def test_a_missing_remote_shard_or_bucket_fails_fast_with_its_path(fake_gcs, tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader
    convert(write_json(tmp_path / "d.json", [record("a", image=None), record("b", image=None)]), None,
            fake_gcs.url("shards"), shards=2, progress=False, workers=1)
    missing = fake_gcs.url("shards/train-00001-of-00002.array_record")
    fake_gcs.server.delete(fake_gcs.bucket, "shards/train-00001-of-00002.array_record")

    def native_read(path):
        reader = ArrayRecordReader(path)          # array_record opens lazily (a missing local file: the same)
        assert not reader.ok() and reader.num_records() == 0
        return reader.read([0])

    cases = {
        # in index.json (so never opened to count it) but gone: the first read names the object
        "index lists a gone shard": (lambda: ArrayRecordSource(fake_gcs.url("shards"))[1], missing),
        "shard path (in the index)": (lambda: ArrayRecordSource(missing)[0], missing),
        "shard path (no index)": (lambda: ArrayRecordSource(fake_gcs.url("noindex/x.array_record")),
                                  "noindex/x.array_record: no such ArrayRecord shard"),
        "no such directory": (lambda: ArrayRecordSource(fake_gcs.url("nothing/here")), "nothing/here: no such"),
        "no such bucket": (lambda: ArrayRecordSource("gs://no-such-bucket-x/shards"), "no-such-bucket-x/shards"),
        "glob matching nothing": (lambda: ArrayRecordSource(fake_gcs.url("shards/*.nope")), "no ArrayRecord shard"),
        "native reader, no such object": (lambda: native_read(missing), "No such object"),
        "native reader, no such bucket": (lambda: native_read("gs://no-such-bucket-x/a.array_record"),
                                          "The specified bucket does not exist"),
    }
    seconds = {}
    for what, (call, named) in cases.items():
        start = time.perf_counter()
        with pytest.raises(Exception) as info:
            call()
        seconds[what] = round(time.perf_counter() - start, 2)
        assert named in str(info.value), f"{what}: {type(info.value).__name__}: {info.value}"
        assert seconds[what] < FAST_FAILURE_S, f"{what} took {seconds[what]}s"
    print("failure times (s):", seconds)


def test_a_checkpoint_dir_in_a_missing_bucket_fails_before_training(fake_gcs):
    from llava_jax.checkpoint import RunCheckpointer
    from llava_jax.config import CheckpointConfig
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no-such-bucket-x"):
        RunCheckpointer("gs://no-such-bucket-x/run/checkpoints", CheckpointConfig())
    assert time.perf_counter() - start < FAST_FAILURE_S


# ---------------------------------------------------------------------------- b. Orbax checkpoints on GCS

RUN = ["data.source=synthetic", "data.synthetic_size=64", "data.num_threads=1", "data.prefetch=0",
       "train.batch_size=8", "train.steps=6", "train.learning_rate=3e-3", "train.warmup_steps=1",
       "train.stage=full", "train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep=2",
       "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_checkpoints_on_gcs_save_and_resume_with_the_uninterrupted_runs_losses(fake_gcs, tmp_path):
    """An uninterrupted run saves steps 2, 4 and 6 to gs:// (keep=2: step 2 is deleted from the bucket again); with
    step 6 deleted too, the same command resumes from step 4 (restored from gs://: params, optimizer state and data
    position) and trains steps 5-6 to the same losses, bit for bit."""
    from llava_jax.train.loop import train
    from tests.helpers import TINY_MODEL
    remote, workdir = fake_gcs.url("run/checkpoints"), str(tmp_path / "run")
    config = load_config(None, TINY_MODEL + RUN + [f"checkpoint.dir={remote}"])
    start = time.perf_counter()
    assert train(config, workdir)["final_step"] == 6
    saved_s = time.perf_counter() - start
    expected = losses(workdir)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and not os.path.exists(os.path.join(workdir, "checkpoints"))
    names = fake_gcs.names("run/checkpoints/")
    assert {n.split("/")[2] for n in names} == {"4", "6"}, names       # step 2 garbage-collected through gcsfs
    for item in ("state", "data", "config"):
        assert any(n.startswith(f"run/checkpoints/4/{item}/") for n in names), (item, names)
    assert "run/checkpoints/4/data/process_0-of-1.json" in names, names
    assert any(r[0] == "POST" and r[3].startswith("tensorstore/") for r in fake_gcs.server.requests), \
        "the arrays were not written by tensorstore's gcs driver"

    for name in fake_gcs.names("run/checkpoints/6/"):
        fake_gcs.server.delete(fake_gcs.bucket, name)
    start = time.perf_counter()
    summary = train(config, workdir)
    print(f"first run {saved_s:.1f}s, resumed run {time.perf_counter() - start:.1f}s")
    assert summary["final_step"] == 6
    assert losses(workdir) == expected                                  # steps 5-6 after restoring step 4
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    assert {n.split("/")[2] for n in fake_gcs.names("run/checkpoints/")} == {"4", "6"}
