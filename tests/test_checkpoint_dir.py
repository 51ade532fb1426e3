"""checkpoint.dir: a run's checkpoints outside its workdir (e.g. gs://), resumed from there."""
import os

import orbax.checkpoint as ocp

import llava_jax.checkpoint as checkpoint
from llava_jax.config import CheckpointConfig, load_config
from llava_jax.train.loop import train
from tests.fake_gcs import fake_gcs  # noqa: F401 -- the fixture
from tests.test_train_cli import RUN, read_metrics


def test_a_remote_checkpoint_directory_stays_remote(monkeypatch, fake_gcs):
    seen = {}

    class Manager:
        def __init__(self, directory, options):
            seen["directory"] = directory
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
    remote = fake_gcs.url("run/checkpoints")                # gs://<bucket>/...: the write probe reaches the bucket
    checkpoint.RunCheckpointer(remote, CheckpointConfig())
    assert str(seen["directory"]) == remote                                 # not made a local path
    assert fake_gcs.names() == []                                           # the probe object is gone again
    checkpoint.RunCheckpointer("relative/checkpoints", CheckpointConfig())
    assert str(seen["directory"]) == os.path.abspath("relative/checkpoints")
    assert ocp.CheckpointManager is Manager


def test_checkpoints_go_to_checkpoint_dir_and_the_run_resumes_from_it(tmp_path):
    elsewhere = tmp_path / "bucket" / "ckpt"
    overrides = RUN + ["train.steps=2", "checkpoint.every_steps=1", f"checkpoint.dir={elsewhere}"]
    train(load_config(None, overrides), str(tmp_path / "run"))
    assert sorted(os.listdir(elsewhere))[-1] == "2" and not os.path.exists(tmp_path / "run" / "checkpoints")
    summary = train(load_config(None, overrides[:-3] + ["train.steps=3", "checkpoint.every_steps=1",
                                                        f"checkpoint.dir={elsewhere}"]), str(tmp_path / "run"))
    assert summary["final_step"] == 3
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == [1, 2, 3]      # resumed after 2
