"""The memory floor of a train step: what one device must hold however well XLA schedules the step.

Public surface: `memory_floor(setup) -> {"bytes": int, "parts": {name: bytes}}` and
`activation_bytes(config, replicas, vision_trains) -> {"decoder_activations": int, "vision_activations": int}`.

    floor = params + gradients + optimizer_state + decoder_activations + vision_activations    (bytes, one device)

    params               the local shard of every parameter, frozen ones included (abstract state x shardings)
    gradients            the local shard of every TRAINABLE parameter in its own dtype (float32): the one gradient
                         the optimizer needs
    optimizer_state      the local shard of the optimizer state (Adam mu and nu in train.optimizer_state_dtype, the
                         step count)
    decoder_activations  what full remat (model.remat=full) keeps from the forward pass for the backward: the input
                         of each layer (the scan carry, i.e. the residual stream) for this device's micro-batch in the
                         compute dtype: L_dec x rows x T x E_dec x bytes(model.dtype). Gradients always flow back
                         through the decoder (every stage trains the projector or the language model).
    vision_activations   likewise L_vis x rows x I x C x N x E_vis x bytes(model.dtype) (C = model.crops_per_image:
                         1, or anyres's crop slots), only when the vision tower
                         trains: a frozen tower runs forward only (stop_gradient on its output) and keeps nothing.

rows = rows of one accumulation micro-batch per data-parallel replica (train.batch_size / grad_accum_steps /
(mesh.data x mesh.fsdp); tensor-parallel devices each hold their replica's whole residual stream), T =
data.max_length, I = data.max_images, N = patches (+ the class token), L_vis = the encoder layers that run.
Everything else a step allocates (the layer being recomputed, gathered weights, attention scores, logits chunks,
a second gradient buffer) is overhead above this floor.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from llava_jax.config import Config
from llava_jax.sharding import sharding_report
from llava_jax.train.optimizer import split_params


def _local_bytes(tree: Any, shardings: Any) -> int:
    return int(sharding_report(tree, shardings)["per_device_bytes"])


def activation_bytes(config: Config, replicas: int, vision_trains: bool) -> dict[str, int]:
    """Layer inputs full remat keeps for one micro-batch on one device (see the module doc)."""
    m, t = config.model, config.train
    rows = t.batch_size // t.grad_accum_steps // replicas
    itemsize = jnp.dtype(m.dtype).itemsize
    decoder = m.decoder.num_layers * rows * config.data.max_length * m.decoder.hidden_size * itemsize
    tokens = m.vision.num_patches + int(m.vision.has_class_token)
    crops = config.data.max_images * m.crops_per_image
    vision = m.vision_layers_used * rows * crops * tokens * m.vision.hidden_size * itemsize
    return {"decoder_activations": decoder, "vision_activations": vision if vision_trains else 0}


def memory_floor(setup) -> dict:
    """The floor of `setup` (a TrainSetup whose config has its batch layout resolved)."""
    state, shardings, mesh = setup.abstract_state, setup.state_shardings, setup.mesh
    trainable = split_params(state.params, setup.frozen)[0]
    parts = {
        "params": _local_bytes(state.params, shardings.params),
        "gradients": _local_bytes(trainable, split_params(shardings.params, setup.frozen)[0]),
        "optimizer_state": _local_bytes(state.opt_state, shardings.opt_state),
        **activation_bytes(setup.config, mesh.shape["data"] * mesh.shape["fsdp"],
                           vision_trains="vision_tower" not in setup.frozen),
    }
    return {"bytes": sum(parts.values()), "parts": parts}
