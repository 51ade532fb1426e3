"""Peak memory and throughput of the input pipeline against dataset size: JSONL vs ArrayRecord shards.

    python benchmarks/data_scale.py [--sizes 10000,100000,1000000] [--formats jsonl,arrayrecord] [--samples 4096]
        [--image-size 336] [--pool 256] [--threads 2] [--batch-size 32] [--dir DIR] [--keep]

For each size it writes a dataset of that many one-image records: a JSONL file whose records reference a pool of
`--pool` distinct photo-like JPEGs (`--image-size` px, quality 75, ~5-7 KB each at 336 px, so 1M ArrayRecord
records take ~6.5 GB of disk), and ArrayRecord shards of the same records with the JPEG bytes inline
(arrayrecord_format.encode_record, to_arrayrecord.WRITER_OPTIONS, as the converter writes them). Each (format,
size) then runs in a fresh process: the real pipeline (`make_train_iterator`, default CLIP-336 config, vicuna_v1
template, byte tokenizer) for a fixed `--samples` samples. Prints one JSON object: per format and size the peak RSS
(VmHWM), the RSS after imports, the start-up seconds (index / open + first batch) and samples/s after the first batch.
Goal: ArrayRecord's peak RSS flat in the dataset size; its samples/s >= JSONL's. `--formats json,...` adds a JSON
list file (parsed whole into Python objects: memory grows with the dataset) as a baseline. The datasets are read
right after they are written, so from the page cache: the rates are the CPU cost of the pipeline, not disk speed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

QUESTION = "<image>\nDescribe the image in detail, including colours and layout."
ANSWER = "The picture shows smooth colour gradients with fine noise. " * 3


def pool_jpegs(count: int, size: int) -> list[bytes]:
    """`count` distinct photo-like JPEGs (smooth gradients + mild noise), quality 75."""
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(count):
        base = np.stack([np.sin(3 * x + i), np.cos(2 * y - i), x * y], -1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=75)
        images.append(buffer.getvalue())
    return images


def record(i: int, pool: int) -> dict:
    return {"id": str(i), "image": f"pool/{i % pool:04d}.jpg",
            "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": f"{i}: {ANSWER}"}]}


def _write_pool(directory: str, images: list[bytes]) -> None:
    os.makedirs(os.path.join(directory, "pool"), exist_ok=True)
    for k, data in enumerate(images):
        with open(os.path.join(directory, "pool", f"{k:04d}.jpg"), "wb") as f:
            f.write(data)


def write_jsonl(directory: str, size: int, images: list[bytes]) -> str:
    """directory/data.jsonl over directory/pool/*.jpg."""
    _write_pool(directory, images)
    path = os.path.join(directory, "data.jsonl")
    with open(path, "w") as f:
        for i in range(size):
            f.write(json.dumps(record(i, len(images))) + "\n")
    return path


def write_json_list(directory: str, size: int, images: list[bytes]) -> str:
    """directory/data.json (one JSON list, parsed whole by LlavaJsonSource: the baseline) over directory/pool/."""
    _write_pool(directory, images)
    path = os.path.join(directory, "data.json")
    with open(path, "w") as f:
        f.write("[" + ",\n".join(json.dumps(record(i, len(images))) for i in range(size)) + "]")
    return path


def write_arrayrecord(directory: str, size: int, images: list[bytes], records_per_shard: int = 131072) -> str:
    """directory/arrayrecord/: the same records with their JPEG bytes inline, in shards of `records_per_shard` (as
    `to_arrayrecord.convert` writes them, without reading the pool files a million times); returns a glob of them."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from llava_jax.data.arrayrecord_format import encode_record
    from llava_jax.data.to_arrayrecord import WRITER_OPTIONS, shard_name
    out = os.path.join(directory, "arrayrecord")
    os.makedirs(out, exist_ok=True)
    shards = max(1, -(-size // records_per_shard))
    for shard in range(shards):
        writer = ArrayRecordWriter(os.path.join(out, shard_name(shard, shards)), WRITER_OPTIONS)
        for i in range(shard * records_per_shard, min(size, (shard + 1) * records_per_shard)):
            writer.write(encode_record(record(i, len(images)), [images[i % len(images)]],
                                       source=f"data.jsonl:{i + 1}"))
        writer.close()
    return os.path.join(out, "*.array_record")      # a glob of the shards (the converter's index.json is not written)


WRITERS = {"json": write_json_list, "jsonl": write_jsonl, "arrayrecord": write_arrayrecord}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(fmt: str, path: str, args) -> dict:
    """One measurement in this (fresh) process: the real pipeline over `path` for args.samples samples."""
    from llava_jax.config import load_config
    from llava_jax.data.pipeline import make_train_iterator
    rss_base = _status_mb("VmRSS")
    source = (["data.source=arrayrecord", f"data.arrayrecord_path={path}"] if fmt == "arrayrecord"
              else ["data.source=llava_json", f"data.json_path={path}"])
    config = load_config(None, source + [
        "data.template=vicuna_v1", "data.max_length=1024", f"data.num_threads={args.threads}",
        f"train.batch_size={args.batch_size}", f"model.vision.image_size={args.image_size}"])
    start = time.perf_counter()
    iterator = make_train_iterator(config)
    batch = next(iterator)
    startup = time.perf_counter() - start
    assert batch["pixel_values"].shape == (args.batch_size, 1, args.image_size, args.image_size, 3)
    batches = max(1, args.samples // args.batch_size)
    bad = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        bad += int(batch["bad_samples"].sum())
    seconds = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return {"rss_peak_mb": round(_status_mb("VmHWM"), 1), "rss_after_imports_mb": round(rss_base, 1),
            "startup_s": round(startup, 2), "samples_per_s": round(batches * args.batch_size / seconds, 1),
            "samples": batches * args.batch_size, "bad_samples": bad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated record counts")
    parser.add_argument("--formats", default="jsonl,arrayrecord", help="of json (a JSON list), jsonl, arrayrecord")
    parser.add_argument("--samples", type=int, default=4096, help="samples read per measurement (after batch 1)")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--pool", type=int, default=256, help="distinct JPEGs the records cycle through")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dir", default=None, help="where the datasets are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the datasets")
    parser.add_argument("--child", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    root = tempfile.mkdtemp(prefix="data_scale_", dir=args.dir)
    images = pool_jpegs(args.pool, args.image_size)
    results = {fmt: {} for fmt in formats}
    try:
        for size in sizes:
            directory = os.path.join(root, str(size))
            os.makedirs(directory)
            paths, write_s = {}, {}
            for fmt in formats:
                start = time.perf_counter()
                paths[fmt] = WRITERS[fmt](directory, size, images)
                write_s[fmt] = time.perf_counter() - start
            for fmt in formats:
                command = [sys.executable, os.path.abspath(__file__), "--child", fmt, paths[fmt],
                           f"--samples={args.samples}", f"--image-size={args.image_size}",
                           f"--threads={args.threads}", f"--batch-size={args.batch_size}"]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                result["write_s"] = round(write_s[fmt], 1)
                result["disk_mb"] = round(_disk_bytes(paths[fmt], fmt) / 2**20, 1)
                results[fmt][str(size)] = result
            if not args.keep:
                shutil.rmtree(directory)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"results": results, "image_size": args.image_size, "pool": args.pool,
                      "mean_jpeg_kb": round(float(np.mean([len(i) for i in images])) / 1024, 1),
                      "threads": args.threads, "batch_size": args.batch_size, "cpus": os.cpu_count()}))


def _disk_bytes(path: str, fmt: str) -> int:
    if fmt != "arrayrecord":
        pool = os.path.join(os.path.dirname(path), "pool")
        return os.path.getsize(path) + sum(os.path.getsize(os.path.join(pool, p)) for p in os.listdir(pool))
    directory = os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(directory, p)) for p in os.listdir(directory))


if __name__ == "__main__":
    main()
