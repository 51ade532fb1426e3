"""Every template x real tokenizer: ids are exactly transformers' one-call encoding of the whole conversation,
the loss mask covers exactly the answers, and the formats are the ones the models were trained with (LLaVA's
conversation code, mistral-common, Qwen2's and LLaMA-3's own chat templates). Tokenizer files:
tests/real_tokenizers.py.
"""
import os

import numpy as np
import pytest

from llava_jax.config import load_config
from llava_jax.data.templates import TEMPLATES, answer_end_id, answer_spans, encode
from llava_jax.data.tokenizers import make_tokenizer
from tests.real_tokenizers import (LLAMA3_TEMPLATE, LLAMA3_TEMPLATE_MARKED, QWEN2_TEMPLATE, QWEN2_TEMPLATE_MARKED,
                                   SENTENCEPIECE_V1, reference_tokenizer)

TOKENS_PER_IMAGE = 3
IMG = "<image>"
CONVERSATIONS = {
    "system_multi_turn": [("system", "You are a careful assistant."), ("user", f"{IMG}\nWhat is in the picture?"),
                          ("assistant", "A red circle."), ("user", "Is it big?"), ("assistant", "Yes, it is big.")],
    "image_mid_turn": [("user", f"Look at {IMG} and name the colour."), ("assistant", "Blue.")],
    "image_end_of_turn": [("user", f"What is shown here?\n{IMG}"), ("assistant", "Two dogs on a sofa.")],
    "several_images": [("user", f"{IMG}\n{IMG}\nCompare the two photos."), ("assistant", "The left one is darker."),
                       ("user", f"And this one? {IMG}"), ("assistant", "Brighter than both.")],
    "text_only": [("user", "Name a prime number."), ("assistant", "Seven."), ("user", "Another?"),
                  ("assistant", "Eleven.")],
    "unicode": [("user", f"{IMG}\nQu'est-ce que c'est ? 日本語で答えて。"), ("assistant", "C'est un chat 🐈 — 猫です。")],
    "digits": [("user", "What is 1234 + 5678.9?"), ("assistant", "6912.9, i.e. 69 12 point 9 (3.14 ≠ 6912.9).")],
    "spaces_and_newlines": [("user", f"  {IMG}\n  leading and trailing spaces \n"),
                            ("assistant", "  spaced answer\nwith two lines \n"), ("user", "\nnewline first"),
                            ("assistant", "ok\n")],
}
# data.tokenizer name -> the templates it is tested with (chat tokens exist only in the directories that add them).
CASES = {
    "mistral-v1.model": ["plain", "vicuna_v1", "mistral_instruct"],
    "mistral-v1-chat": ["plain", "vicuna_v1", "mistral_instruct", "chatml", "llama3", "tokenizer"],
    "tekken": ["plain", "vicuna_v1", "mistral_instruct", "tokenizer"],
    "tekken-qwen2": ["chatml", "tokenizer"],
    "tekken-llama3": ["llama3", "tokenizer"],
}


@pytest.fixture(scope="module")
def tokenizers(real_tokenizers):
    """name -> (ours, transformers' reference), each loaded once."""
    root, paths = real_tokenizers
    loaded = {}
    for name, path in paths.items():
        reference = reference_tokenizer(root, name)
        image_id = reference.convert_tokens_to_ids("<image>")
        config = load_config(None, [f"data.tokenizer={path}", f"model.image_token_id={image_id}",
                                    f"model.decoder.vocab_size={len(reference) + 64}"])
        loaded[name] = (make_tokenizer(config.data, config.model), reference)
    return loaded


def expanded(ids, image_id):
    return [i for token in ids for i in ([token] * (TOKENS_PER_IMAGE if token == image_id else 1))]


def reference_ids(reference, conversation, template, turns):
    if template.name == "tokenizer":       # the reference renders and tokenizes itself
        messages = [{"role": role, "content": text} for role, text in turns]
        return list(reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    return list(reference(conversation.text, add_special_tokens=conversation.add_special_tokens)["input_ids"])


@pytest.mark.parametrize("name, template_name", [(n, t) for n, templates in CASES.items() for t in templates])
def test_ids_are_one_transformers_call_and_the_mask_holds_exactly_the_answers(tokenizers, name, template_name):
    ours, reference = tokenizers[name]
    template = TEMPLATES[template_name]
    image_id, end_id = ours.image_token_id, answer_end_id(template, ours)
    for conversation_name, turns in CONVERSATIONS.items():
        if template_name == "tokenizer" and name.startswith("mistral-v1") and turns[0][0] == "system":
            continue                                     # Mistral-v0.2's own template refuses system messages
        conversation = template.render(turns, ours)
        ids, mask = encode(conversation, ours, TOKENS_PER_IMAGE)
        context = f"{name} / {template_name} / {conversation_name}: {conversation.text!r}"
        assert ids.tolist() == expanded(reference_ids(reference, conversation, template, turns), image_id), context
        spans = answer_spans(mask)
        answers = [text.strip() for role, text in turns if role == "assistant"]
        assert [ours.decode(ids[start:end]).strip() for start, end in spans] == answers, context
        assert [int(ids[end - 1]) for _, end in spans] == [end_id] * len(answers), context
        assert (ids == image_id).sum() == TOKENS_PER_IMAGE * sum(t.count(IMG) for _, t in turns), context
        assert not mask[ids == image_id].any(), context
        prompt, _ = encode(template.prompt(turns, ours), ours, TOKENS_PER_IMAGE)
        assert prompt.tolist() == ids[:spans[-1][0]].tolist(), context


# ------------------------------------------------------------------------- the formats the models were trained with

def llava_vicuna_v1_prompt(system, turns):
    """LLaVA's conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO, sep " ", sep2 "</s>"), written out independently."""
    seps, text = [" ", "</s>"], system + " "
    for k, (role, message) in enumerate(turns):
        text += ("USER" if role == "user" else "ASSISTANT") + ": " + message + seps[k % 2]
    return text


def test_vicuna_v1_is_llava_conversation_text(tokenizers):
    ours, _ = tokenizers["mistral-v1.model"]
    turns = CONVERSATIONS["several_images"]
    system = TEMPLATES["vicuna_v1"].default_system
    assert TEMPLATES["vicuna_v1"].render(turns, ours).text == llava_vicuna_v1_prompt(system, turns)


@pytest.mark.parametrize("name, template_name, jinja, marked", [
    ("tekken-qwen2", "chatml", QWEN2_TEMPLATE, QWEN2_TEMPLATE_MARKED),
    ("tekken-llama3", "llama3", LLAMA3_TEMPLATE, LLAMA3_TEMPLATE_MARKED)])
def test_chatml_and_llama3_are_the_models_own_chat_templates(tokenizers, name, template_name, jinja, marked):
    ours, reference = tokenizers[name]
    template = TEMPLATES[template_name]
    for conversation_name, turns in CONVERSATIONS.items():
        messages = [{"role": role, "content": text} for role, text in turns]
        conversation = template.render(turns, ours)
        bos = reference.bos_token if template_name == "llama3" else ""
        assert bos + conversation.text == reference.apply_chat_template(messages, chat_template=jinja, tokenize=False)
        prompt = reference.apply_chat_template(messages[:-1], chat_template=jinja, tokenize=False,
                                               add_generation_prompt=True)
        assert bos + template.prompt(turns, ours).text == prompt, conversation_name
        marked_ids = reference.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                                   return_assistant_tokens_mask=True)
        _, mask = encode(conversation, ours, 1)
        assert mask.astype(int).tolist() == list(marked_ids["assistant_masks"]), conversation_name


def test_mistral_instruct_is_mistral_commons_v1_encoding(tokenizers):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    reference = MistralTokenizer.from_file(SENTENCEPIECE_V1, mode=ValidationMode.finetuning)
    message_types = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    ours, _ = tokenizers["mistral-v1.model"]
    for name in ("system_multi_turn", "text_only", "unicode", "digits"):
        turns = [(role, text.replace(f"{IMG}\n", "")) for role, text in CONVERSATIONS[name]]
        request = ChatCompletionRequest(messages=[message_types[role](content=text) for role, text in turns])
        ids, _ = encode(TEMPLATES["mistral_instruct"].render(turns, ours), ours, 1)
        assert ids.tolist() == reference.encode_chat_completion(request).tokens, name


def test_tokenizer_template_follows_mistrals_own_jinja(tokenizers):
    """tekken's chat template (Mistral's, a 200-line Jinja file) closes answers with </s>: found, supervised."""
    ours, reference = tokenizers["tekken"]
    assert "[INST]" in ours.chat_template and answer_end_id(TEMPLATES["tokenizer"], ours) == ours.eos_id


def contains(pieces, run):
    return any(pieces[k:k + len(run)] == run for k in range(len(pieces)))


def test_the_issue_probe_is_one_pass_sentencepiece(tokenizers):
    """The vicuna_v1 probe with Mistral's LLaMA-style tokenizer reads as the model reads it: no "▁" before "USER"
    after </s> and none of the per-piece dummy prefixes ("▁ ▁US ER", "▁ ▁ASS IST ANT", "▁ ▁A")."""
    ours, _ = tokenizers["mistral-v1.model"]
    turns = [("user", f"{IMG}\nWhat is in the picture?"), ("assistant", "A red circle."), ("user", "Is it big?"),
             ("assistant", "Yes, it is big.")]
    ids, _ = encode(TEMPLATES["vicuna_v1"].render(turns, ours), ours, 1)
    pieces = ours.pieces(ids)
    assert pieces[:3] == ["<s>", "▁A", "▁chat"]
    assert contains(pieces, ["▁questions", ".", "▁US", "ER", ":", "▁", "<image>", "<0x0A>", "What", "▁is"])
    assert contains(pieces, ["?", "▁ASS", "IST", "ANT", ":", "▁A", "▁red", "▁circle", ".", "</s>", "USER", ":", "▁Is"])
    assert pieces.count("▁") == 1


def test_bare_sentencepiece_model_is_llama_tokenizer_legacy_false_with_bos(tokenizers):
    ours, _ = tokenizers["mistral-v1.model"]
    assert os.path.basename(ours.description) == "tokenizer.model.v1"
    assert ours.encode("Hello world").ids[:1] == [ours.bos_id] == [1]
    assert (ours.image_token_id, ours.vocab_size) == (32000, 32001)
    np.testing.assert_array_equal(ours.encode("</s>x", False).ids, [2, ours.token_id("x")])
