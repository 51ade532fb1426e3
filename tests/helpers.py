"""Shared test helpers: the tiny model overrides and random but valid host batches (no data pipeline)."""
import numpy as np

from llava_jax.data.bad_samples import REASONS

TINY_MODEL = [
    "model.vision.image_size=28", "model.vision.patch_size=7", "model.vision.hidden_size=32",
    "model.vision.num_layers=3", "model.vision.num_heads=4", "model.vision.mlp_dim=64",
    "model.decoder.vocab_size=300", "model.decoder.hidden_size=48", "model.decoder.num_layers=2",
    "model.decoder.num_heads=4", "model.decoder.num_kv_heads=2", "model.decoder.mlp_dim=96",
    "model.image_token_id=299", "data.max_length=64",
]


def random_batch(config, seed: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """One image per row placed after a 2-token prefix; ~70 % of the text after the image supervised; raw uint8
    pixels, as the data pipeline delivers them (the train step normalises)."""
    rng = np.random.RandomState(seed)
    b = batch_size or config.train.batch_size
    t, n, v = config.data.max_length, config.model.tokens_per_image, config.model.vision
    input_ids = rng.randint(0, 256, (b, t)).astype(np.int32)
    input_ids[:, 2:2 + n] = config.model.image_token_id
    loss_mask = (rng.rand(b, t) > 0.3).astype(np.float32)
    loss_mask[:, :2 + n] = 0
    return {
        "input_ids": input_ids, "loss_mask": loss_mask,
        "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "pixel_values": rng.randint(0, 256, (b, 1, v.image_size, v.image_size, v.num_channels)).astype(np.uint8),
        "image_mask": np.ones((b, 1), np.int32), "num_samples": np.ones(b, np.int32),
        "bad_samples": np.zeros((b, len(REASONS)), np.int32),
    }
