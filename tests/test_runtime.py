"""What `auto` becomes on each backend: the attention kernel and packing (llava_jax/runtime.py)."""
import pytest

from llava_jax.config import load_config
from llava_jax.runtime import choose_kernel, packs, resolve_auto

PRESETS = ["configs/llava15_7b_stage1.yaml", "configs/llava15_7b_stage2.yaml", "configs/llava15_13b_stage1.yaml",
           "configs/llava15_13b_stage2.yaml", "configs/llava_next_7b_stage2.yaml"]


@pytest.mark.parametrize("backend, kernel, pack", [("tpu", "splash", True), ("gpu", "cudnn", False),
                                                   ("cpu", "xla", True)])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_pick_the_fast_kernel_and_pack_where_it_takes_segments(preset, backend, kernel, pack):
    config = load_config(preset)
    assert (config.model.attention, config.data.pack) == ("auto", "auto")
    resolved, lines = resolve_auto(config, backend)
    assert (resolved.model.attention, resolved.data.pack) == (kernel, pack)
    assert f"model.attention: auto -> {kernel}" in lines[1] and lines[0] == f"data.pack: auto -> {str(pack).lower()}"
    assert (config.model.attention, config.data.pack) == ("auto", "auto")        # the original is untouched


@pytest.mark.parametrize("backend, dtype, head_dims, packed, length, kernel, why", [
    ("gpu", "bfloat16", (128, 64), True, None, "xla", "packed rows"),
    ("gpu", "float32", (128, 64), False, None, "xla", "bfloat16/float16"),
    ("gpu", "bfloat16", (100, 64), False, None, "xla", "multiples of 8"),
    ("tpu", "bfloat16", (96, 64), True, 2048, "xla", "head dims of 64"),
    ("tpu", "bfloat16", (128, 64), True, 2000, "xla", "multiple of 128"),
    ("tpu", "float32", (128, 64), True, 2048, "splash", "TPU"),
])
def test_fallbacks_say_why(backend, dtype, head_dims, packed, length, kernel, why):
    chosen, reason = choose_kernel(backend, dtype, head_dims, packed, length)
    assert chosen == kernel and why in reason


def config(*overrides):
    return load_config(None, list(overrides))          # default sizes: head dims 128 (decoder) and 64 (vision)


def test_explicit_settings_are_kept_and_pack_auto_follows_an_explicit_kernel():
    assert resolve_auto(config("model.attention=xla", "data.pack=true"), "gpu")[0].model.attention == "xla"
    assert packs(config("model.attention=cudnn", "model.dtype=bfloat16", "data.pack=auto"), "gpu") is False
    assert packs(config("model.attention=xla", "data.pack=auto"), "gpu") is True
    explicit_pack = resolve_auto(config("model.dtype=bfloat16", "data.pack=true"), "gpu")[0]
    assert (explicit_pack.model.attention, explicit_pack.data.pack) == ("xla", True)   # cuDNN cannot take segments


def test_cudnn_with_packing_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.attention: cudnn .* packed segments"):
        config("model.attention=cudnn", "model.dtype=bfloat16", "data.pack=true")


def test_rows_left_unpacked_by_auto_are_one_sample_long():
    """The LLaVA-NeXT preset packs 4096-token samples into 8192-token rows; where auto does not pack (cuDNN on GPU)
    its rows become one sample long instead of half padding, and the log says so."""
    preset = load_config("configs/llava_next_7b_stage2.yaml")
    gpu, lines = resolve_auto(preset, "gpu")
    assert (gpu.data.pack, gpu.data.max_length, gpu.data.max_sample_length) == (False, 4096, None)
    assert lines[-1].startswith("data.max_length: 8192 -> 4096")
    tpu, _ = resolve_auto(preset, "tpu")
    assert (tpu.data.pack, tpu.data.max_length, tpu.data.sample_length) == (True, 8192, 4096)
