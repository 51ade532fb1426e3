"""Chat templates: each format spelled out as text, token/mask expectations with the byte tokenizer, the generation
prompt, image placement and mismatch errors. Real tokenizers: test_data_real_tokenizers.py."""
import numpy as np
import pytest
from data_helpers import image_id_of, train_hf_tokenizer, train_wordlevel_tokenizer, write_image

from llava_jax.data.bad_samples import BadSample
from llava_jax.data.examples import Example, ExampleEncoder, place_images
from llava_jax.data.templates import TEMPLATES, answer_end_id, answer_spans, check_template, encode
from llava_jax.data.tokenizers import ByteTokenizer, make_tokenizer

IMAGE, TOKENS_PER_IMAGE = 299, 3
BOS, EOS = 257, 258
TURNS = [("user", "<image>\nQ1?"), ("assistant", "A1"), ("user", "Q2?"), ("assistant", "A2")]
VICUNA_SYSTEM = TEMPLATES["vicuna_v1"].default_system
FORMATS = {   # the text of TURNS in each format ({a}</s> with the byte tokenizer's eos text)
    "plain": "<image>\nQ1?\nA1</s>Q2?\nA2</s>",
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nQ1? ASSISTANT: A1</s>USER: Q2? ASSISTANT: A2</s>",
    "mistral_instruct": "[INST] <image>\nQ1? [/INST] A1</s> [INST] Q2? [/INST] A2</s>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nQ1?<|im_end|>\n"
              "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2?<|im_end|>\n<|im_start|>assistant\n"
              "A2<|im_end|>\n",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ1?<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
}
BUILT_IN = sorted(FORMATS)
# The answer spans of each format: the answers with their closing token, and the space before them (a space the
# generation prompt leaves out belongs to the answer).
SUPERVISED = {"plain": ["A1</s>", "A2</s>"], "vicuna_v1": [" A1</s>", " A2</s>"],
              "mistral_instruct": [" A1</s>", " A2</s>"], "chatml": ["A1<|im_end|>", "A2<|im_end|>"],
              "llama3": ["A1<|eot_id|>", "A2<|eot_id|>"]}


@pytest.mark.parametrize("name", BUILT_IN)
def test_format_is_the_documented_text(name):
    conversation = TEMPLATES[name].render(TURNS, ByteTokenizer(IMAGE))
    assert conversation.text == FORMATS[name]
    assert [conversation.text[start:end] for start, end in conversation.answer_spans] == SUPERVISED[name]


@pytest.mark.parametrize("name", BUILT_IN)
def test_byte_ids_and_mask_are_the_text_with_bos_and_expanded_images(name):
    tokenizer = ByteTokenizer(IMAGE)
    ids, mask = encode(TEMPLATES[name].render(TURNS, tokenizer), tokenizer, TOKENS_PER_IMAGE)
    specials = {token: tokenizer.token_id(token) for token in ByteTokenizer.SPECIALS}
    want_ids, want_mask, text = [BOS], [0.0], FORMATS[name]
    supervised = np.zeros(len(text), bool)
    for start, end in TEMPLATES[name].render(TURNS, tokenizer).answer_spans:
        supervised[start:end] = True
    position = 0
    while position < len(text):
        token = next((t for t in [*specials, "<image>"] if text.startswith(t, position)), None)
        if token:
            count = TOKENS_PER_IMAGE if token == "<image>" else 1
            want_ids += [IMAGE if token == "<image>" else specials[token]] * count
            want_mask += [float(supervised[position])] * count
            position += len(token)
        else:
            want_ids.append(ord(text[position]))
            want_mask.append(float(supervised[position]))
            position += 1
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert ids.dtype == np.int32 and mask.dtype == np.float32
    assert [ids[end - 1] for _, end in answer_spans(mask)] == [answer_end_id(TEMPLATES[name], tokenizer)] * 2


@pytest.mark.parametrize("name", BUILT_IN)
def test_generation_prompt_is_the_tokens_before_the_last_answer(name):
    template, tokenizer = TEMPLATES[name], ByteTokenizer(IMAGE)
    full, mask = encode(template.render(TURNS, tokenizer), tokenizer, TOKENS_PER_IMAGE)
    prompt, prompt_mask = encode(template.prompt(TURNS, tokenizer), tokenizer, TOKENS_PER_IMAGE)
    assert prompt.tolist() == full[:answer_spans(mask)[-1][0]].tolist()
    assert prompt_mask.sum() == 0 and not tokenizer.decode(prompt).endswith(" ")


def test_system_prompt_precedence():
    template, tokenizer = TEMPLATES["chatml"], ByteTokenizer(IMAGE)

    def text(turns, system_prompt=None):
        return template.render(turns, tokenizer, system_prompt).text
    assert text(TURNS[:2]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert text(TURNS[:2], "Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text([("system", "Own."), *TURNS[:2]], "Be brief.").startswith("<|im_start|>system\nOwn.<|im_end|>")
    assert text(TURNS[:2], "").startswith("<|im_start|>user\n")


def test_mistral_instruct_puts_the_system_text_in_front_of_the_first_user_turn():
    conversation = TEMPLATES["mistral_instruct"].render([("system", "Be brief."), *TURNS], ByteTokenizer(IMAGE))
    assert conversation.text.startswith("[INST] Be brief.\n\n<image>\nQ1? [/INST] A1</s> [INST] Q2? [/INST]")


def test_image_placement_front_moves_placeholders_like_llava():
    turns = [("user", "What is this <image> thing? "), ("assistant", "A cat <image>?"),
             ("user", " <image> and <image> compared")]
    assert place_images(turns, "keep") == turns
    assert place_images(turns, "front") == [("user", "<image>\nWhat is this  thing?"), turns[1],
                                            ("user", "<image>\n<image>\nand  compared")]


def test_image_placement_is_applied_to_training_and_prompts(tiny_config, tmp_path):
    example = Example("e", [("user", "Describe <image> please"), ("assistant", "Red.")],
                      [write_image(tmp_path / "a.png")])
    for placement, user_text in (("keep", "Describe <image> please"), ("front", "<image>\nDescribe  please")):
        config = tiny_config("data.template=vicuna_v1", f"data.image_placement={placement}", "data.max_length=300")
        tokenizer = make_tokenizer(config.data, config.model)
        encoder, template = ExampleEncoder(config, tokenizer), TEMPLATES["vicuna_v1"]
        turns = [("user", user_text), example.turns[1]]
        n = config.model.tokens_per_image
        expected, _ = encode(template.render(turns, tokenizer), tokenizer, n)
        assert encoder.tokens(example)[0].tolist() == expected.tolist()
        assert encoder.eval_example(example)["prompt_ids"].tolist() == \
            encode(template.prompt(turns, tokenizer), tokenizer, n)[0].tolist()


def test_template_tokenizer_mismatch_raises(tiny_config, tmp_path):
    path = train_wordlevel_tokenizer(tmp_path / "words.json")
    config = tiny_config(f"data.tokenizer={path}", f"model.image_token_id={image_id_of(path)}",
                         "model.decoder.vocab_size=400")
    tokenizer = make_tokenizer(config.data, config.model)        # maps unseen words to [UNK]: no round trip
    with pytest.raises(ValueError, match="data.template=plain.*supervised tokens decode to"):
        check_template(TEMPLATES["plain"], tokenizer, 4)


def test_template_special_token_missing_from_tokenizer_raises(tiny_config, tmp_path):
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>", "<s>", "</s>"))
    config = tiny_config(f"data.tokenizer={path}", f"model.image_token_id={image_id_of(path)}",
                         "model.decoder.vocab_size=400")
    with pytest.raises(ValueError, match="no token '<\\|im_end\\|>'"):
        check_template(TEMPLATES["chatml"], make_tokenizer(config.data, config.model), 4)


def test_tokenizer_template_needs_a_chat_template(tiny_config):
    with pytest.raises(ValueError, match="data.template=tokenizer.*no chat template"):
        check_template(TEMPLATES["tokenizer"], ByteTokenizer(IMAGE), 4)


def test_a_conversation_the_chat_template_refuses_is_a_bad_sample(tiny_config, real_tokenizers):
    _, paths = real_tokenizers                         # Mistral-v0.2's template refuses system turns
    config = tiny_config(f"data.tokenizer={paths['mistral-v1-chat']}", "data.template=tokenizer",
                         "model.decoder.vocab_size=32100", "model.image_token_id=32005", "data.max_length=300")
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    with pytest.raises(BadSample, match="malformed_record.*refuses the conversation"):
        encoder.tokens(Example("s", [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")]))


def test_per_image_token_counts_expand_each_image_in_one_pass():
    tokenizer = ByteTokenizer(IMAGE)
    conversation = TEMPLATES["plain"].render([("user", "<image>a<image>\nQ?"), ("assistant", "A")], tokenizer)
    ids, mask = encode(conversation, tokenizer, [2, 5])
    single_ids, single_mask = encode(conversation, tokenizer, 1)
    first, second = np.flatnonzero(single_ids == IMAGE)
    assert (ids == IMAGE).sum() == 7 and ids[first:first + 2].tolist() == [IMAGE] * 2
    assert ids[first + 2] == ord("a") and ids[first + 3:first + 8].tolist() == [IMAGE] * 5
    assert mask.sum() == single_mask.sum() and not mask[ids == IMAGE].any()
    np.testing.assert_array_equal(ids[ids != IMAGE], single_ids[single_ids != IMAGE])
    with pytest.raises(ValueError, match="2 image token.*3 per-image token counts"):
        encode(conversation, tokenizer, [2, 5, 1])
