"""Tokenizers: byte / HF directory / tokenizer.json / sentencepiece behind one interface, special ids, and the
checks that stop a tokenizer from disagreeing with the model silently."""
import pickle

import pytest
from data_helpers import image_id_of, train_hf_tokenizer, train_sentencepiece

from llava_jax.data.tokenizers import make_tokenizer


def test_byte_tokenizer_round_trips_utf8_with_offsets_and_specials(tiny_config):
    tokenizer = make_tokenizer(tiny_config().data, tiny_config().model)
    encoding = tokenizer.encode("hé<image></s>")
    assert encoding.ids == [257, *"hé".encode(), 299, 258]
    assert encoding.offsets == [(0, 0), (0, 1), (1, 2), (1, 2), (2, 9), (9, 13)]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (256, 257, 258, 264)
    assert tokenizer.decode(encoding.ids) == "hé"
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "<s>hé<image></s>"
    assert tokenizer.token_id("<|im_end|>") == 260 and tokenizer.encode("x", False).ids == [120]


@pytest.mark.parametrize("overrides, key", [
    (["model.decoder.vocab_size=200", "model.image_token_id=199"], "model.decoder.vocab_size"),
    (["model.image_token_id=100"], "model.image_token_id"),
    (["model.image_token_id=258"], "model.image_token_id"),
])
def test_byte_tokenizer_rejects_small_vocab_and_colliding_image_token(tiny_config, overrides, key):
    config = tiny_config(*overrides)
    with pytest.raises(ValueError, match=key):
        make_tokenizer(config.data, config.model)


def hf_config(tiny_config, path, *overrides):
    return tiny_config(f"data.tokenizer={path}", "model.decoder.vocab_size=400",
                       f"model.image_token_id={image_id_of(path)}", *overrides)


def test_hf_tokenizer_json_finds_specials_and_adds_image_after_its_vocabulary(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = make_tokenizer(hf_config(tiny_config, path).data, hf_config(tiny_config, path).model)
    ids = tokenizer.encode("A red circle.").ids
    assert tokenizer.bos_id == tokenizer.token_id("<s>") and tokenizer.eos_id == tokenizer.token_id("</s>")
    assert tokenizer.pad_id == tokenizer.token_id("<pad>")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids            # no post-processor: adds none
    assert tokenizer.image_token_id == image_id_of(path) == tokenizer.vocab_size - 1
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.image_token_id]) == "A red circle."
    assert pickle.loads(pickle.dumps(tokenizer)).encode("A red circle.").ids == ids    # worker processes


def test_hf_tokenizer_configured_special_tokens(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json")
    config = hf_config(tiny_config, path, "data.eos_token=<|im_end|>", "data.pad_token=</s>")
    tokenizer = make_tokenizer(config.data, config.model)
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>") and tokenizer.pad_id == tokenizer.token_id("</s>")
    with pytest.raises(ValueError, match="data.bos_token"):
        config = hf_config(tiny_config, path, "data.bos_token=<|begin_of_text|>")
        make_tokenizer(config.data, config.model)


def test_tokenizer_image_id_must_be_the_models(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json")
    config = hf_config(tiny_config, path, "model.image_token_id=399")
    with pytest.raises(ValueError, match=f"model.image_token_id: 399, but .* gives <image> the id "
                                         f"{image_id_of(path)}; set model.image_token_id={image_id_of(path)}"):
        make_tokenizer(config.data, config.model)


def test_tokenizer_with_its_own_image_token_keeps_its_id(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>", "<s>", "</s>", "<image>"))
    config = hf_config(tiny_config, path, "model.image_token_id=3")
    assert make_tokenizer(config.data, config.model).image_token_id == 3


def test_pad_token_that_is_the_image_token_is_refused(tiny_config, tmp_path):
    """The 7B preset with a tokenizer.json holding <pad> = 32000 and <image> = 32001 -- here <pad> = 3, <image> = 4."""
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>", "<s>", "</s>", "<pad>", "<image>"))
    config = hf_config(tiny_config, path, "model.image_token_id=4", "data.pad_token=<image>")
    with pytest.raises(ValueError, match="data.pad_token: the pad id 4 .* is the image token id"):
        make_tokenizer(config.data, config.model)


def test_file_tokenizer_larger_than_the_model_vocab_is_rejected(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json")
    config = tiny_config(f"data.tokenizer={path}")                     # vocabulary 300 < 320 ids + <image>
    with pytest.raises(ValueError, match="model.decoder.vocab_size: 300 is smaller than the 321 ids"):
        make_tokenizer(config.data, config.model)


def test_missing_tokenizer_file_is_named(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={tmp_path / 'nope.model'}")
    with pytest.raises(ValueError, match="data.tokenizer.*nope.model"):
        make_tokenizer(config.data, config.model)


def test_unreadable_tokenizer_file_is_named(tiny_config, tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    config = tiny_config(f"data.tokenizer={tmp_path / 'junk.model'}")
    with pytest.raises(ValueError, match="data.tokenizer: cannot load .*junk.model"):
        make_tokenizer(config.data, config.model)


def test_sentencepiece_model_adds_bos_and_keeps_control_tokens(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={train_sentencepiece(tmp_path)}", "model.image_token_id=120")
    tokenizer = make_tokenizer(config.data, config.model)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 3, 121)
    ids = tokenizer.encode("Yes, it is big.<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == tokenizer.token_id("<|im_end|>")
    assert tokenizer.decode(ids) == "Yes, it is big."
    assert pickle.loads(pickle.dumps(tokenizer)).encode("Yes, it is big.").ids == ids[:-1]
