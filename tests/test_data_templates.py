"""Chat templates: hand-built token/mask expectations per template, answer round trips, and mismatch errors."""
import numpy as np
import pytest
from data_helpers import train_hf_tokenizer, train_sentencepiece, train_wordlevel_tokenizer

from llava_jax.data.templates import (TEMPLATES, answer_end_id, answer_spans, check_template, encode_pieces,
                                      generation_prompt, render)
from llava_jax.data.tokenizers import ByteTokenizer, make_tokenizer

IMAGE, TOKENS_PER_IMAGE = 299, 3
BOS, EOS = 257, 258
IM_START, IM_END, START_HEADER, END_HEADER, EOT = 259, 260, 261, 262, 263
TURNS = [("user", "<image>\nQ1?"), ("assistant", "A1"), ("user", "Q2?"), ("assistant", "A2")]


def expected(*parts):
    """parts: (text or list of ids, supervised) -> (ids, mask) as the template should produce them."""
    ids, mask = [], []
    for part, supervised in parts:
        part_ids = list(part.encode()) if isinstance(part, str) else part
        ids += part_ids
        mask += [float(supervised)] * len(part_ids)
    return ids, mask


IMG = [IMAGE] * TOKENS_PER_IMAGE
VICUNA_SYSTEM = TEMPLATES["vicuna_v1"].default_system
HAND_BUILT = {
    "plain": expected(([BOS], 0), (IMG, 0), ("\nQ1?\n", 0), ("A1", 1), ([EOS], 1), ("Q2?\n", 0), ("A2", 1),
                      ([EOS], 1)),
    "vicuna_v1": expected(([BOS], 0), (VICUNA_SYSTEM + " USER: ", 0), (IMG, 0), ("\nQ1? ASSISTANT: ", 0),
                          ("A1", 1), ([EOS], 1), ("USER: Q2? ASSISTANT: ", 0), ("A2", 1), ([EOS], 1)),
    "llama3": expected(([BOS, START_HEADER], 0), ("user", 0), ([END_HEADER], 0), ("\n\n", 0), (IMG, 0),
                       ("\nQ1?", 0), ([EOT, START_HEADER], 0), ("assistant", 0), ([END_HEADER], 0), ("\n\n", 0),
                       ("A1", 1), ([EOT], 1), ([START_HEADER], 0), ("user", 0), ([END_HEADER], 0),
                       ("\n\nQ2?", 0), ([EOT, START_HEADER], 0), ("assistant", 0), ([END_HEADER], 0),
                       ("\n\n", 0), ("A2", 1), ([EOT], 1)),
    "chatml": expected(([IM_START], 0), ("system\nYou are a helpful assistant.", 0), ([IM_END], 0), ("\n", 0),
                       ([IM_START], 0), ("user\n", 0), (IMG, 0), ("\nQ1?", 0), ([IM_END], 0), ("\n", 0),
                       ([IM_START], 0), ("assistant\n", 0), ("A1", 1), ([IM_END], 1), ("\n", 0),
                       ([IM_START], 0), ("user\nQ2?", 0), ([IM_END], 0), ("\n", 0), ([IM_START], 0),
                       ("assistant\n", 0), ("A2", 1), ([IM_END], 1), ("\n", 0)),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_loss_mask_matches_hand_built_expectation(name):
    ids, mask = encode_pieces(render(TEMPLATES[name], TURNS), ByteTokenizer(IMAGE), TOKENS_PER_IMAGE)
    want_ids, want_mask = HAND_BUILT[name]
    assert ids.tolist() == want_ids
    assert mask.tolist() == want_mask
    assert ids.dtype == np.int32 and mask.dtype == np.float32


def tokenizer_for(kind, tiny_config, tmp_path):
    if kind == "byte":
        config = tiny_config()
    elif kind == "hf":
        config = tiny_config(f"data.tokenizer={train_hf_tokenizer(tmp_path / 'tokenizer.json')}",
                             "model.decoder.vocab_size=400", "model.image_token_id=399")
    else:
        config = tiny_config(f"data.tokenizer={train_sentencepiece(tmp_path)}")
    return make_tokenizer(config.data, config.model)


@pytest.mark.parametrize("kind", ["byte", "hf", "sentencepiece"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_unmasked_tokens_decode_to_exactly_the_answers(name, kind, tiny_config, tmp_path):
    tokenizer = tokenizer_for(kind, tiny_config, tmp_path)
    turns = [("system", "You are a helpful assistant."), ("user", "<image>\nWhat is in the picture?"),
             ("assistant", "A red circle."), ("user", "Is it big?"), ("assistant", "Yes, it is big.")]
    template = TEMPLATES[name]
    ids, mask = encode_pieces(render(template, turns), tokenizer, 4)
    spans = answer_spans(mask)
    assert [tokenizer.decode(ids[start:end]) for start, end in spans] == ["A red circle.", "Yes, it is big."]
    assert [int(ids[end - 1]) for _, end in spans] == [answer_end_id(template, tokenizer)] * 2
    assert (ids == tokenizer.image_token_id).sum() == 4 and mask[ids == tokenizer.image_token_id].sum() == 0


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_the_prefix_before_the_last_answer(name):
    template, tokenizer = TEMPLATES[name], ByteTokenizer(IMAGE)
    full, mask = encode_pieces(render(template, TURNS), tokenizer, TOKENS_PER_IMAGE)
    prompt, prompt_mask = encode_pieces(generation_prompt(template, TURNS), tokenizer, TOKENS_PER_IMAGE)
    last_answer_start = answer_spans(mask)[-1][0]
    assert prompt.tolist() == full[:last_answer_start].tolist()
    assert prompt_mask.sum() == mask[:last_answer_start].sum() == len("A1") + 1


def test_system_prompt_precedence():
    template, tokenizer = TEMPLATES["chatml"], ByteTokenizer(IMAGE)
    def text(turns, system_prompt=None):
        return tokenizer.decode(encode_pieces(render(template, turns, system_prompt), tokenizer, 1)[0])
    assert text(TURNS[:2]).startswith("system\nYou are a helpful assistant.")
    assert text(TURNS[:2], "Be brief.").startswith("system\nBe brief.")
    assert text([("system", "Own."), *TURNS[:2]], "Be brief.").startswith("system\nOwn.")
    assert text(TURNS[:2], "").startswith("user\n")


def test_template_tokenizer_mismatch_raises(tiny_config, tmp_path):
    config = tiny_config(f"data.tokenizer={train_wordlevel_tokenizer(tmp_path / 'words.json')}")
    tokenizer = make_tokenizer(config.data, config.model)        # maps unseen words to [UNK]: no round trip
    with pytest.raises(ValueError, match="data.template=plain.*supervised tokens decode to"):
        check_template(TEMPLATES["plain"], tokenizer, 4)


def test_template_special_token_missing_from_tokenizer_raises(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>", "<s>", "</s>"))
    config = tiny_config(f"data.tokenizer={path}", "model.decoder.vocab_size=400", "model.image_token_id=399")
    with pytest.raises(ValueError, match="no token '<\\|im_start\\|>'"):
        check_template(TEMPLATES["chatml"], make_tokenizer(config.data, config.model), 4)
