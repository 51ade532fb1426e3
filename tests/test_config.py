"""Config loading: YAML + dotted overrides, round trip to YAML, and errors that name the offending key."""
import pytest
import yaml

from llava_jax.config import config_to_yaml, load_config


def write_yaml(tmp_path, values) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_and_overrides_are_applied(tmp_path):
    path = write_yaml(tmp_path, {"model": {"decoder": {"num_layers": 3}}, "train": {"learning_rate": "1e-3"}})
    config = load_config(path, ["model.decoder.num_layers=4", "train.freeze=[vision, language]"])
    assert config.model.decoder.num_layers == 4
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.train.freeze == ["vision", "language"]


def test_kind_dependent_defaults_are_filled():
    siglip = load_config(None, ["model.vision.kind=siglip"])
    clip = load_config(None, [])
    assert (siglip.model.vision.act, siglip.model.vision.layer_norm_eps) == ("gelu_tanh", 1e-6)
    assert (clip.model.vision.act, clip.model.vision.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert clip.model.decoder.num_kv_heads == clip.model.decoder.num_heads


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["model.decoder.num_layers=4", "data.image_mean=[0.5, 0.5, 0.5]"])
    path = tmp_path / "saved.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(str(path)) == config


def test_tokens_per_image_follows_strategy_and_pixel_shuffle():
    base = ["model.vision.image_size=336", "model.vision.patch_size=14"]
    assert load_config(None, base).model.tokens_per_image == 576
    assert load_config(None, base + ["model.vision_feature_select_strategy=full"]).model.tokens_per_image == 577
    assert load_config(None, base + ["model.projector.pixel_shuffle=true"]).model.tokens_per_image == 144


@pytest.mark.parametrize("overrides,key", [
    (["model.decoder.num_layrs=4"], "model.decoder.num_layers"),              # typo -> suggestion
    (["trian.steps=3"], "train"),                                           # unknown section -> suggestion
    (["model.decoder.num_layers=four"], "model.decoder.num_layers"),        # wrong type
    (["model.decoder.hidden_size=100", "model.decoder.num_heads=3"], "model.decoder.hidden_size"),
    (["model.decoder.num_kv_heads=5"], "model.decoder.num_kv_heads"),       # kv heads must divide heads
    (["model.vision.image_size=300"], "model.vision.image_size"),           # not divisible by patch 14
    (["model.vision.hidden_size=1000"], "model.vision.hidden_size"),        # not divisible by heads
    (["model.image_token_id=40000"], "model.image_token_id"),               # outside the vocabulary
    (["model.vision_feature_layer=30"], "model.vision_feature_layer"),
    (["model.projector.type=mlp2x_relu"], "model.projector.type"),
    (["model.projector.pixel_shuffle=true", "model.vision_feature_select_strategy=full"],
     "model.projector.pixel_shuffle"),
    (["model.dtype=float8"], "model.dtype"),                                # not a choice
    (["train.batch_size=10", "train.grad_accum_steps=4"], "train.batch_size"),
    (["train.stage=warmup"], "train.stage"),
    (["train.grad_clip_norm=-1"], "train.grad_clip_norm"),                 # 0 = no clipping; negative is an error
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh"),
    (["mesh.tensor=0"], "mesh.tensor"),
    (["data.max_length=100"], "data.max_length"),                           # cannot hold a 576-token image
    (["data.max_length=4097"], "data.max_length"),                          # beyond max_position_embeddings
    (["data.source=llava_json"], "data.json_path"),
    (["train.freeze=[vision, eyes]"], "train.freeze[1]"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
])
def test_invalid_config_names_the_key(overrides, key):
    with pytest.raises(ValueError) as error:
        load_config(None, overrides)
    assert key in str(error.value)


def test_typo_suggests_the_closest_key():
    with pytest.raises(ValueError, match="did you mean 'model.decoder.num_layers'"):
        load_config(None, ["model.decoder.num_layrs=4"])


def test_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_config(str(path))


def test_unknown_key_in_yaml_file_is_reported_with_the_file(tmp_path):
    path = write_yaml(tmp_path, {"train": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"run\.yaml.*train\.steps"):
        load_config(path)
