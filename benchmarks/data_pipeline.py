"""Throughput of the full input pipeline next to bare PIL decode + resize of the same JPEG files (same run).

    python benchmarks/data_pipeline.py [--images 256] [--size 336] [--batch-size 32] [--threads 2] [--workers 0]

Prints one JSON object: median samples/s of both over alternating rounds, their ratio (goal: pipeline >= 0.8 x
bare), and process CPU ms per sample (steadier than rates on a shared machine). The pipeline is
llava_json -> JPEG decode -> pad/resize -> uint8 arrays -> byte tokenizer + vicuna_v1 template + 576 image tokens ->
padded rows -> batches, with the default CLIP-336 model config: exactly what the train loop gets (pixels stay
uint8; the train step normalises them on device).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax.config import load_config  # noqa: E402
from llava_jax.data.pipeline import make_train_iterator  # noqa: E402


def write_dataset(directory: str, count: int, size: int) -> str:
    """`count` photo-like JPEGs (smooth gradients + noise + a few shapes) and a LLaVA JSON file over them."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    records = []
    for i in range(count):
        base = np.stack([np.sin(3 * x + i), np.cos(2 * y - i), x * y], -1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"{i:05d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        records.append({"id": str(i), "image": os.path.basename(path), "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail, including colours and layout."},
            {"from": "gpt", "value": "The picture shows smooth colour gradients with fine noise. " * 4}]})
    json_path = os.path.join(directory, "data.json")
    with open(json_path, "w") as f:
        json.dump(records, f)
    return json_path


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(run, samples: int) -> tuple[float, float]:
    """(samples/s, process CPU ms per sample) of `run()`, which handles `samples` samples."""
    cpu, start = cpu_seconds(), time.perf_counter()
    run()
    return samples / (time.perf_counter() - start), (cpu_seconds() - cpu) / samples * 1e3


def decode_resize(path: str, size: int) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB").resize((size, size), Image.BICUBIC)


def make_pipeline(json_path: str, args):
    config = load_config(None, [
        "data.source=llava_json", f"data.json_path={json_path}", "data.template=vicuna_v1", "data.max_length=1024",
        f"data.num_threads={args.threads}", f"data.num_workers={args.workers}", f"train.batch_size={args.batch_size}",
        f"model.vision.image_size={args.size}"])
    iterator = make_train_iterator(config)
    for _ in range(args.images // args.batch_size):                                # start-up and one warm pass
        batch = next(iterator)
    assert batch["pixel_values"].shape == (args.batch_size, 1, args.size, args.size, 3)
    assert batch["pixel_values"].dtype == np.uint8
    return iterator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3, help="passes over the files per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare / pipeline measurements")
    args = parser.parse_args()
    batches = max(1, args.passes * args.images // args.batch_size)
    samples = batches * args.batch_size
    with tempfile.TemporaryDirectory() as directory:
        json_path = write_dataset(directory, args.images, args.size)
        paths = sorted(os.path.join(directory, p) for p in os.listdir(directory) if p.endswith(".jpg"))
        paths = (paths * (samples // len(paths) + 1))[:samples]
        iterator = make_pipeline(json_path, args)
        bare, full = [], []
        with ThreadPoolExecutor(max(1, args.threads)) as pool:
            def run_bare():
                for _ in pool.map(decode_resize, paths, [args.size] * samples):    # results dropped as they come
                    pass

            def run_pipeline():
                for _ in range(batches):
                    next(iterator)
            run_bare()                                                             # warm the page cache
            for _ in range(args.rounds):
                time.sleep(1.0)                               # let the pipeline refill its prefetch buffers first
                bare.append(measure(run_bare, samples))
                full.append(measure(run_pipeline, samples))
        if hasattr(iterator, "close"):
            iterator.close()
    bare_rate, bare_cpu = (statistics.median(v) for v in zip(*bare))
    full_rate, full_cpu = (statistics.median(v) for v in zip(*full))
    print(json.dumps({
        "bare_decode_resize_samples_per_s": round(bare_rate, 1), "pipeline_samples_per_s": round(full_rate, 1),
        "pipeline_over_bare": round(full_rate / bare_rate, 3), "bare_cpu_ms_per_sample": round(bare_cpu, 3),
        "pipeline_cpu_ms_per_sample": round(full_cpu, 3) if args.workers == 0 else None,   # workers: not counted
        "rounds_samples_per_s": {"bare": [round(r) for r, _ in bare], "pipeline": [round(r) for r, _ in full]},
        "image_size": args.size, "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
        "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
