"""A model's params: their shapes and shardings derived from the model alone, and reading them from wherever they
are kept (a converted model directory, a run workdir, its checkpoints directory or one checkpoint step).

Public surface: `abstract_params(model, mesh) -> (abstract params with shardings, shardings)`,
`params_source(path) -> ParamsSource`, `restore_params(source, target, partial)` and `load_model(path,
overrides=(), mesh=None) -> (Config, params)`: THE loader for generation, evaluation, export and notebooks (no
optimizer state is built; params are sharded fsdp over all devices unless a mesh is given). `train.init_from`
reads through the same `params_source` / `restore_params` (llava_jax.checkpoint).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
import yaml
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh

from llava_jax.config import Config, ConfigError, MeshConfig, apply_overrides, config_from_dict
from llava_jax.models.llava import LlavaModel, dummy_inputs, params_of
from llava_jax.sharding import LOGICAL_RULES, make_mesh, tree_shardings

CHECKPOINT_DIR = "checkpoints"
STATE, CONFIG = "state", "config"                              # items of a training checkpoint step
CONVERTED_CONFIG, CONVERTED_PARAMS = "config.yaml", "params"   # `python -m llava_jax.convert` output


def abstract_params(model: LlavaModel, mesh: Mesh) -> tuple[Any, Any]:
    """(params as jax.ShapeDtypeStructs carrying their NamedShardings, the shardings) from the model's logical
    axes and the LOGICAL_RULES table; nothing is allocated."""
    with nn.logical_axis_rules(LOGICAL_RULES):
        boxed = jax.eval_shape(lambda rng: params_of(model.init(rng, *dummy_inputs(model.config))),
                               jax.random.PRNGKey(0))
    shardings = tree_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


@dataclasses.dataclass
class ParamsSource:
    item_dir: epath.Path          # the saved pytree (Orbax) holding the params
    prefix: tuple[str, ...]       # key path of the params inside it
    config: dict                  # the source's run config, as a dict

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """"group/module/.../leaf" -> shape of every saved param."""
        tree = ocp.PyTreeCheckpointer().metadata(self.item_dir).item_metadata.tree
        for key in self.prefix:
            tree = tree[key]
        return {path: tuple(meta.shape) for path, meta in traverse_util.flatten_dict(tree, sep="/").items()}


def _newest_step_dir(directory: epath.Path, path: str) -> epath.Path:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / STATE).is_dir())
    if not steps:
        raise FileNotFoundError(f"{path}: {directory} holds no complete checkpoint")
    return directory / str(steps[-1])


def params_source(path: str) -> ParamsSource:
    """Where the params of `path` are: a converted model directory (config.yaml + params/), a run directory (its
    newest checkpoint), a checkpoints directory (newest step) or one step directory (checkpoints/<step>)."""
    root = epath.Path(path).absolute()
    if (root / CONVERTED_PARAMS).is_dir():
        return ParamsSource(root / CONVERTED_PARAMS, (), yaml.safe_load((root / CONVERTED_CONFIG).read_text()))
    if (root / CHECKPOINT_DIR).is_dir():
        root = _newest_step_dir(root / CHECKPOINT_DIR, path)
    elif root.is_dir() and not (root / STATE).is_dir():
        root = _newest_step_dir(root, path)
    if not (root / STATE).is_dir():
        raise FileNotFoundError(f"{path} is not a converted model (config.yaml + params/), a run directory (with "
                                "checkpoints/) or a checkpoint directory (checkpoints/<step>)")
    saved_config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(root / CONFIG)
    return ParamsSource(root / STATE, ("params",), saved_config)


def restore_params(source: ParamsSource, target: dict, partial: bool = False) -> dict:
    """The params `target` (a tree of jax.ShapeDtypeStructs with shardings) names, read from `source` straight
    into those shardings (a training checkpoint's optimizer state is never read). `partial`: `target` may hold
    only some of the saved params."""
    for key in reversed(source.prefix):
        target = {key: target}
    restored = ocp.PyTreeCheckpointer().restore(source.item_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial or bool(source.prefix)))
    for key in source.prefix:
        restored = restored[key]
    return restored


def load_model(path: str, overrides: Sequence[str] = (), mesh: Optional[Mesh] = None) -> tuple[Config, Any]:
    """(config, params) for inference from `path` (see `params_source`): the source's saved config with
    `overrides` ("key=value") applied, and exactly the params that config's model has, sharded over `mesh`
    (default: fsdp over all devices). Raises ValueError unless the saved params are exactly the model's (a tied
    model over a saved lm_head, say)."""
    source = params_source(path)
    try:
        config = config_from_dict(apply_overrides(copy.deepcopy(source.config), overrides))
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    target, _ = abstract_params(LlavaModel(config.model), mesh)
    wanted = {name: tuple(leaf.shape) for name, leaf in traverse_util.flatten_dict(target, sep="/").items()}
    saved = source.shapes()
    differing = [f"{name}: saved {saved.get(name, 'nothing')}, the model needs {wanted.get(name, 'nothing')}"
                 for name in sorted(set(wanted) | set(saved)) if saved.get(name) != wanted.get(name)]
    if differing:
        raise ValueError(f"{source.item_dir} does not hold exactly this model's params ({len(differing)} differ, "
                         f"e.g. {'; '.join(differing[:3])}); do the config overrides change the model?")
    return config, restore_params(source, target)
