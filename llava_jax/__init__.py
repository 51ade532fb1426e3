"""llava-jax: LLaVA-style vision-language models in JAX/Flax (one jitted, sharded train step)."""
__version__ = "0.1.0"
