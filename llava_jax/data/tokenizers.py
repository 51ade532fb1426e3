"""Tokenizers behind one interface: the built-in byte tokenizer, or a Hugging Face tokenizer (transformers' own
classes, no torch) from a directory, a tokenizer.json or a bare sentencepiece *.model.

Public surface: `make_tokenizer(data_config, model_config)` -> a tokenizer with `encode(text, add_special_tokens)
-> Encoding(ids, offsets)` (ONE pass over the whole text: special tokens written as text, "<image>" included, become
their ids; `add_special_tokens` lets the tokenizer add its own BOS/EOS), `decode(ids, skip_special_tokens=True)`,
`pieces(ids)` (token strings), `token_id(token)`, `special_ids` / `special_tokens`, `bos_id` / `eos_id` /
`pad_id`, the texts `bos_token` / `eos_token`, `image_token_id`, `vocab_size` (ids it can produce, "<image>"
included), `chat_template` and `render_chat(messages, add_generation_prompt)` (raises `ChatTemplateError`);
`llava_tokenizer(source)` (the tokenizer files `python -m llava_jax.convert` writes).
A bare *.model has LlamaTokenizer semantics (legacy=false, add_bos_token=true); a directory follows its own
tokenizer_config.json. "<image>" is added as a special token when the tokenizer lacks it; its id must be
`model.image_token_id` and differ from the pad id.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import NamedTuple, Optional, Sequence

IMAGE_TOKEN = "<image>"
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class ChatTemplateError(ValueError):
    """The tokenizer's own chat template refused a conversation (e.g. a system turn it does not support)."""


class Encoding(NamedTuple):
    ids: list[int]
    offsets: list[tuple[int, int]]   # [start, end) characters of the text each token covers; (0, 0): added by
                                     # the tokenizer itself (BOS)


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes, then SPECIALS (pad, bos, eos, then the chat templates' control tokens); "<image>"
    is model.image_token_id. Adds BOS when asked to add special tokens."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>")
    description = "byte"
    bos_token, eos_token = "<s>", "</s>"
    chat_template = None

    def __init__(self, image_token_id: int):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 256 + len(self.SPECIALS)
        self.image_token_id = image_token_id
        self._special = {**{token: 256 + k for k, token in enumerate(self.SPECIALS)}, IMAGE_TOKEN: image_token_id}
        self._text = {token_id: token for token, token_id in self._special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._special, key=len)[::-1]) + ")")
        self.special_ids = frozenset(self._special.values())
        self.special_tokens = tuple(sorted(self._special, key=len, reverse=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids, offsets = ([self.bos_id], [(0, 0)]) if add_special_tokens else ([], [])
        position = 0
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
                offsets.append((position, position + len(part)))
            else:
                for k, char in enumerate(part):
                    encoded = char.encode("utf-8")
                    ids += encoded
                    offsets += [(position + k, position + k + 1)] * len(encoded)
            position += len(part)
        return Encoding(ids, offsets)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces: list[bytes] = []
        for token_id in map(int, ids):
            if 0 <= token_id < 256:
                pieces.append(bytes([token_id]))
            elif not skip_special_tokens and token_id in self._text:
                pieces.append(self._text[token_id].encode())
        return b"".join(pieces).decode("utf-8", errors="replace")

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self._text.get(int(i)) or bytes([int(i)]).decode("latin-1") for i in ids]

    def token_id(self, token: str) -> int:
        if token not in self._special:
            raise ValueError(f"the byte tokenizer has no special token {token!r}; it has {list(self._special)}")
        return self._special[token]

    def render_chat(self, messages, add_generation_prompt: bool) -> str:
        raise ValueError("data.template=tokenizer: the byte tokenizer has no chat template")


def _load_hf(path: str):
    """transformers tokenizer for a directory, a tokenizer.json or (any other file) a bare sentencepiece model."""
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
    try:
        if os.path.isdir(path):
            return AutoTokenizer.from_pretrained(path)
        if path.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=path)
        with tempfile.TemporaryDirectory() as directory:       # from_pretrained reads a directory's tokenizer.model
            os.symlink(os.path.abspath(path), os.path.join(directory, "tokenizer.model"))
            return LlamaTokenizer.from_pretrained(directory, legacy=False, add_bos_token=True, add_eos_token=False)
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"data.tokenizer: cannot load {path} as a tokenizer directory, tokenizer.json or "
                         f"sentencepiece model ({type(error).__name__}: {error})") from None


def _with_image_token(tokenizer):
    """Adds "<image>" as a special token (the next free id) unless the tokenizer has it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


class HuggingFaceTokenizer:
    """A transformers tokenizer (fast, with offsets). bos/eos/pad: data.*_token if set, else the tokenizer's own,
    else the usual names; no pad token means eos pads (padding is never attended to nor trained on)."""

    def __init__(self, path: str, data_config):
        self.description = path
        self._tokenizer = _with_image_token(_load_hf(path))
        self.image_token_id = self._lookup(IMAGE_TOKEN)
        self.vocab_size = len(self._tokenizer)
        self.bos_token = self._special(data_config.bos_token, self._tokenizer.bos_token, BOS_CANDIDATES,
                                       "data.bos_token", required=False)
        self.eos_token = self._special(data_config.eos_token, self._tokenizer.eos_token, EOS_CANDIDATES,
                                       "data.eos_token", required=True)
        pad_token = self._special(data_config.pad_token, self._tokenizer.pad_token, PAD_CANDIDATES, "data.pad_token",
                                  required=False)
        self.bos_id = None if self.bos_token is None else self._lookup(self.bos_token)
        self.eos_id = self._lookup(self.eos_token)
        self.pad_id = self.eos_id if pad_token is None else self._lookup(pad_token)
        specials = {token.content: token_id for token_id, token in self._tokenizer.added_tokens_decoder.items()
                    if token.special}
        specials.update(zip(self._tokenizer.all_special_tokens, self._tokenizer.all_special_ids))
        self.special_ids = frozenset(specials.values())
        self.special_tokens = tuple(sorted(specials, key=len, reverse=True))   # longest first: greedy matching
        self.chat_template = self._tokenizer.chat_template

    def _lookup(self, token: str) -> Optional[int]:
        token_id = self._tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self._tokenizer.unk_token_id and token != self._tokenizer.unk_token:
            return None
        return int(token_id)

    def _special(self, configured: Optional[str], own: Optional[str], candidates: Sequence[str], key: str,
                 required: bool) -> Optional[str]:
        tokens = [configured] if configured else ([own] if own else []) + list(candidates)
        for token in tokens:
            if self._lookup(token) is not None:
                return token
        if configured or required:
            raise ValueError(f"{key}: tokenizer {self.description} has none of {tokens}; set {key} to the special "
                             "token string this tokenizer uses")
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        encoded = self._tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                                  verbose=False)
        return Encoding(list(encoded["input_ids"]), [tuple(offset) for offset in encoded["offset_mapping"]])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return self._tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        token_id = self._lookup(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.description} has no token {token!r} (needed by data.template)")
        return token_id

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The tokenizer's own Jinja chat template applied to `messages` ({"role", "content"}), as text."""
        if not self.chat_template:
            raise ValueError(f"data.template=tokenizer: tokenizer {self.description} has no chat template "
                             "(chat_template in tokenizer_config.json or chat_template.jinja)")
        from jinja2 import TemplateError
        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template of {self.description} refuses the conversation: "
                                    f"{error}") from None


def llava_tokenizer(source: str):
    """The transformers tokenizer at `source` (directory, tokenizer.json or bare sentencepiece model) with "<image>"
    added, then "<pad>" when it has no pad token: llava-1.5-7b-hf's layout (<image> 32000, <pad> 32001 after
    LLaMA's 32000). `python -m llava_jax.convert` saves it (save_pretrained) next to the model it writes."""
    tokenizer = _with_image_token(_load_hf(source))
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def _check(tokenizer, model_config, data_config) -> None:
    vocab, image_id = model_config.decoder.vocab_size, model_config.image_token_id
    name = f"data.tokenizer={tokenizer.description}"
    if max(tokenizer.vocab_size, image_id + 1) > vocab:
        raise ValueError(f"model.decoder.vocab_size: {vocab} is smaller than the {tokenizer.vocab_size} ids of "
                         f"{name} (with {IMAGE_TOKEN}) or model.image_token_id={image_id}")
    if isinstance(tokenizer, ByteTokenizer):
        if image_id < tokenizer.vocab_size:
            raise ValueError(f"model.image_token_id: {image_id} collides with the byte tokenizer (0..255 are bytes, "
                             f"256..{tokenizer.vocab_size - 1} are {list(ByteTokenizer.SPECIALS)}); use an id in "
                             f"[{tokenizer.vocab_size}, {vocab})")
    elif tokenizer.image_token_id != image_id:
        raise ValueError(f"model.image_token_id: {image_id}, but {name} gives {IMAGE_TOKEN} the id "
                         f"{tokenizer.image_token_id}; set model.image_token_id={tokenizer.image_token_id} or use the "
                         "tokenizer the model was converted with (python -m llava_jax.convert writes one)")
    if tokenizer.pad_id == image_id:
        raise ValueError(f"data.pad_token: the pad id {tokenizer.pad_id} of {name} is the image token id "
                         f"(model.image_token_id); padding would count as image slots. Set data.pad_token to another "
                         f"special token (now {data_config.pad_token!r})")


def make_tokenizer(data_config, model_config):
    """Builds data.tokenizer ("byte", a directory, a tokenizer.json or a *.model) for `model_config`."""
    name = data_config.tokenizer
    if name == "byte":
        tokenizer = ByteTokenizer(model_config.image_token_id)
    elif not os.path.exists(name):
        raise ValueError(f"data.tokenizer: {name}: no such file or directory")
    else:
        tokenizer = HuggingFaceTokenizer(name, data_config)
    _check(tokenizer, model_config, data_config)
    return tokenizer
