"""JAX's multi-controller runtime: starting it, and the few exchanges between processes that a run needs.

A run on several hosts is one Python process per host, all running the same program (SPMD). Before
the first JAX computation every process calls `initialize()`, which connects it to the others:

- With the environment variables JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, it calls `jax.distributed.initialize` with them. This is how
  GPU clusters and CPU test jobs are started; on CPU the cross-process collectives use gloo.
- On a Cloud TPU VM (libtpu installed and a TPU chip or a TPU_* / MEGASCALE_* environment variable
  present) it calls `jax.distributed.initialize()` without arguments, and JAX reads the pod slice's
  topology from the TPU metadata.
- Otherwise it does nothing: the run has one process.

`allgather` exchanges small host arrays (lengths, counts, episode statistics) between processes, and
`process_local_copy` gives each process its own copy of globally sharded arrays, laid out over its
own devices, for the work every process does on its own (sampling rollouts, writing files).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

__all__ = ["DistributedError", "ENV_VARS", "allgather", "any_process", "initialize", "local_mesh", "plan",
           "process_local_copy", "shard_sum", "share"]

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Set on Cloud TPU VMs of a pod slice (GCE or GKE), or on multislice jobs.
TPU_ENV_VARS = ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE",
                "MEGASCALE_COORDINATOR_ADDRESS")

_started: Optional[dict] = None   # what `initialize` started in this process
_gathers: dict = {}   # process_local_copy's jitted copies, by target layout


class DistributedError(ValueError):
    """The multi-process settings are incomplete or malformed, or the runtime did not start."""


def _int(name: str, value: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _explicit(values: Mapping[str, Any]) -> Optional[dict]:
    given = {k: values[k] for k in ENV_VARS if values.get(k) not in (None, "")}
    if not given:
        return None
    missing = [k for k in ENV_VARS if k not in given]
    if missing:
        raise DistributedError(f"{', '.join(sorted(given))} set but {', '.join(missing)} not: a "
                               f"multi-process run needs all of {', '.join(ENV_VARS)}")
    address = str(given["JAX_COORDINATOR_ADDRESS"]).strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port with a port "
                               "in 1..65535")
    num = _int("JAX_NUM_PROCESSES", given["JAX_NUM_PROCESSES"])
    pid = _int("JAX_PROCESS_ID", given["JAX_PROCESS_ID"])
    if num < 1:
        raise DistributedError(f"JAX_NUM_PROCESSES={num}: expected at least 1")
    if not 0 <= pid < num:
        raise DistributedError(f"JAX_PROCESS_ID={pid}: expected 0..{num - 1} for JAX_NUM_PROCESSES={num}")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    if any(environ.get(k) for k in TPU_ENV_VARS):
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def plan(config: Optional[Mapping[str, Any]] = None,
         environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """What `initialize` would do: None (one process), {} (TPU auto-detection) or the explicit
    arguments {"coordinator_address", "num_processes", "process_id"}.

    config: optional values under the environment variables' names (e.g. {"JAX_PROCESS_ID": 1});
    each one given replaces the environment's. Raises DistributedError on incomplete or bad values.
    """
    environ = os.environ if environ is None else environ
    values = {k: environ.get(k) for k in ENV_VARS}
    for k, v in (config or {}).items():
        if k not in ENV_VARS:
            raise DistributedError(f"unknown distributed setting {k!r}; expected one of "
                                   f"{', '.join(ENV_VARS)}")
        if v not in (None, ""):
            values[k] = v
    explicit = _explicit(values)
    if explicit is not None:
        return explicit
    return {} if _on_cloud_tpu_vm(environ) else None


def initialize(config: Optional[Mapping[str, Any]] = None) -> bool:
    """Connects this process to the others of a multi-process run (see the module docstring).

    Call it before the first JAX computation. Calling it again, or after JAX's runtime was started
    elsewhere, does nothing. Returns True when the multi-controller runtime is running.
    """
    global _started
    if _started is not None or jax.distributed.is_initialized():
        return True
    args = plan(config)
    if args is None:
        return False
    if args:
        # CPU devices of different processes talk through gloo (the default has no cross-process
        # collectives); GPU and TPU backends bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args)
    except Exception as e:  # noqa: BLE001 - reported as one line naming where it tried to connect
        where = args.get("coordinator_address", "the TPU metadata's coordinator")
        text = " ".join(str(e).split())[:300]
        raise DistributedError(f"the multi-process runtime did not start (coordinator {where}): "
                               f"{type(e).__name__}: {text}") from None
    _started = dict(args)
    return True


# ----- exchanges between processes -------------------------------------------------------------------

def allgather(x) -> np.ndarray:
    """Every process's `x` (a small host array of the same shape and dtype everywhere), stacked on a
    new leading axis in process order: [process_count, ...]. All processes must call it."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (so that every process takes the same branch)."""
    return bool(np.any(allgather(np.int32(bool(flag)))))


def shard_sum(values, shard: int) -> np.ndarray:
    """The sum over data shards of each process's `values` (a small 1-D array). Processes that feed
    the same shard (see `playpen_jax.buffers.row_shard`) hold the same data and count once."""
    values = np.asarray(values, np.float64).reshape(-1)
    rows = allgather(np.concatenate([[float(shard)], values]))
    first = {}
    for row in rows:
        first.setdefault(int(row[0]), row[1:])
    return np.sum([first[k] for k in sorted(first)], axis=0)


def share(n: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi): block `index` of `count` contiguous blocks of range(n), their sizes differing by at
    most one (the first blocks are the smaller)."""
    if not 0 <= index < count:
        raise DistributedError(f"share: block {index} of {count} does not exist")
    return index * n // count, (index + 1) * n // count


def local_mesh(mesh: Mesh) -> Mesh:
    """A mesh of this process's devices alone, with `mesh`'s axes: its tensor size where that divides
    the local device count (else 1), fsdp over the rest, data 1. Used for the work each process does
    on its own: every process lays its devices out the same way (by device id)."""
    from playpen_jax import sharding as shd

    local = sorted(jax.local_devices(), key=lambda d: d.id)
    tensor = int(mesh.shape.get("tensor", 1))
    if len(local) % tensor:
        tensor = 1
    return shd.make_mesh({"data": 1, "fsdp": len(local) // tensor, "tensor": tensor}, local)


def _replica_mesh(own: Mesh) -> Mesh:
    """A global mesh ("process", *own's axes) whose row p lays process p's devices out the way the
    mesh `own` lays out this process's (the same positions of the same-ordered local devices)."""
    local = sorted(jax.local_devices(), key=lambda d: d.id)
    position = {d: i for i, d in enumerate(local)}
    try:
        order = np.vectorize(lambda d: position[d], otypes=[int])(own.devices)
    except KeyError:
        raise DistributedError("process_local_copy: the local mesh holds another process's devices") from None
    rows = []
    for p in range(jax.process_count()):
        theirs = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        if len(theirs) != len(local):
            raise DistributedError(f"process {p} has {len(theirs)} devices, this process {len(local)}: "
                                   "every process needs the same number of local devices")
        rows.append(np.asarray(theirs, dtype=object)[order])
    return Mesh(np.stack(rows), ("process",) + tuple(own.axis_names))


def process_local_copy(tree, local_shardings):
    """A copy of the (globally sharded) arrays in `tree` held by this process alone, each leaf laid
    out by the matching NamedSharding of `local_shardings` (over a mesh of this process's devices).

    All processes must call it together: it is one collective that gathers each leaf onto every
    process. With one process the leaves are only resharded when their layout differs.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shardings = treedef.flatten_up_to(local_shardings)
    if jax.process_count() == 1:
        return jax.tree_util.tree_unflatten(treedef, [
            x if x.sharding == s else jax.device_put(x, s) for x, s in zip(leaves, shardings)])
    meshes = {s.mesh for s in shardings}
    if len(meshes) != 1:
        raise DistributedError("process_local_copy: the local shardings use more than one mesh")
    global_mesh = _replica_mesh(meshes.pop())
    wide = tuple(NamedSharding(global_mesh, s.spec) for s in shardings)  # no "process" axis: everywhere
    gather = _gathers.get(wide)
    if gather is None:   # one jitted copy per layout, so that each step reuses its executable
        gather = _gathers[wide] = jax.jit(lambda xs: xs, out_shardings=list(wide))
    gathered = gather(leaves)
    out = []
    for x, s in zip(gathered, shardings):
        parts = [shard.data for shard in x.addressable_shards]
        out.append(jax.make_array_from_single_device_arrays(x.shape, s, parts))
    return jax.tree_util.tree_unflatten(treedef, out)
