"""`python -m llava_jax.data.inspect`: one JSON line per training sample, in source order, with a real tokenizer."""
import json
import subprocess
import sys

import yaml
from data_helpers import record, write_json

from tests.helpers import TINY_MODEL
from tests.real_tokenizers import SENTENCEPIECE_V1

REPO_ROOT = __file__.rsplit("/tests/", 1)[0]


def test_inspect_prints_each_sample_in_source_order(tmp_path):
    records = [record("first", "What colour is it?", "Red.", "a.png"), {"id": "broken", "conversations": []},
               record("second", "Two questions?", "Yes, two.", image=None), record("third", "Third?", "No.", "c.png")]
    config = {"data": {"source": "llava_json", "json_path": write_json(tmp_path / "data.json", records),
                       "tokenizer": SENTENCEPIECE_V1, "template": "vicuna_v1", "image_placement": "front"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [item.replace("model.decoder.vocab_size=300", "model.decoder.vocab_size=32064").replace(
        "model.image_token_id=299", "model.image_token_id=32000") for item in TINY_MODEL] + ["data.max_length=512"]
    result = subprocess.run([sys.executable, "-m", "llava_jax.data.inspect", "--config", str(tmp_path / "config.yaml"),
                             "--limit", "3", "--pieces", "--set", *overrides], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["first", "broken", "second"]
    assert "malformed_record" in lines[1]["bad"] and "data.json" in lines[1]["where"]
    first = lines[0]
    assert first["text"].startswith("<s> A chat between") and first["text"].count("<image>") == 1
    assert "USER: <image>\nWhat colour is it? ASSISTANT: Red.</s>" in first["text"]
    assert first["answers"] == ["Red.</s>"] and lines[2]["answers"] == ["Yes, two.</s>"]
    assert first["input_ids"].count(32000) == 16 and len(first["input_ids"]) == len(first["loss_mask"])
    assert first["pieces"][first["loss_mask"].index(1):][:3] == ["▁Red", ".", "</s>"]
