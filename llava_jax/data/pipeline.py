"""The Grain input pipeline: sources -> shuffled epochs -> per-process shard -> encoded samples -> rows -> batches.

Public surface: `make_train_iterator(config, process_index=0, process_count=1)` -> checkpointable Grain
DatasetIterator of per-process batches (see `sequences` for the row layout), and `make_eval_examples(config,
limit=None)` -> list of evaluation examples (see `ExampleEncoder.eval_example`).
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Optional

import grain
import numpy as np

from llava_jax.data.bad_samples import BadSample, bad_sample_error, load_with_replacement
from llava_jax.data.examples import ExampleEncoder
from llava_jax.data.sequences import pack_rows, pad_row
from llava_jax.data.sources import eval_sources, train_sources
from llava_jax.data.tokenizers import make_tokenizer
from llava_jax.runtime import packs


class SampleLoader:
    """Grain map: source index -> encoded sample; bad records are replaced (bad_samples.load_with_replacement)."""

    def __init__(self, source, encoder: ExampleEncoder, policy: str):
        self.source, self.encoder, self.policy = source, encoder, policy

    def _load(self, index: int) -> dict[str, Any]:
        return self.encoder.sample(self.source[index])

    def __call__(self, index: int) -> dict[str, Any]:
        return load_with_replacement(self._load, int(index), len(self.source), self.source.describe, self.policy)


class RowPadder:
    """Grain map: sample -> one right-padded row."""

    def __init__(self, max_length: int, max_images: int, pad_id: int):
        self.max_length, self.max_images, self.pad_id = max_length, max_images, pad_id

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return pad_row(sample, self.max_length, self.max_images, self.pad_id)


def per_process_batch_size(config, process_count: int) -> int:
    batch_size = config.train.batch_size
    if batch_size % process_count:
        raise ValueError(f"train.batch_size: {batch_size} is not divisible by the {process_count} processes")
    return batch_size // process_count


class EpochShuffle:
    """Grain map: position in an endless stream -> source index, a fresh permutation of the source every epoch
    (numpy permutation seeded by (seed, stream, epoch), cached; Grain's per-index Feistel shuffle costs ~0.2 ms
    per index, as much as decoding a small JPEG)."""

    def __init__(self, size: int, seed: int, stream: int):
        self.size, self.seed, self.stream = size, seed, stream
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"size": self.size, "seed": self.seed, "stream": self.stream}

    def __setstate__(self, state):
        self.__init__(**state)

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._permutations:
                self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
                rng = np.random.default_rng([self.seed, self.stream, epoch])
                self._permutations[epoch] = rng.permutation(self.size)
            return self._permutations[epoch]

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.size)
        return int(self.permutation(epoch)[offset])


def _sample_dataset(config, encoder: ExampleEncoder) -> grain.MapDataset:
    """Infinite dataset of encoded samples: each source reshuffled every epoch, weighted sources mixed."""
    components, weights = [], []
    for k, (source, weight) in enumerate(train_sources(config)):
        indices = grain.MapDataset.range(sys.maxsize).map(EpochShuffle(len(source), config.train.seed, k))
        components.append(indices.map(SampleLoader(source, encoder, config.data.bad_sample_policy)))
        weights.append(weight)
    return components[0] if len(components) == 1 else grain.MapDataset.mix(components, weights)


def make_train_iterator(config, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Batches of batch_size // process_count rows for this process: input_ids int32, loss_mask float32,
    segment_ids int32, positions int32 [b, T]; pixel_values uint8 [b, I, S, S, 3] (raw RGB, 0 in slots without
    an image; the train step normalises them on device with `images.normalize_pixels`, which keeps the host
    cheap and sends 4x fewer bytes); image_mask int32 [b, I] (1 = the slot holds an image); num_samples int32 [b]
    and bad_samples int32 [b, len(REASONS)]; host-only "_ids" and "_bad" (JSON text). Rows are packed when
    `runtime.packs(config)` (data.pack, or auto). With model.anyres.enabled: pixel_values uint8 [b, I, C, S, S, 3]
    (C = model.crops_per_image) and image_feature_ids int32 [b, T] (see `sequences`). Each process reads a
    disjoint share (every process_count-th sample of the global stream). Same config and seed => same batches;
    get_state()/set_state() (and grain.checkpoint) resume exactly."""
    data = config.data
    batch_size = per_process_batch_size(config, process_count)
    tokenizer = make_tokenizer(data, config.model)
    encoder = ExampleEncoder(config, tokenizer)
    samples = _sample_dataset(config, encoder)[process_index::process_count]
    pack = packs(config)
    if not pack:
        samples = samples.map(RowPadder(data.max_length, data.max_images, tokenizer.pad_id))
    read_options = grain.ReadOptions(num_threads=data.num_threads,
                                     prefetch_buffer_size=max(data.num_threads, data.prefetch * batch_size))
    rows = samples.to_iter_dataset(read_options)
    if pack:
        model = config.model
        image_rows = model.crops_per_image * model.tokens_per_image if model.anyres.enabled else 0
        rows = pack_rows(rows, data.max_length, data.max_images, tokenizer.pad_id, batch_size, image_rows)
    batches = rows.batch(batch_size, drop_remainder=True)
    if data.num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                                   per_worker_buffer_size=max(1, data.prefetch)))
    elif data.prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data.prefetch)
    return iter(batches)


def make_eval_examples(config, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Evaluation examples in source order (data.eval_json_path, else the eval split of the synthetic / TFDS
    sources): id, prompt_ids, pixel_values, image_mask, answers (anyres: + image_feature_ids). Bad ones are skipped
    (policy skip) or raise."""
    encoder = ExampleEncoder(config, make_tokenizer(config.data, config.model))
    examples = []
    for source in eval_sources(config):
        for index in range(len(source)):
            if limit is not None and len(examples) >= limit:
                return examples
            try:
                examples.append(encoder.eval_example(source[index]))
            except BadSample as bad:
                if config.data.bad_sample_policy == "error":
                    raise bad_sample_error(bad, source.describe(index)) from None
                logging.warning("skipping evaluation example %s: %s", source.describe(index), bad)
    return examples
