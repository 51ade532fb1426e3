"""Real tokenizer files, offline, from the `mistral-common` wheel (a test requirement), and their transformers
references.

- `tokenizer.model.v1`: Mistral-7B's LLaMA-style sentencepiece BPE (32000 ids; the tokenizer of Mistral-7B-Instruct
  v0.1/v0.2 and LLaVA-NeXT-Mistral), used bare (LlamaTokenizer semantics) and as a directory with chat tokens.
- `tekken_240911.json`: Mistral's tiktoken-format byte-level BPE (131072 ids; Mistral-NeMo / Pixtral), converted by
  transformers to a tokenizer.json; as itself (with Mistral's own Jinja chat template), Qwen2-style (ChatML tokens
  and Qwen2-Instruct's chat template) and LLaMA-3-style (header tokens, <|begin_of_text|> as BOS, LLaMA-3-Instruct's
  chat template).
`reference(name)` is what `AutoTokenizer.from_pretrained` gives, with "<image>" added as a special token.
"""
import json
import os
import shutil

import mistral_common

MISTRAL_DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
SENTENCEPIECE_V1 = os.path.join(MISTRAL_DATA, "tokenizer.model.v1")
TEKKEN = os.path.join(MISTRAL_DATA, "tekken_240911.json")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Chat templates as their models' tokenizer_config.json ship them.
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The same two with {% generation %} marks around each answer and its closing token: transformers then returns the
# assistant-token mask (`return_assistant_tokens_mask`), an independent reference for our loss mask.
QWEN2_TEMPLATE_MARKED = QWEN2_TEMPLATE.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
LLAMA3_TEMPLATE_MARKED = LLAMA3_TEMPLATE.replace(
    "{{ content }}",
    "{% if message['role'] == 'assistant' %}{{ content[:-(message['content'] | trim | length) - 10] }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ content }}"
    "{% endif %}")


def _sentencepiece_dir(directory, **config):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(SENTENCEPIECE_V1, os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, **config}, f)
    return str(directory)


def build_real_tokenizers(root) -> dict[str, str]:
    """name -> the path our config's data.tokenizer gets; each name's reference directory is `root/<name>.ref`."""
    from transformers import AutoTokenizer
    from transformers.integrations.mistral import convert_tekken_tokenizer

    paths = {"mistral-v1.model": SENTENCEPIECE_V1}
    _sentencepiece_dir(root / "mistral-v1.model.ref")

    chat = AutoTokenizer.from_pretrained(_sentencepiece_dir(root / "sp-tmp"))
    chat.add_special_tokens({"additional_special_tokens": CHATML_TOKENS + LLAMA3_TOKENS[1:]})
    chat.chat_template = MISTRAL_V02_TEMPLATE
    chat.save_pretrained(root / "mistral-v1-chat")

    tekken = convert_tekken_tokenizer(TEKKEN)
    tekken.save_pretrained(root / "tekken")
    qwen2 = AutoTokenizer.from_pretrained(root / "tekken")
    qwen2.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    qwen2.chat_template = QWEN2_TEMPLATE
    qwen2.save_pretrained(root / "tekken-qwen2")
    llama3 = AutoTokenizer.from_pretrained(root / "tekken")
    llama3.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS})
    llama3.bos_token = "<|begin_of_text|>"
    llama3.add_bos_token = True                # LLaMA-3 adds <|begin_of_text|> in its post-processor
    llama3.chat_template = LLAMA3_TEMPLATE
    llama3.save_pretrained(root / "tekken-llama3")
    for name in ("mistral-v1-chat", "tekken", "tekken-qwen2", "tekken-llama3"):
        paths[name] = str(root / name)
    return paths


def reference_tokenizer(root, name: str):
    """transformers' AutoTokenizer for `name` with "<image>" added as a special token."""
    from transformers import AutoTokenizer
    directory = root / f"{name}.ref" if (root / f"{name}.ref").exists() else root / name
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer
