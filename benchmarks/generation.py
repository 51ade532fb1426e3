"""Batched greedy generation on CPU, in one run: our `llava_jax.generate.generate_tokens` (jitted prefill + a
lax.while_loop decode on a static KV cache) against transformers' `LlavaForConditionalGeneration.generate` for the
same model (configs/bench_cpu.yaml dims, random init, float32; our params exported with `save_hf_llava` and loaded
by transformers) and the same batch.

    python benchmarks/generation.py [--batch 8] [--new-tokens 64] [--repeats 3] [--rounds 3] [--seed 0]

Prints one JSON line: generated tokens/s of both (batch * new_tokens / the seconds of a whole generate call,
prefill included), `speedup` = ours / transformers (goal >= 3), `compile_s` (our first call's seconds less a warm
call's: the jit compilation of prefill and decode), `tokens_equal_fraction` (the share of the [batch, new_tokens]
tokens equal in both; greedy on the same float32 weights), `threads` (torch is set to os.cpu_count(), the size of
XLA's CPU thread pool), and the split of a call: each side's prefill (a call making 1 token) and its decode step
((call - prefill) / (new_tokens - 1)); `weight_pass_ms` / `torch_weight_pass_ms`, the floor under any decode
step here (every language-model weight matrix times a [batch, in] activation and nothing else, in XLA / in torch)
and `speedup_ceiling`, the speedup of a generate call made of the faster prefill plus one faster weight pass per
further token (what an implementation with no cost beyond its matmuls would reach on this machine). Each round
times our call, our prefill, transformers' call and its prefill, and both weight passes (median of --repeats calls
each, after a pause); every figure is its best round, as in train_step.py, since other processes only ever slow a
round down (torch's threads far more than XLA's: on a busy machine the speedup comes out inflated; the run itself
keeps `load_average_1m` near the core count, well above it says it was not alone).

The batch: per row a short text prefix, one image's tokens, then a question (lengths differ per row), one random
image. We left-pad the prompts ourselves (generate.left_pad, to a multiple of 16); transformers gets them left-padded
to the longest with an attention mask, as its generate wants. No EOS is ever produced (ours: eos_id -1;
transformers: eos_token_id None), so both make exactly new_tokens tokens per row; both exclude the image token
(ours always does; transformers through suppress_tokens). The process re-executes itself with
llava_jax.host_malloc's allocator, as train.py and benchmarks/train_step.py do, for both frameworks alike.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from _common import emit, load_bench_config, median_seconds

from llava_jax.host_malloc import reexec_with_host_malloc

PAD_ID = 0
NO_EOS = -1          # an id generation never produces: every row runs to new_tokens
SETTLE_S = 1.0       # pause before each timing: the previous run's worker threads (OpenMP, Eigen) stop spin-waiting
PREFIX_TOKENS = (3, 24)      # text before the image, [low, high) per row (a system prompt / chat header)
QUESTION_TOKENS = (8, 64)    # text after the image (the question)


def bench_prompts(model_config, batch: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """(prompts: per row int32 [prefix + tokens_per_image + question] with different lengths, pixel_values
    [batch, 1, S, S, 3] float32 in [-1, 1], as CLIP's preprocessing leaves them)."""
    rng = np.random.default_rng(seed)
    image_tokens = np.full(model_config.tokens_per_image, model_config.image_token_id, np.int32)
    prompts = []
    for _ in range(batch):
        prefix = rng.integers(1, model_config.image_token_id, rng.integers(*PREFIX_TOKENS))
        question = rng.integers(1, model_config.image_token_id, rng.integers(*QUESTION_TOKENS))
        prompts.append(np.concatenate([prefix, image_tokens, question]).astype(np.int32))
    size = model_config.vision.image_size
    pixel_values = rng.uniform(-1, 1, (batch, 1, size, size, 3)).astype(np.float32)
    return prompts, pixel_values


def our_generation(model_config, params, prompts, pixel_values):
    """new_tokens -> a blocking run of one `generate_tokens` call making that many tokens -> [B, new_tokens]."""
    from llava_jax.generate import generate_tokens
    image_mask = np.ones(pixel_values.shape[:2], np.int32)

    def make_run(new_tokens: int):
        return lambda: generate_tokens(model_config, params, prompts, pixel_values, image_mask, new_tokens, NO_EOS,
                                       PAD_ID)
    return make_run


def transformers_generation(model_config, params, prompts, pixel_values):
    """new_tokens -> a blocking run of one LlavaForConditionalGeneration.generate call on the same weights and batch
    (left-padded to the longest prompt) making that many tokens -> [B, new_tokens]."""
    import torch
    import transformers

    from llava_jax.hf import save_hf_llava
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as directory:
        save_hf_llava(model_config, params, directory)
        model = transformers.LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, length - len(prompt):] = 1
    pixels = torch.tensor(pixel_values[:, 0].transpose(0, 3, 1, 2).copy())    # [B, 3, S, S]

    def make_run(new_tokens: int):
        def run() -> np.ndarray:
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=PAD_ID,
                                     suppress_tokens=[model_config.image_token_id])
            if out.shape != (len(prompts), length + new_tokens):
                raise RuntimeError(f"transformers generated {tuple(out.shape)}, expected "
                                   f"{(len(prompts), length + new_tokens)}: it stopped early")
            return out[:, length:].numpy()
        return run
    return make_run


def weight_matrices(params) -> list[np.ndarray]:
    """Every language-model weight matrix [in, out] (each layer's slice of a stacked kernel, the LM head)."""
    import jax
    return [w for leaf in jax.tree_util.tree_leaves(params["language_model"]) if leaf.ndim >= 2
            for w in np.asarray(leaf).reshape(-1, *leaf.shape[-2:])]


def weight_pass(matrices: list[np.ndarray], batch: int):
    """A blocking run of the one thing a decode step cannot skip: every weight matrix multiplied by a [batch, in]
    activation, jitted, nothing else (no attention, norms, cache or sampling). Its time is a floor under any decode
    step of this model and batch on this machine."""
    import jax
    import jax.numpy as jnp
    inputs = [np.random.default_rng(i).standard_normal((batch, m.shape[0])).astype(np.float32)
              for i, m in enumerate(matrices)]

    @jax.jit
    def step(matrices, inputs):
        return sum(jnp.dot(x, m)[0, 0] for m, x in zip(matrices, inputs))
    matrices = [jnp.asarray(m) for m in matrices]
    return lambda: step(matrices, inputs).block_until_ready()


def torch_weight_pass(matrices: list[np.ndarray], batch: int):
    """`weight_pass` in torch (its own matmul kernels), so the floor is not one library's."""
    import torch
    matrices = [torch.from_numpy(np.array(m)) for m in matrices]
    inputs = [torch.randn(batch, m.shape[0]) for m in matrices]

    def run():
        with torch.inference_mode():
            return sum(float((x @ m)[0, 0]) for m, x in zip(matrices, inputs))
    return run


def measure(batch: int = 8, new_tokens: int = 64, repeats: int = 3, rounds: int = 3, seed: int = 0) -> dict:
    """The benchmark's record (see the module docstring) for one setting, both frameworks in this process."""
    import jax
    import torch

    from llava_jax.models.llava import init_params
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (the per-step decode time needs a step), got {new_tokens}")
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    model_config = load_bench_config().model
    params = jax.device_get(init_params(model_config, jax.random.key(seed)))
    prompts, pixel_values = bench_prompts(model_config, batch, seed)
    ours = our_generation(model_config, params, prompts, pixel_values)
    theirs = transformers_generation(model_config, params, prompts, pixel_values)
    runs = {"ours": ours(new_tokens), "ours_prefill": ours(1),
            "transformers": theirs(new_tokens), "transformers_prefill": theirs(1),
            "weight_pass": weight_pass(weight_matrices(params), batch),
            "torch_weight_pass": torch_weight_pass(weight_matrices(params), batch)}
    start = time.perf_counter()
    our_tokens = runs["ours"]()
    first_s = time.perf_counter() - start
    compile_s = first_s - median_seconds(runs["ours"], 1)
    equal = float(np.mean(our_tokens == runs["transformers"]()))
    for name in ("ours_prefill", "transformers_prefill", "weight_pass", "torch_weight_pass"):
        runs[name]()
    per_round = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(SETTLE_S)
            per_round[name].append(median_seconds(run, repeats))
    seconds = {name: min(times) for name, times in per_round.items()}
    tokens = batch * new_tokens
    decode_step_ms = {name: 1e3 * (seconds[name] - seconds[f"{name}_prefill"]) / (new_tokens - 1)
                      for name in ("ours", "transformers")}
    # no generate call can beat the faster prefill plus a weight pass per further token
    pass_s = min(seconds["weight_pass"], seconds["torch_weight_pass"])
    floor_s = min(seconds["ours_prefill"], seconds["transformers_prefill"]) + (new_tokens - 1) * pass_s
    return {
        "batch": batch, "new_tokens": new_tokens,
        "ours_tokens_per_s": round(tokens / seconds["ours"], 1),
        "transformers_tokens_per_s": round(tokens / seconds["transformers"], 1),
        "speedup": round(seconds["transformers"] / seconds["ours"], 3),
        "compile_s": round(compile_s, 2),
        "tokens_equal_fraction": round(equal, 4),
        "threads": threads,
        "ours_s": round(seconds["ours"], 4), "transformers_s": round(seconds["transformers"], 4),
        "ours_prefill_s": round(seconds["ours_prefill"], 4),
        "transformers_prefill_s": round(seconds["transformers_prefill"], 4),
        "ours_decode_step_ms": round(decode_step_ms["ours"], 3),
        "transformers_decode_step_ms": round(decode_step_ms["transformers"], 3),
        "weight_pass_ms": round(1e3 * seconds["weight_pass"], 3),
        "torch_weight_pass_ms": round(1e3 * seconds["torch_weight_pass"], 3),
        "speedup_ceiling": round(seconds["transformers"] / floor_s, 3),
        "round_seconds": {name: [round(t, 4) for t in times] for name, times in per_round.items()},
        "prompt_lengths": [len(p) for p in prompts], "repeats": repeats, "rounds": rounds,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per framework (median)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; every figure is its best round")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    reexec_with_host_malloc()
    args = parse_args()
    record = measure(args.batch, args.new_tokens, args.repeats, args.rounds, args.seed)
    record.update(ld_preload=os.environ.get("LD_PRELOAD", ""), glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
    emit(record)


if __name__ == "__main__":
    main()
