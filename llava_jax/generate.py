"""Batched generation on a static KV cache: one jitted prefill over images + prompts, then a jitted decode loop.

Public surface: `generate(model_config, params, prompt_ids_list, pixel_values, image_mask, max_new_tokens, eos_id,
pad_id, temperature=0.0, top_k=0, top_p=1.0, rng=None, image_feature_ids_list=None) -> list[list[int]]`,
`generate_tokens(...)` (the raw [B, max_new_tokens] array), `left_pad`, `left_pad_feature_ids`, `sample_logits`,
`generate_answers(config, params, examples, ...) -> [str]`,
`prompt_example(config, prompt, image)` and the CLI
`python -m llava_jax.generate (--workdir DIR | --checkpoint PATH) --image PATH --prompt TEXT [--max-new-tokens N]
[--temperature T] [--top-k K] [--top-p P] [--seed S] [--set KEY=VALUE ...]`.

Layout: prompts are LEFT-padded to one length P (rounded up to a multiple of PROMPT_LENGTH_MULTIPLE, so batches
share compilations). Padding has segment id 0 and position 0; row b's real tokens have positions 0..L_b-1, so
every row's last prompt token sits at slot P-1 and its t-th new token is written at cache slot P+t with position
L_b+t. The cache has P + max_new_tokens slots. The image token is never sampled (it would get no image features).
anyres (model.anyres.enabled): pixel_values [B, I, C, S, S, 3] (padded crops 0) and per prompt its image_feature_ids,
left-padded with -1 (text) like the prompt, go to the prefill alone; decode steps are text only. Prompts of
different image sizes thus share one compilation per (P, I, C).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from llava_jax.config import Config, ModelConfig
from llava_jax.data.bad_samples import BadSample
from llava_jax.data.examples import Example, ExampleEncoder
from llava_jax.data.templates import IMAGE_PLACEHOLDER, answer_end_id, get_template
from llava_jax.data.tokenizers import make_tokenizer
from llava_jax.model_params import load_model
from llava_jax.models.anyres_features import TEXT, check_feature_ids
from llava_jax.models.llava import LlavaModel, check_image_tokens, model_variables
from llava_jax.sharding import LOGICAL_RULES, host_batch_to_global

PROMPT_LENGTH_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0: greedy (argmax)
    top_k: int = 0             # 0: no top-k filter
    top_p: float = 1.0         # 1: no nucleus filter

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """Keeps the most likely tokens until their probability mass first reaches top_p (at least one token)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: argmax at temperature 0, else logits / temperature, then the
    top-k filter, then the top-p (nucleus) filter, then a categorical draw."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth_largest = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if sampling.top_p < 1:
        logits = _nucleus(logits, sampling.top_p)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


class PaddedPrompts(NamedTuple):
    input_ids: np.ndarray     # [B, P] int32, prompts right-aligned
    segment_ids: np.ndarray   # [B, P] int32, 1 = prompt token, 0 = padding
    positions: np.ndarray     # [B, P] int32, 0..L_b-1 over the prompt, 0 on padding
    lengths: np.ndarray       # [B] int32, L_b


def padded_prompt_length(longest: int) -> int:
    """The prompt slots of a batch whose longest prompt has `longest` tokens (a multiple of
    PROMPT_LENGTH_MULTIPLE, so batches of similar lengths share one compilation)."""
    return -(-longest // PROMPT_LENGTH_MULTIPLE) * PROMPT_LENGTH_MULTIPLE


def left_pad(prompts: Sequence[np.ndarray], pad_id: int, length: Optional[int] = None) -> PaddedPrompts:
    """Prompts right-aligned in `length` slots (default: `padded_prompt_length` of the longest)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; generation needs at least one prompt token")
    padded = padded_prompt_length(int(lengths.max())) if length is None else length
    if padded < lengths.max():
        raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit in {padded} slots")
    input_ids = np.full((len(prompts), padded), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), padded), np.int32)
    positions = np.zeros((len(prompts), padded), np.int32)
    for row, (prompt, length) in enumerate(zip(prompts, lengths)):
        input_ids[row, padded - length:] = prompt
        segment_ids[row, padded - length:] = 1
        positions[row, padded - length:] = np.arange(length)
    return PaddedPrompts(input_ids, segment_ids, positions, lengths)


def left_pad_feature_ids(feature_ids_list: Sequence[np.ndarray], padded_length: int) -> np.ndarray:
    """int32 [B, padded_length]: each prompt's anyres image_feature_ids right-aligned as `left_pad` aligns the prompt,
    -1 (text) on the padding."""
    out = np.full((len(feature_ids_list), padded_length), TEXT, np.int32)
    for row, ids in enumerate(feature_ids_list):
        if len(ids):
            out[row, padded_length - len(ids):] = ids
    return out


def _allowed_logits(logits: jax.Array, image_token_id: int) -> jax.Array:
    return logits.at[:, image_token_id].set(-jnp.inf)


def _prefill(model: LlavaModel, params, input_ids, pixel_values, segment_ids, positions, image_feature_ids=None, *,
             cache_length: int):
    """Images + left-padded prompts through the model into a fresh cache of `cache_length` slots (anyres: with
    image_feature_ids [B, P]). Returns (logits [B, V] after each row's last prompt token, cache)."""
    def last_token_logits(module: LlavaModel) -> jax.Array:
        hidden = module(input_ids, pixel_values, segment_ids=segment_ids, positions=positions,
                        cache_length=cache_length, return_hidden=True, image_feature_ids=image_feature_ids)
        return module.logits(hidden[:, -1:])[:, 0]
    logits, variables = model.apply(model_variables(params), method=last_token_logits, mutable=["cache"])
    return logits, variables["cache"]


def _decode_step(model: LlavaModel, params, cache, tokens, positions, cache_length: int):
    """tokens / positions [B] -> (logits [B, V] for the next token, updated cache)."""
    logits, variables = model.apply({**model_variables(params), "cache": cache}, tokens[:, None],
                                    segment_ids=jnp.ones_like(tokens)[:, None], positions=positions[:, None],
                                    cache_length=cache_length, mutable=["cache"])
    return logits[:, 0], variables["cache"]


def _decode(model: LlavaModel, params, cache, logits, prompt_lengths, rng, *, cache_length: int,
            max_new_tokens: int, eos_id: int, pad_id: int, sampling: Sampling) -> jax.Array:
    """The decode loop (lax.while_loop, exits once every row has produced EOS): tokens [B, max_new_tokens] int32.
    Token 0 comes from the prefill logits; step t feeds token t-1 at position L_b + t - 1. A row that has produced
    EOS emits pad_id from then on."""
    def choose(logits, step, finished):
        rng_step = jax.random.fold_in(rng, step)
        token = sample_logits(_allowed_logits(logits, model.config.image_token_id), rng_step, sampling)
        return jnp.where(finished, pad_id, token)

    def body(state):
        step, token, finished, tokens, cache = state
        logits, cache = _decode_step(model, params, cache, token, prompt_lengths + step - 1, cache_length)
        token = choose(logits, step, finished)
        return step + 1, token, finished | (token == eos_id), tokens.at[:, step].set(token), cache

    def not_done(state):
        step, _, finished, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    first = choose(logits, 0, jnp.zeros(logits.shape[:1], bool))
    tokens = jnp.full((logits.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), first, first == eos_id, tokens, cache)
    return jax.lax.while_loop(not_done, body, state)[3]


class _Programs(NamedTuple):
    prefill: Any
    decode: Any


_PROGRAMS: dict[str, _Programs] = {}


def _programs(model_config: ModelConfig) -> _Programs:
    """Jitted prefill and decode of one model config, built once per distinct config (jit then caches one
    compilation per shape and static setting)."""
    key = repr(model_config)
    if key not in _PROGRAMS:
        model = LlavaModel(model_config)
        _PROGRAMS[key] = _Programs(
            prefill=jax.jit(functools.partial(_prefill, model), static_argnames="cache_length"),
            decode=jax.jit(functools.partial(_decode, model),
                           static_argnames=("cache_length", "max_new_tokens", "eos_id", "pad_id", "sampling")))
    return _PROGRAMS[key]


def params_mesh(params) -> Optional[Mesh]:
    """The mesh `params` are sharded over (model_params.load_model, a training state), or None for params on one
    device (then generation runs there, on host inputs)."""
    leaves = jax.tree_util.tree_leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def batch_shards(mesh: Optional[Mesh]) -> int:
    """Rows a generation batch must be a multiple of: the mesh's data x fsdp shards (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def generate_tokens(model_config: ModelConfig, params, prompt_ids_list: Sequence[np.ndarray],
                    pixel_values: Optional[np.ndarray], image_mask: Optional[np.ndarray], max_new_tokens: int,
                    eos_id: int, pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    rng: Optional[jax.Array] = None,
                    image_feature_ids_list: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """New tokens [B, max_new_tokens] int32 for B prompts (int ids with each image's tokens already expanded) and
    their images pixel_values [B, I, S, S, 3] / image_mask [B, I] (None: text only). A row's EOS is kept and
    followed by pad_id. Sampling (temperature > 0) needs an explicit `rng`. anyres models: pixel_values
    [B, I, C, S, S, 3] and `image_feature_ids_list`, one int32 [L_b] per prompt (data.anyres_inputs).
    Params sharded over a mesh (`params_mesh`) get the batch sharded over its data x fsdp axes (rows padded to a
    multiple of them). Single process; `generate_shares` is the multi-process form."""
    mesh = params_mesh(params)
    rows = len(prompt_ids_list)
    extra = -rows % batch_shards(mesh)
    if extra:    # padding rows repeat the first prompt and are dropped
        prompt_ids_list = list(prompt_ids_list) + [prompt_ids_list[0]] * extra
        if pixel_values is not None:
            pixel_values = np.concatenate([pixel_values, np.repeat(pixel_values[:1], extra, axis=0)])
            image_mask = np.concatenate([image_mask, np.repeat(image_mask[:1], extra, axis=0)])
        if image_feature_ids_list is not None:
            image_feature_ids_list = list(image_feature_ids_list) + [image_feature_ids_list[0]] * extra
    _, tokens = generate_shares(model_config, params, mesh, prompt_ids_list, pixel_values, image_mask,
                                max_new_tokens, eos_id, pad_id, np.arange(len(prompt_ids_list)), temperature, top_k,
                                top_p, rng, image_feature_ids_list)
    return tokens[:rows]


def generate_shares(model_config: ModelConfig, params, mesh: Optional[Mesh], prompt_ids_list: Sequence[np.ndarray],
                    pixel_values: Optional[np.ndarray], image_mask: Optional[np.ndarray], max_new_tokens: int,
                    eos_id: int, pad_id: int, row_ids: np.ndarray, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, rng: Optional[jax.Array] = None,
                    image_feature_ids_list: Optional[Sequence[np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Generation on every process at once: each passes its own share of the batch (the same number of rows,
    a multiple of `batch_shards(mesh)` / process count, arguments as `generate_tokens`) and int `row_ids` naming
    them; all processes agree on the padded prompt length, the batch runs sharded over the mesh's data x fsdp
    axes, and every process gets (row_ids [G], tokens [G, max_new_tokens]) of ALL G rows, in the same order."""
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    if sampling.temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an explicit rng (jax.random.key)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompt_ids_list)
    if jax.process_count() > 1:
        longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    prompts = left_pad(prompt_ids_list, pad_id, padded_prompt_length(longest))
    max_positions = model_config.decoder.max_position_embeddings
    if longest + max_new_tokens > max_positions:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} goes beyond "
                         f"model.decoder.max_position_embeddings={max_positions}; shorten the prompt or generate "
                         "fewer tokens")
    num_images = 0 if pixel_values is None else pixel_values.shape[1]
    feature_ids = _anyres_feature_ids(model_config, prompts, prompt_ids_list, pixel_values, image_feature_ids_list)
    if feature_ids is None:
        check_image_tokens(prompts.input_ids, image_mask, num_images, model_config)
    inputs = {"input_ids": prompts.input_ids, "segment_ids": prompts.segment_ids, "positions": prompts.positions,
              "lengths": prompts.lengths, "row_ids": np.asarray(row_ids, np.int32), "pixel_values": pixel_values,
              "image_feature_ids": feature_ids}
    inputs = {key: value for key, value in inputs.items() if value is not None}
    context = contextlib.nullcontext() if mesh is None else _on_mesh(mesh)
    with context:
        if mesh is not None:
            inputs = host_batch_to_global(inputs, mesh)
        programs = _programs(model_config)
        cache_length = prompts.input_ids.shape[1] + max_new_tokens
        logits, cache = programs.prefill(params, inputs["input_ids"], inputs.get("pixel_values"),
                                         inputs["segment_ids"], inputs["positions"], inputs.get("image_feature_ids"),
                                         cache_length=cache_length)
        tokens = programs.decode(params, cache, logits, inputs["lengths"],
                                 jax.random.key(0) if rng is None else rng, cache_length=cache_length,
                                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, sampling=sampling)
    if mesh is None or jax.process_count() == 1:
        return np.asarray(inputs["row_ids"]), np.asarray(tokens)
    return (np.asarray(multihost_utils.process_allgather(inputs["row_ids"], tiled=True)),
            np.asarray(multihost_utils.process_allgather(tokens, tiled=True)))


@contextlib.contextmanager
def _on_mesh(mesh: Mesh):
    """The model's logical activation constraints apply (batch over data x fsdp), as in training."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def _anyres_feature_ids(model_config: ModelConfig, prompts: PaddedPrompts, prompt_ids_list, pixel_values,
                        image_feature_ids_list) -> Optional[np.ndarray]:
    """The left-padded, checked image_feature_ids [B, P] of an anyres batch with images; None for LLaVA-1.5 inputs
    (and for text-only anyres prompts)."""
    if image_feature_ids_list is None:
        if model_config.anyres.enabled and pixel_values is not None:
            raise ValueError("model.anyres.enabled: generating with images needs image_feature_ids_list (one per "
                             "prompt, from data.anyres_inputs / ExampleEncoder.eval_example)")
        return None
    if not model_config.anyres.enabled:
        raise ValueError("image_feature_ids_list is for anyres models; model.anyres.enabled is false")
    if pixel_values is None or pixel_values.ndim != 6:
        raise ValueError("anyres generation needs pixel_values [B, I, C, S, S, 3]; got "
                         f"{None if pixel_values is None else pixel_values.shape}")
    lengths = [len(ids) for ids in image_feature_ids_list]
    if lengths != [len(p) for p in prompt_ids_list]:
        raise ValueError(f"image_feature_ids lengths {lengths} differ from the prompt lengths "
                         f"{[len(p) for p in prompt_ids_list]}")
    feature_ids = left_pad_feature_ids(image_feature_ids_list, prompts.input_ids.shape[1])
    table_rows = pixel_values.shape[1] * model_config.crops_per_image * model_config.tokens_per_image
    check_feature_ids(prompts.input_ids, feature_ids, table_rows, model_config.image_token_id)
    return feature_ids


def _until_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    tokens = tokens.tolist()
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def generate(model_config: ModelConfig, params, prompt_ids_list: Sequence[np.ndarray],
             pixel_values: Optional[np.ndarray], image_mask: Optional[np.ndarray], max_new_tokens: int, eos_id: int,
             pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: Optional[jax.Array] = None,
             image_feature_ids_list: Optional[Sequence[np.ndarray]] = None) -> list[list[int]]:
    """The new tokens of each prompt up to (not including) its EOS; arguments as `generate_tokens`."""
    tokens = generate_tokens(model_config, params, prompt_ids_list, pixel_values, image_mask, max_new_tokens,
                             eos_id, pad_id, temperature, top_k, top_p, rng, image_feature_ids_list)
    return [_until_eos(row, eos_id) for row in tokens]


def generate_answers(config: Config, params, examples: Sequence[dict], max_new_tokens: int, batch_size: int = 16,
                     **sampling) -> list[str]:
    """Decoded answers to evaluation examples (see data.pipeline.make_eval_examples), `batch_size` at a time;
    generation stops at the token that closes an answer in data.template. anyres examples carry image_feature_ids
    (ExampleEncoder.eval_example); their pixel_values [I, C, S, S, 3] stack whatever the image sizes."""
    tokenizer = make_tokenizer(config.data, config.model)
    stop_id = answer_end_id(get_template(config.data.template), tokenizer)
    answers = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        feature_ids = ([ex["image_feature_ids"] for ex in batch]
                       if config.model.anyres.enabled and "image_feature_ids" in batch[0] else None)
        new_tokens = generate(config.model, params, [ex["prompt_ids"] for ex in batch],
                              np.stack([ex["pixel_values"] for ex in batch]),
                              np.stack([ex["image_mask"] for ex in batch]), max_new_tokens, stop_id,
                              tokenizer.pad_id, image_feature_ids_list=feature_ids, **sampling)
        answers += [tokenizer.decode(tokens) for tokens in new_tokens]
    return answers


def prompt_example(config: Config, prompt: str, image: Optional[str]) -> dict:
    """The evaluation example the data pipeline builds for one user `prompt` about `image` (None: no image):
    "<image>\\n" goes in front of the prompt unless it already holds "<image>"."""
    text = prompt if image is None or IMAGE_PLACEHOLDER in prompt else f"{IMAGE_PLACEHOLDER}\n{prompt}"
    example = Example(id="prompt", turns=[("user", text), ("assistant", "(answer)")],
                      images=[] if image is None else [image])
    return ExampleEncoder(config, make_tokenizer(config.data, config.model)).eval_example(example)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Answer a prompt about an image with a trained checkpoint.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (its latest checkpoint)")
    source.add_argument("--checkpoint", help="one checkpoint directory: WORKDIR/checkpoints/<step>")
    parser.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config, params = load_model(args.workdir or args.checkpoint, args.overrides)
    try:
        example = prompt_example(config, args.prompt, args.image)
    except BadSample as bad:
        raise SystemExit(f"cannot use this prompt/image: {bad}") from None
    answer, = generate_answers(config, params, [example], args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, rng=jax.random.key(args.seed))
    print(answer)


if __name__ == "__main__":
    main()
