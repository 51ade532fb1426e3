"""Benchmark tasks run with a model (llava_jax.task_eval and the evaluate CLI): batched, length-grouped, sharded
generation gives the answers one-at-a-time generation gives; runs resume; bad items are skipped and counted; two
processes write what one writes."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from llava_jax.config import MeshConfig
from llava_jax.data.examples import Example, ExampleEncoder
from llava_jax.data.tokenizers import make_tokenizer
from llava_jax.evaluate import main
from llava_jax.generate import generate_answers
from llava_jax.model_params import load_model
from llava_jax.sharding import make_mesh
from llava_jax.task_eval import PREDICTIONS, evaluation_config, run_task
from llava_jax.tasks import get_task
from llava_jax.tasks.base import read_predictions
from tests.run_helpers import write_tiny_run
from tests.test_train_cli import free_port

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tasks")
POPE = os.path.join(FIXTURES, "pope")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    write_tiny_run(workdir, step=3)
    return workdir


def one_at_a_time(config, params, items):
    """Each item alone through generate.generate_answers, on one device: the reference for the batched runner."""
    config = evaluation_config(config, items, NEW_TOKENS)
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    params = jax.device_put(params, jax.devices()[0])
    answers = {}
    for item in items:
        example = encoder.eval_example(Example(item.question_id, [("user", item.prompt), ("assistant", "x")],
                                               list(item.images)))
        answers[item.question_id] = generate_answers(config, params, [example], NEW_TOKENS, batch_size=1)[0].strip()
    return answers


@pytest.mark.parametrize("fsdp,batch_size", [(8, 3), (2, 3)])   # one batch of 8 rows; two of 4 rows
def test_sharded_length_grouped_batches_give_the_one_at_a_time_answers(tiny_run, tmp_path, fsdp, batch_size):
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=1), jax.devices()[:fsdp])
    config, params = load_model(tiny_run, mesh=mesh)
    items = get_task("pope").load(POPE)
    summary = run_task(config, params, "pope", POPE, str(tmp_path), batch_size=batch_size,
                       max_new_tokens=NEW_TOKENS, progress=False)
    predictions = read_predictions(str(tmp_path / PREDICTIONS))
    assert predictions == one_at_a_time(config, params, items)
    assert summary == {**get_task("pope").score(items, predictions), "skipped": {}, "seconds": summary["seconds"],
                       "prompt_suffix": "Answer the question using a single word or phrase."}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_rerun_predicts_only_what_is_missing(tiny_run, tmp_path, monkeypatch):
    config, params = load_model(tiny_run)
    run_task(config, params, "pope", POPE, str(tmp_path), batch_size=8, max_new_tokens=NEW_TOKENS, progress=False)
    lines = (tmp_path / PREDICTIONS).read_text().splitlines()
    complete = read_predictions(str(tmp_path / PREDICTIONS))
    (tmp_path / PREDICTIONS).write_text("\n".join(lines[:5]) + "\n")       # as if stopped after 5 answers
    import llava_jax.task_eval as task_eval
    rows = []
    original = task_eval.generate_shares

    def counting(*args, **kwargs):
        row_ids = args[9]
        rows.extend(int(index) for index, _ in row_ids if index >= 0)
        return original(*args, **kwargs)
    monkeypatch.setattr(task_eval, "generate_shares", counting)
    run_task(config, params, "pope", POPE, str(tmp_path), batch_size=8, max_new_tokens=NEW_TOKENS, progress=False)
    assert len(rows) == len(complete) - 5
    assert read_predictions(str(tmp_path / PREDICTIONS)) == complete


def test_an_unreadable_image_is_skipped_counted_and_scored_as_missing(tiny_run, tmp_path):
    data = tmp_path / "pope"
    shutil.copytree(POPE, data)
    first_image = sorted(os.listdir(data / "val2014"))[0]
    (data / "val2014" / first_image).write_bytes(b"not an image")
    items = get_task("pope").load(str(data))
    hit = [item.question_id for item in items if item.images[0].endswith(first_image)]
    config, params = load_model(tiny_run)
    summary = run_task(config, params, "pope", str(data), str(tmp_path / "out"), batch_size=8,
                       max_new_tokens=NEW_TOKENS, progress=False)
    assert summary["skipped"] == {"corrupt_image": len(hit)} and summary["missing"] == len(hit) > 0
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(record["question_id"] for record in skipped) == sorted(hit)
    assert set(read_predictions(str(tmp_path / "out" / PREDICTIONS))) == {item.question_id for item in items} - set(hit)


def test_blind_run_scores_blank_images_beside_the_real_ones(tiny_run, tmp_path, capsys):
    main(["--task", "pope", "--data", POPE, "--workdir", tiny_run, "--out", str(tmp_path), "--blind",
          "--max-new-tokens", str(NEW_TOKENS), "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    items = get_task("pope").load(POPE)
    blind = read_predictions(str(tmp_path / "predictions_blind.jsonl"))
    assert set(blind) == {item.question_id for item in items}
    assert summary["blind"] == get_task("pope").score(items, blind)


def test_score_cli_scores_llava_style_predictions(tmp_path, capsys):
    items = get_task("pope").load(POPE)
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": item.question_id, "text": "No, there is not."}) + "\n"
                            for item in items))
    main(["score", "--task", "pope", "--predictions", str(path), "--data", POPE])
    summary = json.loads(capsys.readouterr().out)
    assert summary == get_task("pope").score(items, {item.question_id: "No, there is not." for item in items})
    assert summary["mean"]["yes_ratio"] == 0.0


def test_task_without_data_is_refused(tiny_run):
    with pytest.raises(SystemExit):
        main(["--task", "pope", "--workdir", tiny_run])


def test_two_processes_write_the_predictions_of_one(tiny_run, tmp_path):
    import subprocess
    import sys
    single = tmp_path / "single"
    main(["--task", "pope", "--data", POPE, "--workdir", tiny_run, "--out", str(single), "--batch-size", "4",
          "--max-new-tokens", str(NEW_TOKENS), "--no-progress"])
    port = free_port()
    command = [sys.executable, "-m", "llava_jax.evaluate", "--task", "pope", "--data", POPE, "--workdir", tiny_run,
               "--out", str(tmp_path / "multi"), "--batch-size", "4", "--max-new-tokens", str(NEW_TOKENS),
               "--no-progress"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={
        **os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
        "JAX_INIT_TIMEOUT_S": "120"}) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert (read_predictions(str(tmp_path / "multi" / PREDICTIONS))
            == read_predictions(str(single / PREDICTIONS)))
    lines = (tmp_path / "multi" / PREDICTIONS).read_text().splitlines()
    assert len(lines) == len(get_task("pope").load(POPE))           # written once, by process 0
    np.testing.assert_equal(json.loads(outputs[0].strip().splitlines()[-1])["n"], len(lines))


def test_config_task_names_are_the_registry_names():
    import typing
    from llava_jax.config import EvalTask
    from llava_jax.tasks import TASK_NAMES
    assert typing.get_args(typing.get_type_hints(EvalTask)["task"]) == TASK_NAMES


def test_training_scores_eval_tasks_into_its_metrics(tmp_path):
    from llava_jax.config import load_config
    from llava_jax.train.loop import train
    from tests.test_train_cli import RUN, read_metrics
    config = load_config(None, RUN + [
        "train.steps=2", "train.eval_every=2", "train.eval_limit=2",
        f"train.eval_tasks=[{{task: pope, data: {POPE}, limit: 5, max_new_tokens: 4}}]"])
    train(config, str(tmp_path))
    last = read_metrics(tmp_path)[-1]
    assert last["step"] == 2 and last["eval/pope/n"] == 5
    assert 0.0 <= last["eval/pope/mean/accuracy"] <= 1.0 and "eval/accuracy" in last     # the eval set too
    predictions = read_predictions(str(tmp_path / "eval" / "pope" / "step_2" / PREDICTIONS))
    assert len(predictions) == 5


def test_eval_tasks_need_eval_every(tiny_config):
    from llava_jax.config import ConfigError
    with pytest.raises(ConfigError, match="train.eval_every"):
        tiny_config(f"train.eval_tasks=[{{task: pope, data: {POPE}}}]")
    with pytest.raises(ConfigError, match=r"train.eval_tasks\[0\].data"):
        tiny_config("train.eval_every=5", "train.eval_tasks=[{task: mme}]")


def test_vqav2_test_dev_run_writes_the_evalai_submission(tiny_run, tmp_path):
    data = tmp_path / "vqav2"
    data.mkdir()
    shutil.copy(os.path.join(FIXTURES, "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl"), data)
    shutil.copytree(os.path.join(FIXTURES, "vqav2", "test2015"), data / "test2015")
    config, params = load_model(tiny_run)
    summary = run_task(config, params, "vqav2", str(data), str(tmp_path / "out"), max_new_tokens=NEW_TOKENS,
                       progress=False)
    items = get_task("vqav2").load(str(data))
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    predictions = read_predictions(str(tmp_path / "out" / PREDICTIONS))
    assert submission == get_task("vqav2").submission(items, predictions)
    assert [record["question_id"] for record in submission] == [int(item.question_id) for item in items]
    assert summary["submission"].endswith("submission.json") and "EvalAI" in summary["scored_by"]
