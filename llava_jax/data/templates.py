"""Chat templates (plain, vicuna_v1, llama3, chatml) and the token-by-token loss mask built with them.

Public surface: `TEMPLATES`, `render(template, turns, system_prompt) -> [Piece]`, `generation_prompt(...)` (pieces up
to where the last answer starts), `encode_pieces(pieces, tokenizer, tokens_per_image) -> (ids, loss_mask)`,
`answer_spans(loss_mask)`, `answer_end_id(template, tokenizer)` (the id that closes an answer: stop generating
there) and `check_template(template, tokenizer, tokens_per_image)`. Turns are (role, text) with roles system /
user / assistant; "<image>" in user text marks where an image's tokens go.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"


class Piece(NamedTuple):
    value: str                 # text to tokenize, or a special token: "bos", "eos" or a literal like "<|im_end|>"
    special: bool = False
    supervised: bool = False   # part of an assistant answer (the answer text and the token that closes it)


def _text(value: str) -> Piece:
    return Piece(value)


def _token(value: str) -> Piece:
    return Piece(value, special=True)


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format: begin, [system], then user turns and assistant turns
    (header, answer text, answer_end token, after_answer)."""
    name: str
    begin: tuple[Piece, ...]
    system: Optional[Callable[[str], list[Piece]]]     # None: the format has no system message
    user: Callable[[str], list[Piece]]
    assistant_header: tuple[Piece, ...]
    answer_end: str
    after_answer: tuple[Piece, ...] = ()
    default_system: Optional[str] = None


def _llama3_header(role: str) -> list[Piece]:
    return [_token("<|start_header_id|>"), _text(role), _token("<|end_header_id|>"), _text("\n\n")]


def _chatml_turn(role: str, text: str) -> list[Piece]:
    return [_token("<|im_start|>"), _text(f"{role}\n{text}"), _token("<|im_end|>"), _text("\n")]


TEMPLATES = {t.name: t for t in (
    # LLaVA stage 1: no roles or system; "<bos>{user text}\n{answer}<eos>". Unlike LLaVA's preprocess_plain the user
    # text is kept (VQA-style data keeps its question in it; caption data holds just "<image>").
    ChatTemplate("plain", begin=(_token("bos"),), system=None, user=lambda text: [_text(text + "\n")],
                 assistant_header=(), answer_end="eos"),
    # LLaVA-1.5: "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
    ChatTemplate("vicuna_v1", begin=(_token("bos"),), system=lambda text: [_text(text + " ")],
                 user=lambda text: [_text(f"USER: {text} ")], assistant_header=(_text("ASSISTANT: "),),
                 answer_end="eos",
                 default_system="A chat between a curious user and an artificial intelligence assistant. The "
                                "assistant gives helpful, detailed, and polite answers to the user's questions."),
    ChatTemplate("llama3", begin=(_token("bos"),),
                 system=lambda text: _llama3_header("system") + [_text(text), _token("<|eot_id|>")],
                 user=lambda text: _llama3_header("user") + [_text(text), _token("<|eot_id|>")],
                 assistant_header=tuple(_llama3_header("assistant")), answer_end="<|eot_id|>"),
    ChatTemplate("chatml", begin=(), system=lambda text: _chatml_turn("system", text),
                 user=lambda text: _chatml_turn("user", text),
                 assistant_header=(_token("<|im_start|>"), _text("assistant\n")), answer_end="<|im_end|>",
                 after_answer=(_text("\n"),), default_system="You are a helpful assistant."),
)}


def render(template: ChatTemplate, turns: Sequence[tuple[str, str]], system_prompt: Optional[str] = None
           ) -> list[Piece]:
    """Pieces of a whole conversation. A leading system turn wins over `system_prompt` (data.system_prompt),
    which wins over the template's default; an empty system text means none."""
    turns = list(turns)
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    else:
        system = template.default_system if system_prompt is None else system_prompt
    pieces = list(template.begin)
    if system and template.system is not None:
        pieces += template.system(system)
    for role, text in turns:
        if role == "user":
            pieces += template.user(text)
        else:
            pieces += template.assistant_header
            pieces += [Piece(text, supervised=True), Piece(template.answer_end, special=True, supervised=True)]
            pieces += template.after_answer
    return pieces


def generation_prompt(template: ChatTemplate, turns: Sequence[tuple[str, str]],
                      system_prompt: Optional[str] = None) -> list[Piece]:
    """Pieces up to where the last assistant answer starts (its header included): the prompt to generate from."""
    pieces = render(template, turns, system_prompt)
    last_answer = max(i for i, piece in enumerate(pieces) if piece.supervised and not piece.special)
    return pieces[:last_answer]


def special_id(tokenizer, token: str) -> Optional[int]:
    if token == "bos":
        return tokenizer.bos_id
    if token == "eos":
        return tokenizer.eos_id
    return tokenizer.token_id(token)


def answer_end_id(template: ChatTemplate, tokenizer) -> int:
    return special_id(tokenizer, template.answer_end)


def _encode_text(text: str, tokenizer, tokens_per_image: int) -> list[int]:
    ids: list[int] = []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids += [tokenizer.image_token_id] * tokens_per_image
        if chunk:
            ids += tokenizer.encode(chunk)
    return ids


def encode_pieces(pieces: Sequence[Piece], tokenizer, tokens_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [L] and loss mask float32 [L] of rendered pieces.

    The loss mask is built while tokenizing, one piece at a time: a piece's tokens get mask 1 exactly when the
    piece is supervised (an assistant answer, or the special token closing it) and 0 otherwise (bos, system,
    user turns, role headers, image tokens, separators). Ids and mask grow together, so there is nothing to
    re-align afterwards and the mask cannot drift from the tokens whatever the tokenizer does at piece
    boundaries (LLaVA instead re-measures turn lengths on the joined text; when they disagree the whole sample is
    silently masked). mask[t] = 1 means input_ids[t] is a target: the loss on the logits at t-1 predicting it.
    Each "<image>" in a text piece becomes tokens_per_image copies of the tokenizer's image_token_id.
    """
    ids: list[int] = []
    mask: list[float] = []
    for piece in pieces:
        if piece.special:
            token_id = special_id(tokenizer, piece.value)
            piece_ids = [] if token_id is None else [token_id]
        else:
            piece_ids = _encode_text(piece.value, tokenizer, tokens_per_image)
        ids += piece_ids
        mask += [float(piece.supervised)] * len(piece_ids)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def answer_spans(loss_mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of supervised tokens (one per answer, its end token included)."""
    edges = np.diff(np.concatenate([[0], (np.asarray(loss_mask) > 0).astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


_PROBE = [("user", IMAGE_PLACEHOLDER + "\nWhat is in the picture?"), ("assistant", "A red circle."),
          ("user", "Is it big?"), ("assistant", "Yes, it is big.")]


def check_template(template: ChatTemplate, tokenizer, tokens_per_image: int) -> None:
    """Raises ValueError unless the supervised tokens of a probe conversation decode to exactly its answers, each
    closed by the template's end token (a template/tokenizer mismatch must stop the run, not mask samples)."""
    ids, mask = encode_pieces(render(template, _PROBE), tokenizer, tokens_per_image)
    spans = answer_spans(mask)
    decoded = [tokenizer.decode(ids[start:end]) for start, end in spans]
    expected = [text for role, text in _PROBE if role == "assistant"]
    end_id = answer_end_id(template, tokenizer)
    if decoded != expected or any(ids[end - 1] != end_id for _, end in spans):
        raise ValueError(f"data.template={template.name} with data.tokenizer={tokenizer.description}: the "
                         f"supervised tokens decode to {decoded!r}, expected {expected!r}, each closed by "
                         f"{template.answer_end!r} (id {end_id}); this tokenizer cannot represent the answers "
                         "faithfully with this template")
