"""Train state and its sharded initialisation.

Public surface: `TrainState`, `TrainSetup` (model, optimizer, frozen groups, mesh, abstract state and its
shardings) built by `make_train_setup(config, mesh)`, and `TrainSetup.init_state(seed)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax.config import Config
from llava_jax.model_params import abstract_params
from llava_jax.models.llava import LlavaModel, dummy_inputs, params_of
from llava_jax.sharding import LOGICAL_RULES, shardings_like_params
from llava_jax.train.optimizer import frozen_groups, make_optimizer, merge_params, split_params


@struct.dataclass
class TrainState:
    step: jax.Array           # int32 scalar: train steps taken (including skipped non-finite ones)
    bad_steps: jax.Array      # int32 scalar: steps skipped because loss/grads were not finite
    params: Any               # all groups, float32
    opt_state: Any            # over the trainable groups only
    rng: jax.Array            # uint32 [2]

    @property
    def optimizer_steps(self) -> jax.Array:
        return self.step - self.bad_steps


@dataclasses.dataclass
class TrainSetup:
    config: Config
    mesh: Mesh
    model: LlavaModel
    tx: optax.GradientTransformation
    frozen: tuple[str, ...]
    abstract_state: Any        # TrainState of ShapeDtypeStructs carrying the shardings
    state_shardings: Any

    def init_state(self, seed: int) -> TrainState:
        """Freshly initialised state, created directly in its shards (no host copy of the full model)."""
        init = jax.jit(_init_fn(self.model, self.tx, self.frozen, self.config.train.frozen_dtype),
                       out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return init(jax.random.PRNGKey(seed))


def _init_fn(model: LlavaModel, tx: optax.GradientTransformation, frozen: tuple[str, ...], frozen_dtype: str):
    def init(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = nn.meta.unbox(params_of(model.init(params_rng, *dummy_inputs(model.config))))
        trainable, frozen_params = split_params(params, frozen)
        params = merge_params(trainable, jax.tree_util.tree_map(lambda p: p.astype(frozen_dtype), frozen_params))
        return TrainState(step=jnp.zeros((), jnp.int32), bad_steps=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(trainable), rng=state_rng)
    return init


def make_train_setup(config: Config, mesh: Mesh) -> TrainSetup:
    frozen = frozen_groups(config.train)
    model = LlavaModel(config.model, freeze_vision="vision_tower" in frozen)
    params, param_shardings = abstract_params(model, mesh)
    frozen = tuple(group for group in frozen if group in params)     # e.g. image_newline only with anyres
    trainable = split_params(params, frozen)[0]
    tx = make_optimizer(config.train, trainable)
    opt_state = jax.eval_shape(tx.init, trainable)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(step=replicated, bad_steps=replicated, params=param_shardings,
                           opt_state=shardings_like_params(opt_state, params, param_shardings, mesh),
                           rng=replicated)
    abstract = jax.eval_shape(_init_fn(model, tx, frozen, config.train.frozen_dtype), jax.random.PRNGKey(0))
    abstract = jax.tree_util.tree_map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                      abstract, shardings)
    return TrainSetup(config, mesh, model, tx, frozen, abstract, shardings)
