"""Device mesh and partitioning: one table of logical-axis rules, tree shardings, host-local -> global batches.

Public surface: `MESH_AXES`, `LOGICAL_RULES`, `resolve_mesh_shape`, `make_mesh`, `tree_shardings`,
`shardings_like_params`, `batch_sharding`, `host_batch_to_global`, `sharding_report`, `format_sharding_report`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llava_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. fsdp shards parameters (and so optimizer state) along their embed dimension;
# tensor shards heads / MLP hidden / vocab Megatron-style; the batch goes over data x fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    # model.fsdp_row_kernels=input: the row-parallel kernels (o_proj, down_proj, fc2) shard their input dim over
    # tensor x fsdp and keep embed whole (models/layers.ROW_KERNEL_AXES)
    ("mlp_in", ("tensor", "fsdp")),
    ("heads_in", ("tensor", "fsdp")),
    ("embed_out", None),
    ("lora_rank", "fsdp"),        # a LoRA B [rank, out]: over fsdp where its output dim is not (q/k/v/gate/up)
    ("layers", None),
    ("norm", None),
    ("patch", None),
)


def resolve_mesh_shape(mesh_config: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 entry replaced by the remaining devices; the product must match."""
    sizes = {name: getattr(mesh_config, name) for name in MESH_AXES}
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    for name, size in sizes.items():
        if size == -1:
            if device_count % fixed:
                raise ConfigError(f"mesh.{name}=-1: {device_count} devices are not divisible by the other mesh "
                                 f"axes' product {fixed} ({_describe(sizes)})")
            sizes[name] = device_count // fixed
    if int(np.prod(list(sizes.values()))) != device_count:
        raise ConfigError(f"mesh: {_describe(sizes)} has {int(np.prod(list(sizes.values())))} devices but "
                         f"{device_count} are available; set mesh.data/mesh.fsdp/mesh.tensor so their product is "
                         f"{device_count} (one of them may be -1)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _describe(sizes: dict) -> str:
    return ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())


def make_mesh(mesh_config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def _mesh_spec(logical: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Logical spec -> mesh spec; a dimension its mesh axes do not divide is replicated instead of failing."""
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical), LOGICAL_RULES)
    return P(*[axes if dim % _axis_size(mesh, axes) == 0 else None
               for axes, dim in zip(tuple(mesh_axes) + (None,) * (len(shape) - len(mesh_axes)), shape)])


def tree_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for an nn.Partitioned-boxed abstract tree (e.g. params); unboxed leaves are replicated."""
    def leaf_sharding(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, _mesh_spec(P(*leaf.names), leaf.value.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map(leaf_sharding, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _dict_path(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def shardings_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror params (e.g. Adam moments): a leaf whose dict-key path ends with
    a parameter's path and has its shape gets that parameter's sharding; anything else (counts) is replicated."""
    by_path = {_dict_path(path): (leaf.shape, sharding) for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings))}

    def leaf_sharding(path, leaf):
        keys = _dict_path(path)
        for start in range(len(keys)):
            shape, sharding = by_path.get(keys[start:], (None, None))
            if shape == leaf.shape:
                return sharding
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch (this host's rows) -> global jax.Arrays sharded over the batch axes.

    Keys starting with "_" are host-only metadata and are dropped.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items() if not k.startswith("_")}


def sharding_report(abstract: Any, shardings: Any) -> dict[str, float]:
    """Parameter bytes per device: total (unsharded), sharded part, replicated part, and per-device."""
    total = sharded = replicated = per_device = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        local = int(np.prod(sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        total += nbytes
        per_device += local
        if local < nbytes:
            sharded += nbytes
        else:
            replicated += nbytes
    return {"param_bytes": total, "sharded_bytes": sharded, "replicated_bytes": replicated,
            "per_device_bytes": per_device}


def format_sharding_report(mesh: Mesh, report: dict[str, float]) -> str:
    mib = 1 / 2 ** 20
    return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices | "
            f"params {report['param_bytes'] * mib:.1f} MiB: {report['sharded_bytes'] * mib:.1f} MiB sharded, "
            f"{report['replicated_bytes'] * mib:.1f} MiB replicated, "
            f"{report['per_device_bytes'] * mib:.1f} MiB per device")
