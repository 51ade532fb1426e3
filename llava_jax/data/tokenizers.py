"""Tokenizers behind one small interface: built-in bytes, a Hugging Face tokenizer.json, or a sentencepiece model.

Public surface: `make_tokenizer(data_config, model_config)` -> object with `encode(text) -> list[int]` (no specials
added), `decode(ids) -> str` (special ids skipped), `token_id(token)` (a special token such as "<|im_end|>"),
`bos_id` (None if the tokenizer has none), `eos_id`, `pad_id`, `image_token_id` (the model config's) and
`vocab_size`. Checks that the model's vocabulary holds every id and that the image token id is dedicated.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes, then SPECIALS (pad, bos, eos, then the chat templates' control tokens)."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>")
    description = "byte"

    def __init__(self, image_token_id: int):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 256 + len(self.SPECIALS)
        self.image_token_id = image_token_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int:
        if token not in self.SPECIALS:
            raise ValueError(f"the byte tokenizer has no special token {token!r}; it has {list(self.SPECIALS)}")
        return 256 + self.SPECIALS.index(token)


class _FileTokenizer:
    """Shared set-up of file-backed tokenizers: special ids from data.*_token or the usual names."""

    def __init__(self, path: str, data_config, image_token_id: int):
        self.path = path
        self.description = path
        self.image_token_id = image_token_id
        self._load()
        self.bos_id = self._special(data_config.bos_token, BOS_CANDIDATES, "data.bos_token", required=False)
        self.eos_id = self._special(data_config.eos_token, EOS_CANDIDATES, "data.eos_token", required=True)
        pad_id = self._special(data_config.pad_token, PAD_CANDIDATES, "data.pad_token", required=False)
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_model")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def _special(self, configured: Optional[str], candidates: Sequence[str], key: str, required: bool):
        tokens = [configured] if configured else list(candidates)
        for token in tokens:
            token_id = self._lookup(token)
            if token_id is not None:
                return token_id
        if configured or required:
            raise ValueError(f"{key}: tokenizer {self.path} has none of {tokens}; set {key} to the special token "
                             "string this tokenizer uses")
        return None

    def token_id(self, token: str) -> int:
        token_id = self._lookup(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r} (needed by data.template)")
        return token_id

    def _load(self):
        raise NotImplementedError

    def _lookup(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def is_dedicated(self, token_id: int) -> bool:
        """True if plain text encoding can never produce `token_id`."""
        raise NotImplementedError


class HuggingFaceTokenizer(_FileTokenizer):
    """A `tokenizers` tokenizer.json; added special tokens are looked up by their string."""

    def _load(self):
        from tokenizers import Tokenizer
        self._model = Tokenizer.from_file(self.path)
        self.vocab_size = self._model.get_vocab_size(with_added_tokens=True)
        self._special_ids = {i for i, t in self._model.get_added_tokens_decoder().items() if t.special}

    def _lookup(self, token: str) -> Optional[int]:
        return self._model.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._model.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.image_token_id]
        return self._model.decode(ids, skip_special_tokens=True)

    def is_dedicated(self, token_id: int) -> bool:
        return token_id >= self.vocab_size or token_id in self._special_ids


class SentencePieceTokenizer(_FileTokenizer):
    """A sentencepiece *.model; control pieces (<s>, </s>, user-declared controls) count as special."""

    def _load(self):
        import sentencepiece
        self._model = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._model.get_piece_size()

    def _lookup(self, token: str) -> Optional[int]:
        token_id = self._model.piece_to_id(token)
        return token_id if self._model.id_to_piece(token_id) == token else None

    def encode(self, text: str) -> list[int]:
        return self._model.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode([int(i) for i in ids if self._is_text(int(i))])

    def _is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and not self._model.is_control(token_id)

    def is_dedicated(self, token_id: int) -> bool:
        return token_id >= self.vocab_size or self._model.is_control(token_id) or self._model.is_unused(token_id)


def _check_byte(tokenizer: ByteTokenizer, model_config) -> None:
    largest = tokenizer.vocab_size - 1
    vocab = model_config.decoder.vocab_size
    if vocab <= max(largest, tokenizer.image_token_id):
        raise ValueError(f"model.decoder.vocab_size: {vocab} is too small for the byte tokenizer (ids up to "
                         f"{largest}) and model.image_token_id={tokenizer.image_token_id}")
    if tokenizer.image_token_id < tokenizer.vocab_size:
        raise ValueError(f"model.image_token_id: {tokenizer.image_token_id} collides with the byte tokenizer "
                         f"(0..255 are bytes, 256..{largest} are {list(ByteTokenizer.SPECIALS)}); "
                         f"use an id in [{tokenizer.vocab_size}, {vocab})")


def _check_file(tokenizer: _FileTokenizer, model_config) -> None:
    vocab = model_config.decoder.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"model.decoder.vocab_size: {vocab} is smaller than the {tokenizer.vocab_size} ids of "
                         f"data.tokenizer={tokenizer.path}")
    if not tokenizer.is_dedicated(tokenizer.image_token_id):
        raise ValueError(f"model.image_token_id: {tokenizer.image_token_id} is an ordinary token of "
                         f"data.tokenizer={tokenizer.path}, so plain text can produce it; use an id >= "
                         f"{tokenizer.vocab_size} or a special (control) token such as an added '<image>'")


def make_tokenizer(data_config, model_config):
    """Builds data.tokenizer ("byte", *.json or *.model) for `model_config`'s vocabulary and image token."""
    name = data_config.tokenizer
    if name == "byte":
        tokenizer = ByteTokenizer(model_config.image_token_id)
        _check_byte(tokenizer, model_config)
        return tokenizer
    if not os.path.exists(name):
        raise ValueError(f"data.tokenizer: {name}: no such file")
    if name.endswith(".json"):
        tokenizer = HuggingFaceTokenizer(name, data_config, model_config.image_token_id)
    elif name.endswith(".model"):
        tokenizer = SentencePieceTokenizer(name, data_config, model_config.image_token_id)
    else:
        raise ValueError(f"data.tokenizer: {name!r} is not 'byte', a tokenizer.json or a sentencepiece *.model")
    _check_file(tokenizer, model_config)
    return tokenizer
