"""Meshes and the logical-axis rule table: the one place that decides how arrays are sharded.

Model code names the axes of every array (`models.llama.param_axes`); a rule table maps each
logical name to mesh axes. A dimension that a mesh axis does not divide is left replicated, so one
table serves every model size and mesh shape.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tried in order; each mesh axis used at most once per array)
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("head_dim", ()),
    ("norm", ()),
    ("cache_seq", ()),
    ("seq", ()),
)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    """A mesh with axes `MESH_AXES`; one size may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)[0]!r}; axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into {dict(shape)}")
        sizes[sizes.index(-1)] = len(devices) // rest
    if any(s < 1 for s in sizes) or int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, but there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of an array with logical `axes` and `shape` on `mesh`."""
    table = dict(rules)
    used: set = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"sharding rules have no entry for logical axis {name!r}")
        chosen = []
        size = 1
        for mesh_axis in table.get(name, ()) if name else ():
            n = mesh.shape[mesh_axis]
            if mesh_axis in used or n == 1 or dim % (size * n):
                continue
            chosen.append(mesh_axis)
            size *= n
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """NamedShardings for a tree of logical axes (tuples) and a matching tree of shapes."""
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda axes, shape: NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)),
        axes_tree, shapes_tree, is_leaf=is_leaf)


def constrain_activations(mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """fn(x, logical axes) -> x constrained to the sharding the rules give those axes on `mesh`: the
    function `models.llama.activation_layout` takes. Without it, XLA may lay out activations after
    the weights (an FSDP mesh splits both the batch and the embedding over "fsdp") and compute every
    row on every device."""

    def constrain(x, axes):
        spec = logical_to_spec(axes, x.shape, mesh, rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain

