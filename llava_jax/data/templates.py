"""Chat templates: a conversation rendered to ONE string, tokenized in one pass, the loss mask taken from the
characters of the answers.

Public surface: `TEMPLATES` (name -> template), `get_template(name)`, each template's `render(turns, tokenizer,
system_prompt) -> Conversation` (the whole conversation) and `prompt(...)` (up to where the last answer starts: what
generation continues), `encode(conversation, tokenizer, tokens_per_image) -> (ids, loss_mask)` (tokens_per_image: one
count for every image, or one per image in order, as anyres gives each image its own),
`answer_end_id(template, tokenizer)` (the token that closes an answer: stop generating there), `answer_spans(mask)`
and `check_template(template, tokenizer, tokens_per_image)`. Turns are (role, text) with roles system / user /
assistant; "<image>" in user text marks where an image's tokens go.

The formats, as text ({a} an answer; the tokenizer adds its own BOS where it has one):
- plain (LLaVA stage 1; keeps the user text, so VQA data keeps its question): `{q}\\n{a}</s>{q}\\n{a}</s>`
- vicuna_v1 (LLaVA-1.5): `{system} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>`
- mistral_instruct (LLaVA-NeXT-Mistral; Mistral's v1 instruct format, as mistral-common encodes it):
  `[INST] {system}\\n\\n{q} [/INST] {a}</s> [INST] {q} [/INST] {a}</s>`
- chatml (Qwen2): `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n
  {a}<|im_end|>\\n`
- llama3: `<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>
  \\n\\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>` (contents stripped)
- tokenizer: the tokenizer's own Jinja chat template (tokenizer_config.json / chat_template.jinja); each answer is
  found in the rendered text and closed by the first special token after it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
EOS = "eos"   # `ChatFormat.close`: the tokenizer's own end-of-sequence token


class Conversation(NamedTuple):
    text: str
    answer_spans: tuple[tuple[int, int], ...]   # [start, end) characters of each answer + the token closing it
    add_special_tokens: bool = True              # False: the text already holds the tokenizer's BOS (Jinja)


def _split_system(turns: Sequence[tuple[str, str]], default: Optional[str], system_prompt: Optional[str]
                  ) -> tuple[Optional[str], list[tuple[str, str]]]:
    """A leading system turn wins over `system_prompt` (data.system_prompt), which wins over the template's
    default; an empty system text means none."""
    turns = list(turns)
    if turns and turns[0][0] == "system":
        return turns[0][1] or None, turns[1:]
    return (default if system_prompt is None else system_prompt) or None, turns


@dataclass(frozen=True)
class ChatFormat:
    """A built-in format: `system` / `user` wrap their text ("{text}"), `assistant` precedes each answer, `close` ends
    it ("eos" or a special token's text), `after_answer` follows it, `next_user` precedes each later user turn.
    `system_in_user`: the system text goes in front of the first user text, separated by "\\n\\n"."""
    name: str
    user: str
    assistant: str
    close: str
    system: Optional[str] = None
    system_in_user: bool = False
    after_answer: str = ""
    next_user: str = ""
    strip: bool = False
    default_system: Optional[str] = None

    def close_token(self, tokenizer) -> str:
        return tokenizer.eos_token if self.close == EOS else self.close

    def _render(self, turns, tokenizer, system_prompt, upto_last_answer: bool) -> Conversation:
        system, turns = _split_system(turns, self.default_system, system_prompt)
        clean = (lambda text: text.strip()) if self.strip else (lambda text: text)
        text, spans, first_user = "", [], True
        if system and self.system is not None and not self.system_in_user:
            text += self.system.format(text=clean(system))
        last_answer = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
        for k, (role, content) in enumerate(turns):
            if role == "user":
                if system and self.system_in_user and first_user:
                    content = f"{clean(system)}\n\n{content}"
                text += ("" if first_user else self.next_user) + self.user.format(text=clean(content))
                first_user = False
                continue
            if upto_last_answer and k == last_answer:
                return Conversation(text + self.assistant.rstrip(" "), ())
            start = len(text) + len(self.assistant.rstrip(" "))   # where `prompt` ends: a space before the
            text += self.assistant                                    # answer is the answer's, as in "▁A"
            text += clean(content) + self.close_token(tokenizer)
            spans.append((start, len(text)))
            text += self.after_answer
        return Conversation(text, tuple(spans))

    def render(self, turns, tokenizer, system_prompt: Optional[str] = None) -> Conversation:
        return self._render(turns, tokenizer, system_prompt, upto_last_answer=False)

    def prompt(self, turns, tokenizer, system_prompt: Optional[str] = None) -> Conversation:
        """Text up to the last answer, its header without trailing spaces (a space before the answer belongs to
        the answer's first token, as in "ASSISTANT:" + "▁A")."""
        return self._render(turns, tokenizer, system_prompt, upto_last_answer=True)


class TokenizerChatTemplate:
    """data.template=tokenizer: the tokenizer's own Jinja template; answers located by their text."""
    name = "tokenizer"

    @staticmethod
    def _messages(turns, system_prompt):
        system, turns = _split_system(turns, None, system_prompt)
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": content} for role, content in turns]

    def render(self, turns, tokenizer, system_prompt: Optional[str] = None) -> Conversation:
        messages = self._messages(turns, system_prompt)
        text = tokenizer.render_chat(messages, add_generation_prompt=False)
        spans, cursor = [], 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = tokenizer.render_chat(messages[:k], add_generation_prompt=True)
            common = len(os.path.commonprefix([prefix, text]))
            found = _find_answer(text, message["content"], max(cursor, common), tokenizer)
            close_end = _close_end(text, found + len(message["content"].strip()), tokenizer)
            spans.append((len(prefix) if common == len(prefix) else found, close_end))   # from where `prompt` ends
            cursor = close_end
        return Conversation(text, tuple(spans), add_special_tokens=False)

    def prompt(self, turns, tokenizer, system_prompt: Optional[str] = None) -> Conversation:
        messages = self._messages(turns, system_prompt)
        last_answer = max(k for k, message in enumerate(messages) if message["role"] == "assistant")
        return Conversation(tokenizer.render_chat(messages[:last_answer], add_generation_prompt=True), (), False)

    def close_token(self, tokenizer) -> str:
        conversation = self.render(_PROBE, tokenizer)
        start, end = conversation.answer_spans[0]
        answer = next(text for role, text in _PROBE if role == "assistant")
        return conversation.text[start + len(answer):end].strip()


def _find_answer(text: str, answer: str, cursor: int, tokenizer) -> int:
    start = text.find(answer.strip(), cursor)
    if start < 0:
        raise ValueError(f"data.template=tokenizer: the chat template of {tokenizer.description} does not write the "
                         f"answer {answer[:60]!r} verbatim, so its tokens cannot be located; use a built-in template")
    return start


def _close_end(text: str, end: int, tokenizer) -> int:
    """End of the special token that closes an answer ending at `end`: the first one after it, with only whitespace
    between."""
    rest = text[end:]
    offset = len(rest) - len(rest.lstrip())
    for token in tokenizer.special_tokens:
        if rest.startswith(token, offset):
            return end + offset + len(token)
    raise ValueError(f"data.template=tokenizer: the chat template of {tokenizer.description} closes an answer with "
                     f"{rest[:20]!r}, not with a special token; generation would not know where to stop")


TEMPLATES = {t.name: t for t in (
    ChatFormat("plain", user="{text}\n", assistant="", close=EOS),
    ChatFormat("vicuna_v1", system="{text} ", user="USER: {text} ", assistant="ASSISTANT: ", close=EOS,
               default_system="A chat between a curious user and an artificial intelligence assistant. The "
                              "assistant gives helpful, detailed, and polite answers to the user's questions."),
    ChatFormat("mistral_instruct", system="{text}", system_in_user=True, user="[INST] {text} [/INST]",
               assistant=" ", close=EOS, next_user=" "),
    ChatFormat("chatml", system="<|im_start|>system\n{text}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n",
               assistant="<|im_start|>assistant\n", close="<|im_end|>", after_answer="\n",
               default_system="You are a helpful assistant."),
    ChatFormat("llama3", system="<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
               user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
               assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", close="<|eot_id|>", strip=True),
    TokenizerChatTemplate(),
)}


def get_template(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"data.template: {name!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def answer_end_id(template, tokenizer) -> int:
    return tokenizer.token_id(template.close_token(tokenizer))


def encode(conversation: Conversation, tokenizer, tokens_per_image: Union[int, Sequence[int]]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [L] and loss mask float32 [L] of a rendered conversation.

    The text is tokenized ONCE, exactly as the tokenizer reads it (no piece boundaries that a pretrained model never
    saw). mask[t] = 1 when token t covers a character of an answer or of the token closing it (an answer's first
    token may also hold the space before it, "▁A"); tokens the tokenizer adds itself (BOS) cover no character and get
    0. An answer's span starts where its generation prompt ends (`prompt`), so whatever the prompt leaves out
    (a space before the answer, "▁" before a digit) is learned too. mask[t] = 1 means input_ids[t] is a target:
    the loss on the logits at t-1 predicting it. Then each image token becomes tokens_per_image copies (mask 0);
    with a list, the k-th image token becomes tokens_per_image[k] copies (ValueError unless the text holds exactly
    one image token per entry).
    """
    encoding = tokenizer.encode(conversation.text, conversation.add_special_tokens)
    ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), np.float32)
    for start, end in conversation.answer_spans:
        mask[(offsets[:, 1] > offsets[:, 0]) & (offsets[:, 0] < end) & (offsets[:, 1] > start)] = 1.0
    is_image = ids == tokenizer.image_token_id
    if isinstance(tokens_per_image, (int, np.integer)):
        copies = np.where(is_image, tokens_per_image, 1)
    else:
        if int(is_image.sum()) != len(tokens_per_image):
            raise ValueError(f"the text holds {int(is_image.sum())} image token(s) (id {tokenizer.image_token_id}) "
                             f"but {len(tokens_per_image)} per-image token counts were given")
        copies = np.ones(len(ids), np.int64)
        copies[is_image] = tokens_per_image
    return np.repeat(ids, copies), np.repeat(mask, copies)


def answer_spans(loss_mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of supervised tokens (one per answer, its end token included)."""
    edges = np.diff(np.concatenate([[0], (np.asarray(loss_mask) > 0).astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


_PROBE = [("user", IMAGE_PLACEHOLDER + "\nWhat is in the picture?"), ("assistant", "A red circle."),
          ("user", "Is it big?"), ("assistant", "Yes, it is big.")]


def check_template(template, tokenizer, tokens_per_image: int) -> None:
    """Raises ValueError unless, on a probe conversation, (1) the supervised tokens decode to exactly the answers,
    each closed by the template's end token, and (2) the generation prompt, tokenized on its own as at inference,
    gives exactly the tokens the single-pass training sequence holds before the last answer (a boundary the model
    never saw in training would make every prompt out of distribution). A template/tokenizer mismatch must stop
    the run, not quietly mask or shift samples."""
    ids, mask = encode(template.render(_PROBE, tokenizer), tokenizer, tokens_per_image)
    where = f"data.template={template.name} with data.tokenizer={tokenizer.description}"
    spans = answer_spans(mask)
    decoded = [tokenizer.decode(ids[start:end]).strip() for start, end in spans]
    expected = [text for role, text in _PROBE if role == "assistant"]
    end_id = answer_end_id(template, tokenizer)
    if decoded != expected or any(ids[end - 1] != end_id for _, end in spans):
        raise ValueError(f"{where}: the supervised tokens decode to {decoded!r}, expected {expected!r}, each closed "
                         f"by {template.close_token(tokenizer)!r} (id {end_id}); this tokenizer cannot represent "
                         "the answers faithfully with this template")
    prompt, _ = encode(template.prompt(_PROBE, tokenizer), tokenizer, tokens_per_image)
    if prompt.tolist() != ids[:spans[-1][0]].tolist():
        raise ValueError(f"{where}: the generation prompt tokenizes to {len(prompt)} tokens that are not the "
                         f"{spans[-1][0]} tokens the single-pass training sequence holds before the last answer; "
                         "generation would start from a boundary the model never saw")
