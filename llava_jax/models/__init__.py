"""Model definitions: vision tower, projector, decoder and the LlavaModel that wires them."""
from llava_jax.models.llava import LlavaModel, init_params

__all__ = ["LlavaModel", "init_params"]
