"""Checkpoints of a training run, written and read with orbax.

A checkpoint of step N is the directory `<directory>/N/` with three items: `state`, a pytree of arrays
(written with orbax's standard pytree format, one OCDBT store shared by all processes); `meta`, a JSON
document (the run config, data cursors, ...); and `checksums`, two 32-bit sums of the bits of every
array leaf. Orbax detects damage to its index (truncated or missing files, bad b-tree checksums) but
not to the array bytes themselves; the checksums, recomputed after each restore, catch that.

Atomicity. Orbax writes a step into `<directory>/N.orbax-checkpoint-tmp/` and, once every process has
finished writing, renames it to `<directory>/N/` (with `commit_success.txt` inside). A step directory
with the temporary suffix is therefore a save that never finished (a killed writer): it is never listed
by `steps()` and never restored. Such directories are left in place rather than swept on start-up, so
that opening a `Checkpointer` on a directory that a live run is writing cannot delete that run's save
in flight; the next save of the same step replaces them.

Saving is synchronous: `save` returns once the checkpoint is committed. All processes of a multi-host
job must call `save` and `restore` together (orbax synchronises them; process 0 creates directories,
renames and deletes).

Restoring targets an abstract state: `jax.ShapeDtypeStruct`s carrying the wanted shardings, which may
be on a different mesh than the one the checkpoint was written from. Before reading any array the
checkpoint's tree, shapes and dtypes are compared with the abstract state; a difference is a
configuration error and raises `CheckpointError` at once. A checkpoint whose files cannot be read
(truncated, overwritten, missing) is corruption: `restore()` without a step then falls back to the
next older complete checkpoint and reports the skipped one.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "abstract_like"]

STATE = "state"
META = "meta"
CHECKSUMS = "checksums"

# dtypes whose bits the checksum reads; leaves of other dtypes are stored without a checksum
_CHECKSUM_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, jnp.bfloat16, np.float32, np.float64))
_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked; the message names the directory, step or leaf."""


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_path(path) -> str:
    return "/".join(_key_name(e) for e in path) or "<root>"


def _leaves_by_path(tree, is_leaf=None) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {_leaf_path(path): leaf for path, leaf in flat}


def abstract_like(state):
    """The abstract version of `state`: a `jax.ShapeDtypeStruct` per leaf with its shape, dtype and
    sharding (None for leaves that are not jax arrays)."""

    def one(x):
        x = x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree_util.tree_map(one, state)


def _leaf_checksum(x):
    """Two 32-bit position-weighted sums of the bits of `x`. Every weight is odd, so changing any one
    element changes both sums; the result does not depend on how `x` is sharded."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, _UINT_OF_SIZE[x.dtype.itemsize]).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, bits.size).reshape(bits.shape)
    odd = index * jnp.uint32(2) + jnp.uint32(1)
    rotated = (bits << jnp.uint32(16)) | (bits >> jnp.uint32(16))
    return jnp.stack([jnp.sum(bits * (odd * jnp.uint32(0x9E3779B1)), dtype=jnp.uint32),
                      jnp.sum(rotated * (odd * jnp.uint32(0x85EBCA77)), dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda leaves: {k: _leaf_checksum(v) for k, v in leaves.items()})


def _checksums(state) -> dict:
    """{leaf path: [sum1, sum2]} for the array leaves of `state` whose dtype the checksum covers."""
    groups: dict = {}  # one computation per device set: jit does not mix arrays committed to different ones
    for path, leaf in _leaves_by_path(state).items():
        if isinstance(leaf, (jax.Array, np.ndarray)) and np.dtype(leaf.dtype) in _CHECKSUM_DTYPES:
            devices = frozenset(leaf.sharding.device_set) if isinstance(leaf, jax.Array) else None
            groups.setdefault(devices, {})[path] = leaf
    out = {}
    for leaves in groups.values():
        for path, sums in _checksums_jit(leaves).items():
            out[path] = [int(v) for v in np.asarray(sums)]
    return out


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_processes_ok(ok: bool) -> bool:
    """True when `ok` holds on every process (so that all processes take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    """Saves and restores the checkpoints of one run in `directory`, keeping the `keep` most recently
    saved ones.

    Usable as a context manager; `close()` waits for pending deletions and releases orbax's threads.
    `skipped` maps each step that the last `restore()` passed over as unreadable to the reason.
    """

    def __init__(self, directory: str, *, keep: int = 3):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise CheckpointError(f"checkpoint: keep must be a positive integer, got {keep!r}")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.keep = keep
        self.skipped: dict[int, str] = {}
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in (STATE, META, CHECKSUMS):
            save_args, restore_args = ((ocp.args.StandardSave, ocp.args.StandardRestore) if item == STATE
                                       else (ocp.args.JsonSave, ocp.args.JsonRestore))
            registry.add(item, save_args)
            registry.add(item, restore_args)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=False,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint: cannot open directory {directory}: {_one_line(e)}") from None

    # -- listing ---------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending (unfinished saves are not listed)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state, meta: dict) -> None:
        """Write `state` (a pytree of arrays, possibly sharded) and `meta` (a JSON-serialisable dict)
        as checkpoint `step`, returning once it is committed on disk.

        Then only the `keep` most recently saved checkpoints are kept. A checkpoint that already exists
        for `step` is replaced: it is deleted first, so an interruption between the deletion and the
        commit leaves no checkpoint for `step` (older ones are untouched). Replacing is what a run wants
        after resuming from an older step than the newest on disk (for instance after `restore` skipped
        an unreadable newest checkpoint): its next saves overwrite the abandoned ones.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise CheckpointError(f"checkpoint: step must be a non-negative integer, got {step!r}")
        step = int(step)
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint: meta must be a dict, got {type(meta).__name__}")
        try:
            json.dumps(meta, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint: meta for step {step} is not JSON-serialisable: {e}") from None
        for path, leaf in _leaves_by_path(state).items():
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not hasattr(leaf, "shape"):
                raise CheckpointError(f"checkpoint: state leaf {path!r} is a {type(leaf).__name__}, "
                                      "not an array")
            if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
                raise CheckpointError(f"checkpoint: state leaf {path!r} is a typed PRNG key array; "
                                      "save jax.random.key_data(key) instead")
        if step in self.steps():
            self._manager.delete(step)
        checksums = _checksums(state)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta),
                                     CHECKSUMS: ocp.args.JsonSave(checksums)})
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint: saving step {step} to {self.directory} failed: "
                                  f"{_one_line(e)}") from None

    def prune(self, restored: Optional[int] = None) -> list[int]:
        """Delete the complete checkpoints beyond the `keep` newest, as `save` does once it has committed
        a step, and return the deleted steps. A process killed between that commit and the deletion
        leaves one checkpoint too many; a resumed run calls this after `restore`, since a run that
        resumes at its last step saves nothing more. Steps at or after `restored` (the step a run
        continues from, possibly older than unreadable newer ones) are never deleted."""
        steps = self.steps()
        newest = set(steps[-self.keep:])
        doomed = [s for s in steps if s not in newest and (restored is None or s < restored)]
        for step in doomed:
            try:
                self._manager.delete(step)
            except OSError as e:
                raise CheckpointError(f"checkpoint: deleting old step {step} in {self.directory} failed: "
                                      f"{_one_line(e)}") from None
        return doomed

    # -- restoring -------------------------------------------------------------------------------

    def restore(self, abstract_state, step: Optional[int] = None):
        """Read checkpoint `step` (None: the newest readable one) into arrays shaped, typed and sharded
        as `abstract_state` says. Returns `(state, meta, step)`.

        With `step=None`, an unreadable checkpoint (corrupt, truncated or missing files) is skipped with
        one line on stderr and recorded in `self.skipped`, and the next older one is tried. A requested
        `step` is not substituted. A tree, shape or dtype difference between the checkpoint and
        `abstract_state` raises `CheckpointError` naming the first differing leaf, without falling back.
        """
        abstract_state = self._check_abstract(abstract_state)
        self.skipped = {}
        available = self.steps()
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise CheckpointError(f"checkpoint: step must be an integer, got {step!r}")
            step = int(step)
            if step not in available:
                raise CheckpointError(f"checkpoint: no complete checkpoint for step {step} in "
                                      f"{self.directory} (complete steps: {available})")
            candidates = [step]
        else:
            if not available:
                raise CheckpointError(f"checkpoint: no complete checkpoint in {self.directory}")
            candidates = available[::-1]

        for candidate in candidates:
            restored, reason = self._try_restore(abstract_state, candidate)
            if reason is None:
                state, meta = restored
                return state, meta, candidate
            if step is not None:
                raise CheckpointError(f"checkpoint: step {step} in {self.directory} cannot be read: {reason}")
            self.skipped[candidate] = reason
            print(f"checkpoint: skipping step {candidate} in {self.directory}, it cannot be read: {reason}",
                  file=sys.stderr, flush=True)
        failures = "; ".join(f"step {s}: {why}" for s, why in self.skipped.items())
        raise CheckpointError(f"checkpoint: no checkpoint in {self.directory} can be read ({failures})")

    def _check_abstract(self, abstract_state):
        def one(path, leaf):
            if isinstance(leaf, jax.Array):
                leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            if not isinstance(leaf, jax.ShapeDtypeStruct):
                raise CheckpointError(f"checkpoint: abstract_state leaf {_leaf_path(path)!r} is a "
                                      f"{type(leaf).__name__}, not a jax.ShapeDtypeStruct")
            if leaf.sharding is None:
                raise CheckpointError(f"checkpoint: abstract_state leaf {_leaf_path(path)!r} has no "
                                      "sharding; give each leaf the sharding to restore onto")
            return leaf

        return jax.tree_util.tree_map_with_path(one, abstract_state)

    def _try_restore(self, abstract_state, step: int):
        """((state, meta), None) on success, (None, reason) when the checkpoint cannot be read.
        Raises CheckpointError when it is readable but does not match `abstract_state`."""
        reason = None
        saved = None
        has_checksums = False
        try:
            items = self._manager.item_metadata(step)
            saved = items[STATE] if STATE in items else None
            if saved is None:
                raise FileNotFoundError(f"item {STATE!r} is missing")
            saved = getattr(saved, "tree", saved)
            has_checksums = CHECKSUMS in items
        except Exception as e:  # noqa: BLE001 - any failure to read is reported as unreadable
            reason = _one_line(e)
        if not _all_processes_ok(reason is None):
            return None, reason or "unreadable on another process"
        self._compare(abstract_state, saved, step)

        items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if has_checksums:
            items[CHECKSUMS] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            state, meta = restored[STATE], restored[META]
            if not isinstance(meta, dict):
                raise ValueError(f"item {META!r} is a {type(meta).__name__}, not a dict")
            if has_checksums:
                expected = restored[CHECKSUMS]
                for path, sums in _checksums(state).items():
                    if path in expected and list(expected[path]) != sums:
                        raise ValueError(f"leaf {path!r} does not match the checksum written with it")
        except Exception as e:  # noqa: BLE001 - any failure to read is reported as unreadable
            reason = _one_line(e)
        if not _all_processes_ok(reason is None):
            return None, reason or "unreadable on another process"
        return (state, meta), None

    def _compare(self, abstract_state, saved_tree, step: int) -> None:
        wanted = _leaves_by_path(abstract_state)
        saved = _leaves_by_path(saved_tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        where = f"checkpoint step {step} in {self.directory}"
        for path, want in wanted.items():
            have = saved.get(path)
            if have is None:
                raise CheckpointError(f"{where}: leaf {path!r} (shape {tuple(want.shape)}) is not in the "
                                      "checkpoint (checkpoint shape: absent)")
            if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
                raise CheckpointError(f"{where}: leaf {path!r} has shape {tuple(have.shape)} dtype "
                                      f"{np.dtype(have.dtype)} in the checkpoint but the abstract state "
                                      f"wants shape {tuple(want.shape)} dtype {np.dtype(want.dtype)}")
        for path, have in saved.items():
            if path not in wanted:
                raise CheckpointError(f"{where}: leaf {path!r} (shape {tuple(have.shape)}) is in the "
                                      "checkpoint but not in the abstract state (abstract shape: absent)")

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for pending work and release orbax's resources."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
