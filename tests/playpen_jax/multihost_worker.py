"""One process of a multi-process test job (started by tests/playpen_jax/test_multihost.py).

    python -m tests.playpen_jax.multihost_worker OUT TASK[=ARG] [TASK[=ARG] ...]

The environment says how many processes the job has (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, or none for one process) and how many CPU devices each has (XLA_FLAGS). Each task
writes its results into the directory OUT:

  step[=BATCHES]  two GRPO train steps (a packed token-mean loss, then an unpacked sequence-mean loss)
                  on a data=2 x fsdp=2 mesh, each process packing its own share of the sequences:
                  params_<process>.npz, metrics_<process>.npz and the process's batches
                  batch<k>_<process>.npz. With BATCHES (the OUT of a two-process job) the same two
                  steps again on that job's batches, concatenated along the rows:
                  params_fed_<process>.npz, metrics_fed_<process>.npz.
  save=DIR        a train state (params, Adam moments, step 3) as checkpoint 3 in DIR, from an
                  fsdp=all-devices mesh; saved_<process>.npz holds the process's copy of every leaf.
  restore=DIR     restores checkpoint 3 of DIR onto an fsdp=2 x tensor=2 mesh: state_<process>.npz
                  holds the process's copy of every leaf, the leaves' partition specs and who wrote it.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from playpen_jax import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models import llama  # noqa: E402
from playpen_jax import buffers, checkpoint  # noqa: E402
from playpen_jax import sharding as shd  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.train.helpers import grpo_loss_fn, optimizer  # noqa: E402
from train import step as train_step  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def sequences(cfg) -> list:
    """Ten sequences: eight short ones and two long ones (a longer length bucket)."""
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(10):
        prompt = rng.integers(3, cfg.vocab_size, 70 if i in (7, 9) else 5 + i).tolist()
        reply = rng.integers(3, cfg.vocab_size, 2 + i % 3).tolist()
        seqs.append(buffers.completion(prompt, reply, (-rng.random(len(reply))).tolist(),
                                       advantage=float(rng.normal()), group=i // 3))
    return seqs


def shares(n_seqs: int) -> list:
    """Uneven shares: process 0 gets the first six (all short), process 1 the rest (both long ones)."""
    return [(0, 6), (6, n_seqs)]


def host_copy(tree, mesh) -> dict:
    """{leaf path: numpy array} of this process's whole copy of `tree`'s leaves."""
    local = distributed.local_mesh(mesh)
    shardings = jax.tree_util.tree_map(
        lambda x: jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec()), tree)
    copy = distributed.process_local_copy(tree, shardings)
    flat, _ = jax.tree_util.tree_flatten_with_path(copy)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


_steps: dict = {}


def train_two_steps(cfg, mesh, batch_for) -> tuple:
    """Two train steps from the same initial state: a packed token-mean GRPO loss, then an unpacked
    sequence-mean one; batch_for(k, packed) gives step k's batch for this process."""
    params = jax.device_get(llama.init(cfg, jax.random.PRNGKey(0)))
    ref = jax.device_get(llama.init(cfg, jax.random.PRNGKey(1)))
    opt = optimizer()
    p_sh = train_step.param_shardings(cfg, mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = train_step.state_shardings(p_sh, opt, abstract, mesh)
    state = train_step.init_state(jax.device_put(params, p_sh), opt, sh)
    extra = {"ref": jax.device_put(ref, p_sh)}
    _, shards = buffers.row_shard(mesh)
    metrics = {}
    for k, (aggregation, packed) in enumerate((("token-mean", True), ("sequence-mean", False))):
        if aggregation not in _steps:   # one process, one mesh: the same compiled steps for every call
            _steps[aggregation] = train_step.make_train_step(grpo_loss_fn(cfg, aggregation), opt, sh)
        step = _steps[aggregation]
        state, m = step(state, buffers.to_device(batch_for(k, packed), mesh, shards=shards), extra)
        metrics.update({f"{key}_{k}": float(v) for key, v in jax.device_get(m).items()})
    return host_copy(state["params"], mesh), metrics


def run_steps(out: str, batches_dir: str = "") -> None:
    """See the module docstring: writes params_<process>.npz and metrics_<process>.npz (and, given
    BATCHES, params_fed_<process>.npz and metrics_fed_<process>.npz from the fed batches)."""
    cfg = tiny_config()
    pid = jax.process_index()
    mesh = shd.make_mesh({"data": 2, "fsdp": 2})
    shard, shards = buffers.row_shard(mesh)
    seqs = sequences(cfg)

    def packed_here(k, packed):
        lo, hi = shares(len(seqs))[shard] if shards == 2 else (0, len(seqs))
        batch = buffers.pack_shard(seqs[lo:hi], shard=shard, shards=shards, micro_batch=4,
                                   rows_multiple=buffers.rows_multiple(mesh), max_len=128,
                                   weight_by="tokens" if packed else "sequences", packed=packed)
        np.savez(os.path.join(out, f"batch{k}_{pid}.npz"), **batch)
        return batch

    def fed(k, packed):   # the other job's per-process batches, concatenated along the rows
        parts = [np.load(os.path.join(batches_dir, f"batch{k}_{p}.npz")) for p in range(2)]
        return {key: np.concatenate([b[key] for b in parts], axis=1) if parts[0][key].ndim >= 2
                else parts[0][key] for key in parts[0].files}

    params, metrics = train_two_steps(cfg, mesh, packed_here)
    np.savez(os.path.join(out, f"params_{pid}.npz"), **params)
    np.savez(os.path.join(out, f"metrics_{pid}.npz"), shard=shard, shards=shards, **metrics)
    if batches_dir:
        params, metrics = train_two_steps(cfg, mesh, fed)
        np.savez(os.path.join(out, f"params_fed_{pid}.npz"), **params)
        np.savez(os.path.join(out, f"metrics_fed_{pid}.npz"), **metrics)


def state_for(mesh, step: int = 3):
    cfg = tiny_config()
    params = jax.device_get(llama.init(cfg, jax.random.PRNGKey(5)))
    opt = optimizer()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = train_step.state_shardings(train_step.param_shardings(cfg, mesh), opt, abstract, mesh)
    state = train_step.init_state(jax.device_put(params, sh["params"]), opt, sh)
    # Adam's moments after a made-up gradient, so that the optimizer state is not all zeros.
    grads = jax.tree_util.tree_map(lambda p: 0.01 * p, state["params"])
    update = jax.jit(opt.update, out_shardings=(sh["params"], sh["opt_state"]))
    _, opt_state = update(grads, state["opt_state"], state["params"])
    return {"params": state["params"], "opt_state": opt_state,
            "step": jax.device_put(np.int32(step), sh["step"])}, sh


def save(out: str, directory: str) -> None:
    mesh = shd.make_mesh({"fsdp": -1})
    state, _ = state_for(mesh)
    with checkpoint.Checkpointer(directory) as ck:
        ck.save(3, state, {"written_by": jax.process_count()})
    across = any(not x.is_fully_addressable for x in jax.tree_util.tree_leaves(state))
    np.savez(os.path.join(out, f"saved_{jax.process_index()}.npz"), across_processes=across,
             **host_copy(state, mesh))


def restore(out: str, directory: str) -> None:
    mesh = shd.make_mesh({"fsdp": 2, "tensor": 2})
    state, _ = state_for(mesh, step=0)
    with checkpoint.Checkpointer(directory) as ck:
        restored, meta, step = ck.restore(checkpoint.abstract_like(state))
    assert step == 3, step
    leaves = jax.tree_util.tree_leaves(restored)
    wanted = jax.tree_util.tree_leaves(state)
    np.savez(os.path.join(out, f"state_{jax.process_index()}.npz"), written_by=meta["written_by"],
             as_asked=all(x.sharding == w.sharding for x, w in zip(leaves, wanted)),
             across_processes=any(not x.is_fully_addressable for x in leaves), **host_copy(restored, mesh))


def main(argv: list) -> int:
    out, tasks = argv[0], argv[1:]
    os.makedirs(out, exist_ok=True)
    for task in tasks:
        name, _, arg = task.partition("=")
        {"step": run_steps, "save": save, "restore": restore}[name](out, arg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
