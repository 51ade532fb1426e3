"""Packing through the model: each segment of a packed row gets the logits it gets when run alone."""
import jax
import numpy as np

from llava_jax.data.images import ImageProcessor
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.models.llava import LlavaModel, init_params


def test_packed_row_segments_match_each_sample_run_alone(tiny_config):
    config = tiny_config("data.synthetic_size=8", "train.batch_size=1", "data.pack=true", "data.max_length=128",
                         "data.max_images=2")
    batch = next(make_train_iterator(config))
    pixel_values = ImageProcessor(config).normalize(batch["pixel_values"], batch["image_mask"])   # uint8 -> f32
    model = LlavaModel(config.model)
    params = init_params(config.model, jax.random.PRNGKey(0))
    apply = jax.jit(lambda *args, **kwargs: model.apply({"params": params}, *args, **kwargs))
    packed = apply(batch["input_ids"], pixel_values, image_mask=batch["image_mask"],
                   segment_ids=batch["segment_ids"], positions=batch["positions"])
    segments = batch["segment_ids"][0]
    assert segments.max() == 2
    first_image = 0
    for segment in range(1, segments.max() + 1):
        tokens = segments == segment
        ids = batch["input_ids"][0, tokens]
        num_images = int((ids == config.model.image_token_id).sum()) // config.model.tokens_per_image
        pixels = pixel_values[:, first_image:first_image + num_images]
        first_image += num_images
        alone = apply(ids[None], pixels, image_mask=np.ones((1, num_images), np.int32))
        np.testing.assert_allclose(packed[0, tokens], alone[0], atol=2e-5, rtol=1e-5)
