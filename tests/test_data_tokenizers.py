"""Tokenizers: byte / tokenizer.json / sentencepiece behind one interface, special ids, and config checks."""
import pickle

import pytest
from data_helpers import train_hf_tokenizer, train_sentencepiece

from llava_jax.data.tokenizers import make_tokenizer


def test_byte_tokenizer_round_trips_utf8_and_skips_specials(tiny_config):
    tokenizer = make_tokenizer(tiny_config().data, tiny_config().model)
    ids = tokenizer.encode("héllo <image>")
    assert ids == list("héllo <image>".encode())
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (256, 257, 258, 264)
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.image_token_id, tokenizer.eos_id]) == "héllo <image>"
    assert tokenizer.token_id("<|im_end|>") == 260


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
    return tiny_config(f"data.tokenizer={path}", "model.decoder.vocab_size=400", "model.image_token_id=399",
                       *overrides)


def test_hf_tokenizer_finds_specials_and_adds_none(tiny_config, tmp_path):
    config = hf_config(tiny_config, train_hf_tokenizer(tmp_path / "tokenizer.json"))
    tokenizer = make_tokenizer(config.data, config.model)
    ids = tokenizer.encode("A red circle.")
    assert tokenizer.bos_id == tokenizer.token_id("<s>") and tokenizer.eos_id == tokenizer.token_id("</s>")
    assert tokenizer.pad_id == tokenizer.token_id("<pad>")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, 399]) == "A red circle."


def test_hf_tokenizer_configured_special_tokens(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json")
    config = hf_config(tiny_config, path, "data.eos_token=<|im_end|>", "data.pad_token=</s>")
    tokenizer = make_tokenizer(config.data, config.model)
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>") and tokenizer.pad_id == tokenizer.token_id("</s>")
    with pytest.raises(ValueError, match="data.bos_token"):
        config = hf_config(tiny_config, path, "data.bos_token=<|begin_of_text|>")
        make_tokenizer(config.data, config.model)


def test_hf_tokenizer_image_token_must_be_dedicated(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>", "<s>", "</s>", "<image>"))
    ordinary = hf_config(tiny_config, path, "model.image_token_id=100")
    with pytest.raises(ValueError, match="model.image_token_id.*ordinary token"):
        make_tokenizer(ordinary.data, ordinary.model)
    added = hf_config(tiny_config, path, "model.image_token_id=3")              # the added special "<image>"
    assert make_tokenizer(added.data, added.model).image_token_id == 3


def test_file_tokenizer_larger_than_the_model_vocab_is_rejected(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={train_hf_tokenizer(tmp_path / 'tokenizer.json')}")
    with pytest.raises(ValueError, match="model.decoder.vocab_size"):
        make_tokenizer(config.data, config.model)


def test_missing_tokenizer_file_is_named(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={tmp_path / 'nope.model'}")
    with pytest.raises(ValueError, match="data.tokenizer.*nope.model"):
        make_tokenizer(config.data, config.model)


def test_sentencepiece_tokenizer(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={train_sentencepiece(tmp_path)}", "model.image_token_id=299")
    tokenizer = make_tokenizer(config.data, config.model)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 3, 120)
    ids = tokenizer.encode("Yes, it is big.")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.token_id("<|im_end|>"), 299]) == "Yes, it is big."
    assert pickle.loads(pickle.dumps(tokenizer)).encode("Yes, it is big.") == ids      # worker processes


def test_sentencepiece_image_token_must_be_dedicated(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={train_sentencepiece(tmp_path)}", "model.image_token_id=50")
    with pytest.raises(ValueError, match="model.image_token_id"):
        make_tokenizer(config.data, config.model)
