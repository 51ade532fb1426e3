"""Share of padding tokens in batches of a LLaVA-NeXT-like training mix, with and without packing (same run).

    python benchmarks/anyres_padding.py [--batches 32] [--batch-size ROWS] [--max-images N] [--max-length T]
        [--max-sample-length T] [--records 2000] [--text-only 0.12] [--tokens-per-word 1.3]
        [--system-prompt-tokens 35] [--threads 2]

Writes a mix to a temp dir (LLaVA JSON + JPEGs whose SIZES follow a LLaVA-NeXT-like spread: COCO 640x480,
TextVQA 1024x768, DocVQA 1700x2200, screens 1920x1080, strips 300x1200, thumbnails 200x150 ...; low-detail pixels,
since only the size decides the anyres grid), then runs the input pipeline of configs/llava_next_7b_stage2.yaml
(CLIP 336/14, anyres with the default pinpoints: 1176-2928 image tokens per image) with the byte tokenizer: unpacked
(one sample per row of data.sample_length = 4096 tokens, as LLaVA-NeXT trains) and packed (the preset's rows:
8192 tokens, 4 image slots, samples of at most 4096 tokens). No model runs. The byte tokenizer spends one token per
byte, so a turn of W words is written as round(W x --tokens-per-word) bytes (a LLaMA tokenizer's count). Prints one
JSON object: per setting the padding share (segment_ids == 0 over all token slots), samples per batch, image-token
share, text-only share, bad samples by reason; packed / unpacked ratios (goal: packed padding <= 5 %); and the
padding of first-fit-decreasing over the whole mix at the packed setting, a floor for any packer (at 4096-token rows
with one image slot that floor is ~33 %: most samples fill over half a row).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llava_jax.config import load_config  # noqa: E402
from llava_jax.data.anyres_inputs import image_token_count  # noqa: E402
from llava_jax.data.bad_samples import REASONS  # noqa: E402
from llava_jax.data.examples import ExampleEncoder  # noqa: E402
from llava_jax.data.pipeline import make_train_iterator  # noqa: E402
from llava_jax.data.sources import LlavaJsonSource  # noqa: E402
from llava_jax.data.tokenizers import make_tokenizer  # noqa: E402

PRESET = os.path.join(REPO, "configs", "llava_next_7b_stage2.yaml")
# (width, height): weight. Roughly the image sources of the LLaVA-NeXT 760K mix (COCO / GQA / VG photos, OCR-VQA
# covers, TextVQA, charts and diagrams, DocVQA pages, LAION / ShareGPT4V large photos and screens) plus extremes.
IMAGE_SIZES = {(640, 480): 0.25, (480, 640): 0.08, (500, 375): 0.12, (336, 336): 0.05, (300, 450): 0.07,
               (200, 150): 0.05, (800, 600): 0.08, (1024, 768): 0.10, (1920, 1080): 0.07, (1700, 2200): 0.07,
               (300, 1200): 0.03, (1200, 300): 0.03}
VARIANTS_PER_SIZE = 3


def write_images(directory: str, rng: np.random.Generator) -> dict[tuple[int, int], list[str]]:
    """VARIANTS_PER_SIZE JPEGs per size of IMAGE_SIZES: 8x8 random colours upscaled (low detail: fast to encode)."""
    names = {}
    for width, height in IMAGE_SIZES:
        names[(width, height)] = []
        for variant in range(VARIANTS_PER_SIZE):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            name = f"{width}x{height}_{variant}.jpg"
            coarse.resize((width, height), Image.BILINEAR).save(os.path.join(directory, name), quality=85)
            names[(width, height)].append(name)
    return names


def words(rng: np.random.Generator, low: int, high: int, tokens_per_word: float) -> str:
    """Text of a log-uniform number of words in [low, high], written as round(words x tokens_per_word) bytes
    (lowercase letters and spaces, no leading / trailing space)."""
    count = int(np.exp(rng.uniform(np.log(low), np.log(high + 1))))
    length = max(2, round(count * tokens_per_word))
    letters = rng.choice(np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8), length)
    letters[0] = letters[-1] = ord("x")
    return letters.tobytes().decode()


def write_dataset(directory: str, count: int, text_only: float, tokens_per_word: float, seed: int = 0) -> str:
    """`count` LLaVA JSON records: a `text_only` share without image (2-6 turn pairs, ShareGPT-like), the rest with
    one image of a size drawn from IMAGE_SIZES (1-4 turn pairs); questions 5-60 words, answers 20-300 words."""
    rng = np.random.default_rng(seed)
    images = write_images(directory, rng)
    sizes, weights = list(IMAGE_SIZES), np.array(list(IMAGE_SIZES.values()))
    records = []
    for i in range(count):
        has_image = rng.random() >= text_only
        pairs = int(rng.integers(1, 5) if has_image else rng.integers(2, 7))
        conversations = []
        for turn in range(pairs):
            question = words(rng, 5, 60, tokens_per_word)
            if has_image and turn == 0:
                question = "<image>\n" + question
            conversations += [{"from": "human", "value": question},
                              {"from": "gpt", "value": words(rng, 20, 300, tokens_per_word)}]
        record = {"id": str(i), "conversations": conversations}
        if has_image:
            size = sizes[rng.choice(len(sizes), p=weights / weights.sum())]
            record["image"] = images[size][int(rng.integers(VARIANTS_PER_SIZE))]
        records.append(record)
    json_path = os.path.join(directory, "mix.json")
    with open(json_path, "w") as f:
        json.dump(records, f)
    return json_path


def make_config(json_path: str, args, pack: bool):
    """The preset with the byte tokenizer; its vicuna system prompt (156 bytes) becomes `--system-prompt-tokens`
    bytes, the prompt's length in LLaMA tokens. Rows, image slots and samples per row are the preset's unless given.
    Unpacked rows hold one sample each, so they are `data.sample_length` long (4096 for the preset, as LLaVA-NeXT
    trains); packed rows are `data.max_length` long and hold samples of at most `data.sample_length` tokens."""
    preset = load_config(PRESET)
    sample_length = args.max_sample_length or preset.data.sample_length
    length = args.max_length or preset.data.max_length
    overrides = [f"data.json_path={json_path}", f"data.image_root={os.path.dirname(json_path)}", "data.tokenizer=byte",
                 f"data.system_prompt={'x' * args.system_prompt_tokens}", f"data.pack={str(pack).lower()}",
                 f"data.max_images={args.max_images or preset.data.max_images}", f"data.num_threads={args.threads}",
                 f"train.batch_size={args.batch_size or preset.train.batch_size}", "train.micro_batch_size=null",
                 f"model.decoder.max_position_embeddings={max(sample_length, 4096)}"]
    if pack:
        overrides += [f"data.max_length={length}", f"data.max_sample_length={min(sample_length, length)}"]
    else:
        overrides += [f"data.max_length={sample_length}", "data.max_sample_length=null"]
    return load_config(PRESET, overrides)


def offline_packing(config) -> dict:
    """Padding share of first-fit-decreasing over EVERY record of the mix at once (tokens <= max_length and images
    <= max_images per row): near the best any packer can do (FFD uses <= 11/9 of the optimal rows + 1), so a
    streaming packer with a small window cannot beat it. Also the share of samples longer than half a row (no two
    of them share one)."""
    data = config.data
    encoder = ExampleEncoder(config, make_tokenizer(data, config.model))
    source = LlavaJsonSource(data.json_path, data.image_root)
    items = sorted(((len(encoder.tokens(source[i])[0]), len(source[i].images)) for i in range(len(source))),
                   reverse=True)
    room = np.zeros(0, np.int64)                        # [rows] token slots left
    images = np.zeros(0, np.int64)                      # [rows] image slots used
    for length, count in items:
        fits = np.nonzero((room >= length) & (images + count <= data.max_images))[0]
        if len(fits):
            room[fits[0]] -= length
            images[fits[0]] += count
        else:
            room, images = np.append(room, data.max_length - length), np.append(images, count)
    lengths = np.array([length for length, _ in items])
    return {"padding_share": round(float(room.sum() / (len(room) * data.max_length)), 4),
            "samples_per_row": round(len(items) / len(room), 3),
            "mean_sample_tokens": round(float(lengths.mean()), 1),
            "samples_over_half_row_share": round(float((lengths > data.max_length // 2).mean()), 4)}


def measure(config, batches: int) -> dict:
    """Token and sample counts over `batches` batches of the train iterator."""
    image_token_id = config.model.image_token_id
    iterator = make_train_iterator(config)
    slots = padding = image_tokens = samples = text_only = rows_images_full = 0
    bad = np.zeros(len(REASONS), np.int64)
    for _ in range(batches):
        batch = next(iterator)
        segment_ids, input_ids = batch["segment_ids"], batch["input_ids"]               # [b, T]
        slots += segment_ids.size
        padding += int((segment_ids == 0).sum())
        image_tokens += int((input_ids == image_token_id).sum())
        samples += int(batch["num_samples"].sum())
        for row_segments, row_ids in zip(segment_ids, input_ids):
            segments = set(np.unique(row_segments[row_segments > 0]).tolist())
            text_only += len(segments - set(np.unique(row_segments[row_ids == image_token_id]).tolist()))
        rows_images_full += int((batch["image_mask"].sum(axis=1) == config.data.max_images).sum())
        bad += batch["bad_samples"].sum(axis=0)
    if hasattr(iterator, "close"):
        iterator.close()
    rows = batches * config.train.batch_size
    return {"padding_share": round(padding / slots, 4), "samples_per_batch": round(samples / batches, 2),
            "samples_per_row": round(samples / rows, 3), "image_token_share": round(image_tokens / slots, 4),
            "text_token_share": round((slots - padding - image_tokens) / slots, 4),
            "text_only_sample_share": round(text_only / samples, 4),
            "rows_with_all_image_slots_used": round(rows_images_full / rows, 4),
            "bad_samples": {reason: int(n) for reason, n in zip(REASONS, bad)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per batch (= the packer's first-fit bins; default: the preset's)")
    parser.add_argument("--max-images", type=int, default=None, help="data.max_images (default: the preset's)")
    parser.add_argument("--max-length", type=int, default=None, help="packed rows' tokens (default: the preset's)")
    parser.add_argument("--max-sample-length", type=int, default=None,
                        help="data.max_sample_length (default: the preset's data.sample_length)")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--text-only", type=float, default=0.12, help="share of records without an image")
    parser.add_argument("--tokens-per-word", type=float, default=1.3)
    parser.add_argument("--system-prompt-tokens", type=int, default=35, help="the vicuna system prompt in LLaMA tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        json_path = write_dataset(directory, args.records, args.text_only, args.tokens_per_word)
        unpacked_config = make_config(json_path, args, pack=False)
        unpacked = measure(unpacked_config, args.batches)
        packed_config = make_config(json_path, args, pack=True)
        packed = measure(packed_config, args.batches)
        offline = offline_packing(packed_config)
    model = unpacked_config.model
    counts = {f"{w}x{h}": image_token_count((h, w), model) for w, h in IMAGE_SIZES}
    weights = np.array(list(IMAGE_SIZES.values()))
    print(json.dumps({
        "unpacked": unpacked, "packed": packed,
        "packed_over_unpacked": {"padding_share": round(packed["padding_share"] / unpacked["padding_share"], 3),
                                 "samples_per_batch": round(packed["samples_per_batch"]
                                                            / unpacked["samples_per_batch"], 3)},
        "offline_first_fit_decreasing": offline,
        "goal_packed_padding_share_max": 0.05, "goal_met": packed["padding_share"] <= 0.05,
        "image_tokens_by_size": counts,
        "mean_image_tokens": round(float(np.dot(weights, list(counts.values())) / weights.sum()), 1),
        "packed_max_length": packed_config.data.max_length, "unpacked_max_length": unpacked_config.data.max_length,
        "max_sample_length": packed_config.data.sample_length, "max_images": packed_config.data.max_images,
        "batches": args.batches, "batch_size": packed_config.train.batch_size, "records": args.records, "text_only_records": args.text_only,
        "tokens_per_word": args.tokens_per_word, "system_prompt_tokens": args.system_prompt_tokens}))


if __name__ == "__main__":
    main()
