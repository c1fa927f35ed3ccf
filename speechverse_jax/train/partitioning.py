"""Meshes and logical-axis rules: how params and batches are laid out over devices.

The model names every weight axis (`embed`, `heads`, `mlp`, ...); `config.mesh.rules` maps those
names to mesh axes `data`, `fsdp`, `tensor`. Rules are tried in order and a mesh axis is used at
most once per array, so `batch -> (data, fsdp)` listed first keeps activations' `embed` replicated
while weights' `embed` is sharded over `fsdp`.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("length", None),
    ("conv_in", None),
    ("conv_kernel", None),
    ("relpos_buckets", None),
    ("lora_rank", None),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> Tuple[int, int, int]:
    """Resolve one `-1` entry to fill the devices; check the product."""
    shape = [int(data), int(fsdp), int(tensor)]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {shape}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if num_devices % rest:
            raise ValueError(f"mesh: {num_devices} devices do not divide into {shape}")
        shape[shape.index(-1)] = num_devices // rest
    if any(s < 1 for s in shape) or int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {shape} must equal the {num_devices} devices")
    return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (so sharding constraints work)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    grid = np.asarray(devices).reshape(shape) if len(devices) == 1 else _device_grid(shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _device_grid(shape, devices):
    try:
        from jax.experimental import mesh_utils

        return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU devices and odd topologies: plain order is fine
        return np.asarray(devices).reshape(shape)


def rules_from_config(rules) -> Tuple[Tuple[str, Any], ...]:
    out = []
    for item in rules:
        name, axes = item
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"mesh.rules: {name!r} maps to unknown mesh axis {a!r} (known: {MESH_AXES})")
        out.append((str(name), axes))
    return tuple(out)


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules) -> Any:
    """NamedSharding per leaf of a boxed (nn.Partitioned) abstract params tree.

    A dimension whose size the assigned mesh axes do not divide stays replicated.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_abstract), rules)
    shapes = nn.unbox(boxed_abstract)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def fit(spec: PartitionSpec, leaf) -> NamedSharding:
        dims = []
        for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            dims.append(axes if size % ways == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*dims))

    return jax.tree_util.tree_map(fit, specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
