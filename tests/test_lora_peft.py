"""LoRA adapters interoperate with PEFT: ours load into peft.PeftModel, `--lora merge` exports need no PEFT, adapters
PEFT made load into our model (`hf-to-jax --adapter`), and adapters that do not fit train.lora are refused.

Tiny random float32 models built offline; every adapter has non-zero random A and B (LoRA's B starts at zero, which
would make any adapter look right), and the projector differs from the base's, so a dropped one shows up.
"""
import json

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlavaForConditionalGeneration

from llava_jax import convert
from llava_jax.config import load_config
from llava_jax.hf.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, params_from_peft, peft_adapter
from llava_jax.model_params import load_model
from llava_jax.models.llava import LlavaModel, init_params, model_variables
from tests.helpers import TINY_MODEL
from tests.test_hf_parity import (TOLERANCE, clip_vision_config, hf_logits, images, llama_config, max_error, nhwc,
                                  sequence, tiny_llava)

LORA = ["train.lora.rank=4", "train.lora.alpha=8"]
BOTH_TOWERS = ["train.lora.vision=true",
               "train.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,fc1,fc2]"]
LANGUAGE_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"  # LLaVA's recipe
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]


def lora_config(*overrides):
    return load_config(None, TINY_MODEL + LORA + list(overrides))


def random_adapters(params: dict, seed: int) -> dict:
    """params with every LoRA B (and A) and the projector perturbed: B is zero at init."""
    rng = np.random.default_rng(seed)
    def perturb(x):
        return np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32)
    return {**params, "lora": jax.tree.map(perturb, params["lora"]),
            "projector": jax.tree.map(perturb, params["projector"])}


def inputs(config):
    """(ids [1, 24], attention_mask [1, 24], HF pixels [1, 3, 28, 28]) with one image."""
    rng = np.random.default_rng(0)
    ids, mask = sequence(rng, 1, config.model.tokens_per_image, 24)
    return ids[None], mask[None], images(rng, 1)


def our_logits(config, params, ids, mask, pixels):
    return np.asarray(LlavaModel(config.model).apply(model_variables(params), ids, nhwc(pixels)[None],
                                                     attention_mask=mask))


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """A converted LoRA model (both towers, every target kernel, scanned layers) -> (config, params, its directory,
    our logits on `inputs`)."""
    config = lora_config(*BOTH_TOWERS)
    params = random_adapters(init_params(config.model, jax.random.key(0)), seed=1)
    directory = tmp_path_factory.mktemp("lora_model") / "jax"
    convert.save_converted(directory, config, params)
    return config, params, directory, our_logits(config, params, *inputs(config))


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory):
    """A tiny HF LLaVA saved as the base, and PeftModels over it (LoRA with random A and B, the projector as
    modules_to_save, perturbed) saved as adapters: {kind: (peft_model, adapter_dir)}, the base directory."""
    root = tmp_path_factory.mktemp("peft_made")
    tiny_llava(clip_vision_config(), llama_config(), seed=3).save_pretrained(root / "base")
    made = {}
    for kind, targets in (("language", LANGUAGE_REGEX), ("both_towers", ALL_LINEAR)):
        base = LlavaForConditionalGeneration.from_pretrained(root / "base")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                modules_to_save=["multi_modal_projector"]))
        torch.manual_seed(4)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.add_(torch.randn_like(param) * 0.05)
        model.save_pretrained(root / kind)
        made[kind] = (model.eval(), root / kind)
    return made, root / "base"


# ------------------------------------------------------------------------------------------------ export

def test_exported_adapter_on_the_base_gives_our_logits_in_peft(lora_model, tmp_path):
    config, _, directory, ours = lora_model
    convert.main(["jax-to-hf", "--src", str(directory), "--out", str(tmp_path / "hf"), "--lora", "peft"])
    assert {path.name for path in (tmp_path / "hf" / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    ids, mask, pixels = inputs(config)
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert max_error(hf_logits(base, ids, pixels, mask), ours, mask) > 100 * TOLERANCE   # the adapters matter
    with torch.no_grad():   # the original base's projector: the adapter's own (modules_to_save) must replace it
        for param in base.model.multi_modal_projector.parameters():
            param.add_(torch.randn_like(param))
    model = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    assert max_error(hf_logits(model, ids, pixels, mask), ours, mask) <= TOLERANCE


def test_exported_adapter_config_is_peft_lora_on_the_adapted_modules(lora_model, tmp_path):
    config, params, _, _ = lora_model
    adapter_config, tensors = peft_adapter(config, params, "base")
    fields = ("peft_type", "r", "lora_alpha", "bias", "modules_to_save", "task_type", "base_model_name_or_path")
    assert {key: adapter_config[key] for key in fields} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "modules_to_save": ["multi_modal_projector"],
        "task_type": None, "base_model_name_or_path": "base"}
    key = "base_model.model.model.vision_tower.encoder.layers.1.self_attn.out_proj.lora_A.weight"
    assert tensors[key].shape == (4, 32)
    adapter = params["lora"]["vision_tower"]["layers"]["self_attn"]["o_proj"]
    np.testing.assert_array_equal(tensors[key], np.asarray(adapter["a"][1]).T)


def test_merged_export_gives_our_logits_without_peft(lora_model, tmp_path):
    config, _, directory, ours = lora_model
    convert.main(["jax-to-hf", "--src", str(directory), "--out", str(tmp_path / "hf"), "--lora", "merge"])
    assert not (tmp_path / "hf" / "adapter").exists()
    ids, mask, pixels = inputs(config)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert max_error(hf_logits(model, ids, pixels, mask), ours, mask) <= TOLERANCE


def test_lora_model_export_without_lora_flag_is_refused(lora_model, tmp_path):
    with pytest.raises(SystemExit, match=r"has LoRA adapters.*--lora peft.*--lora merge"):
        convert.main(["jax-to-hf", "--src", str(lora_model[2]), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_lora_flag_on_a_model_without_adapters_is_refused(tmp_path):
    config = load_config(None, TINY_MODEL)
    convert.save_converted(tmp_path / "jax", config, init_params(config.model, jax.random.key(0)))
    with pytest.raises(SystemExit, match=r"no LoRA adapters.*drop --lora"):
        convert.main(["jax-to-hf", "--src", str(tmp_path / "jax"), "--out", str(tmp_path / "hf"), "--lora", "peft"])


# ------------------------------------------------------------------------------------------------ import

@pytest.mark.parametrize("kind, overrides, targets, vision", [
    ("language", [], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    ("both_towers", ["model.scan_layers=false"],
     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"], True),
])
def test_peft_adapter_imported_gives_peft_logits(peft_made, tmp_path, kind, overrides, targets, vision):
    made, base_dir = peft_made
    model, adapter_dir = made[kind]
    convert.main(["hf-to-jax", "--hf", str(base_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "jax"),
                  *(["--set", *overrides] if overrides else [])])
    config, params = load_model(str(tmp_path / "jax"))
    lora = config.train.lora
    assert (lora.rank, lora.alpha, lora.targets, lora.vision) == (4, 8.0, targets, vision)
    ids, mask, pixels = inputs(config)
    ours = our_logits(config, params, ids, mask, pixels)
    assert max_error(ours, hf_logits(model, ids, pixels, mask), mask) <= TOLERANCE


def test_adapter_import_refuses_a_rank_override_it_does_not_have(peft_made, tmp_path):
    made, base_dir = peft_made
    with pytest.raises(SystemExit, match=r"r=4, but train.lora.rank is 8"):
        convert.main(["hf-to-jax", "--hf", str(base_dir), "--adapter", str(made["language"][1]), "--out",
                      str(tmp_path / "jax"), "--set", "train.lora.rank=8"])


# ------------------------------------------------------------------------------------------ refused adapters

@pytest.fixture(scope="module")
def our_adapter():
    """(adapter_config, tensors) of a rank-4 adapter on the decoder's default targets."""
    config = lora_config()
    return peft_adapter(config, init_params(config.model, jax.random.key(0)))


def test_adapter_of_another_rank_is_refused(our_adapter):
    with pytest.raises(ValueError, match=r"r=4, but train.lora.rank is 8"):
        params_from_peft(lora_config("train.lora.rank=8"), our_adapter)


def test_adapter_of_another_alpha_is_refused(our_adapter):
    with pytest.raises(ValueError, match=r"lora_alpha=8, but train.lora.alpha is 16"):
        params_from_peft(lora_config("train.lora.alpha=16"), our_adapter)


def test_adapter_missing_a_configured_target_is_refused(our_adapter):
    with pytest.raises(ValueError, match=r"has no adapter on 'model\.vision_tower\.encoder\.layers\.0\.mlp\.fc1'.*"
                                         r"vision tower not included.*vision tower included"):
        params_from_peft(lora_config(*BOTH_TOWERS), our_adapter)
    with pytest.raises(ValueError, match=r"adapts 'model\.language_model\.layers\.0\.mlp\.down_proj'.*"
                                         r"train.lora has targets \['q_proj', 'v_proj'\]"):
        params_from_peft(lora_config("train.lora.targets=[q_proj,v_proj]"), our_adapter)


@pytest.mark.parametrize("module", ["lm_head", "model.multi_modal_projector.linear_1",
                                    "model.language_model.layers.0.self_attn.rotary"])
def test_adapter_on_a_module_we_have_no_lora_for_is_refused(our_adapter, module):
    adapter_config, tensors = our_adapter
    extra = {f"base_model.model.{module}.lora_A.weight": np.zeros((4, 48), np.float32),
             f"base_model.model.{module}.lora_B.weight": np.zeros((48, 4), np.float32)}
    with pytest.raises(ValueError, match=rf"'{module}', which has no LoRA in llava-jax"):
        params_from_peft(lora_config(), (adapter_config, {**tensors, **extra}))


@pytest.mark.parametrize("key, value", [("use_dora", True), ("use_rslora", True), ("bias", "all"),
                                        ("rank_pattern", {"q_proj": 8}), ("modules_to_save", ["lm_head"])])
def test_adapter_with_options_we_cannot_reproduce_is_refused(our_adapter, key, value):
    adapter_config, tensors = our_adapter
    with pytest.raises(ValueError, match=key):
        params_from_peft(lora_config(), ({**adapter_config, key: value}, tensors))


def test_adapter_round_trips_through_peft_format():
    config = lora_config()
    params = random_adapters(init_params(config.model, jax.random.key(0)), seed=2)
    adapter_config, tensors = peft_adapter(config, params)
    loaded = params_from_peft(config, (json.loads(json.dumps(adapter_config)), tensors))
    for tree in ("lora", "projector"):
        jax.tree.map(np.testing.assert_array_equal, loaded[tree], jax.tree.map(np.asarray, params[tree]))
