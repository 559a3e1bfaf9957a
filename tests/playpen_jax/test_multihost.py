"""Multi-process runs on CPU: real processes joined by JAX's distributed runtime (gloo collectives).

Each job starts its processes with subprocess.Popen on a free local port, each process with its own
simulated CPU devices; a job of two processes with two devices each has the same four global devices
as a job of one process with four. Jobs run `tests/playpen_jax/multihost_worker.py` or
`python -m train.main`. The in-process tests at the top check the pieces without starting processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from playpen_jax import buffers, distributed
from playpen_jax import sharding as shd
from tests.conftest import xla_flags
from tests.train.helpers import main_args
from tests.train.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
WORKER = "tests.playpen_jax.multihost_worker"
GLOBAL_DEVICES = 4


# ----- settings and pieces, in this process -------------------------------------------------------

def test_plan_reads_the_three_variables_and_config_values():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.plan(environ=env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                             "process_id": 3}
    assert distributed.plan({"JAX_PROCESS_ID": 0}, environ=env)["process_id"] == 0
    only_config = {"JAX_COORDINATOR_ADDRESS": "[::1]:99", "JAX_NUM_PROCESSES": 2, "JAX_PROCESS_ID": 1}
    assert distributed.plan(only_config, environ={}) == {"coordinator_address": "[::1]:99",
                                                         "num_processes": 2, "process_id": 1}
    assert distributed.plan(environ={}) is None   # no settings and no TPU here: one process


@pytest.mark.parametrize("env, needle", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS not"),
    ({"JAX_COORDINATOR_ADDRESS": "host", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:70000", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "1..65535"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "expected 0..1"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "at least 1"),
])
def test_plan_rejects_partial_or_malformed_settings(env, needle):
    with pytest.raises(distributed.DistributedError, match=needle) as e:
        distributed.plan(environ=env)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    with pytest.raises(distributed.DistributedError, match="unknown distributed setting 'process_id'"):
        distributed.plan({"process_id": 1}, environ={})


def test_bad_settings_stop_train_main_with_one_line(monkeypatch, capsys):
    from train import main as train_main

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert train_main.main(["--config=configs/grpo.py"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: JAX_COORDINATOR_ADDRESS set but") and len(err.splitlines()) == 1


def test_config_values_replace_the_environment(monkeypatch, capsys):
    from train import main as train_main

    for k in distributed.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert train_main.main(["--config=configs/grpo.py", "--config.distributed.num_processes=2",
                            "--config.distributed.process_id=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: JAX_NUM_PROCESSES, JAX_PROCESS_ID set but JAX_COORDINATOR_ADDRESS not")
    assert train_main.main(["--config=configs/grpo.py", "--config.distributed.process_id=-2"]) == 2
    assert "config.distributed.process_id=-2" in capsys.readouterr().err


def test_one_process_without_settings():
    assert distributed.initialize() is False and jax.process_count() == 1
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert buffers.row_shard(mesh) == (0, 1)
    assert distributed.allgather(np.arange(3)).tolist() == [[0, 1, 2]]
    assert distributed.shard_sum([1.0, 2.0], 0).tolist() == [1.0, 2.0]
    assert [distributed.share(10, k, 3) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [distributed.share(1, k, 2) for k in range(2)] == [(0, 0), (0, 1)]
    seqs = [buffers.completion([5, 6, 7], [8, 9], [-0.1, -0.2]),
            buffers.completion([5], [4, 4], [-1.0, -1.0])]
    one = buffers.pack_shard(seqs, shard=0, shards=1, micro_batch=2, max_len=64, packed=True)
    ref = buffers.pack(seqs, micro_batch=2, max_len=64, packed=True)
    assert one.keys() == ref.keys() and all(np.array_equal(one[k], ref[k]) for k in ref)
    assert buffers.pack_shard([], shard=0, shards=1, micro_batch=2, max_len=64) is None
    # a shard's block of a small batch: the global micro-batch is a power of two >= shards x the most
    # rows any shard has (2 x 2), not the configured 8, so each of the two shards fills 2 rows
    block = buffers.pack_shard(seqs, shard=0, shards=2, micro_batch=8, rows_multiple=2, max_len=64)
    assert block["tokens"].shape == (1, 2, 64) and block["valid"].tolist() == [[1, 1]]
    assert buffers.pack_shard(seqs, shard=1, shards=2, micro_batch=1, rows_multiple=2,
                              max_len=64)["tokens"].shape == (2, 1, 64)
    with pytest.raises(ValueError, match="shards=2 with one process"):
        buffers.to_device(ref, mesh, shards=2)


def test_grpo_shards_play_the_groups_of_one_process():
    """Split over two shards, a step's groups are the same groups as one process plays: same
    instances, group ids, partner seeds (a seeded weak partner) and so the same transcripts."""
    import hashlib

    from games import eval as game_eval
    from games import registry
    from games.env import RewardConfig
    from playpen_jax.config import apply_override, load_file
    from train import grpo

    c = load_file("configs/grpo.py")
    for key, value in {"games.names": "taboo", "games.learner_roles": "2", "grpo.groups_per_step": "3",
                       "grpo.group_size": "3"}.items():
        apply_override(c, key, value)
    games = registry.resolve_names(c.games.names)
    pool = [registry.instances(g, "train", 0) for g in games]
    roles = game_eval.parse_roles(c.games.learner_roles, games)
    words = ["apple", "house", "river", "light", "stone"]

    def learner(requests):   # a deterministic guesser: the guess depends on the conversation only
        return ["GUESS: " + words[int(hashlib.md5(str(r.messages).encode()).hexdigest(), 16) % 5]
                for r in requests]

    def episodes(ro):
        return sorted((f.tag, str(f.episode.game_id), f.reward, tuple(t.reply for t in f.turns))
                      for f, _ in ro.finished)

    whole = grpo.collect(pool, c, 5, learner, None, roles, RewardConfig(), env_partner="weak")
    parts = [grpo.collect(pool, c, 5, learner, None, roles, RewardConfig(), env_partner="weak",
                          shard=k, shards=2) for k in range(2)]
    assert [len(p.finished) for p in parts] == [3, 6]   # groups [0] and [1, 2]
    assert episodes(whole) == sorted(episodes(parts[0]) + episodes(parts[1]))
    assert sum(p.metrics["learner_turns"] for p in parts) == whole.metrics["learner_turns"]
    empty = grpo.collect(pool, c, 5, learner, None, roles, RewardConfig(), env_partner="weak",
                         shard=0, shards=4)   # 3 groups over 4 shards: the first has none
    assert empty.finished == [] and empty.sequences == [] and empty.metrics["learner_turns"] == 0


# ----- jobs of real processes --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list, processes: int, timeout: float = 600, via_config: bool = False) -> list:
    """Runs `python <args>` as one job of `processes` processes sharing GLOBAL_DEVICES CPU devices;
    returns each process's stdout. Fails with every process's stderr when one fails or hangs.
    via_config: pass the process settings as train.main's --config.distributed.* flags."""
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS}
        env.update(JAX_PLATFORMS="cpu",
                   XLA_FLAGS=xla_flags(GLOBAL_DEVICES // processes))
        extra = []
        if processes > 1 and via_config:
            extra = [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     f"--config.distributed.num_processes={processes}",
                     f"--config.distributed.process_id={pid}"]
        elif processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable] + args + extra, cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.time() + timeout
    # A process that fails leaves the others waiting in a collective: stop them all.
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(2)
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate() for p in procs]
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- process {i} exit {p.returncode}:\n{err[-3000:]}"
                           for i, (p, (_, err)) in enumerate(zip(procs, outputs)))
        pytest.fail(f"job {args[:3]} of {processes} processes failed\n{report}", pytrace=False)
    return [out for out, _ in outputs]


def _npz(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_trees_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.slow
def test_sharded_train_step_equals_one_process(tmp_path):
    """Two processes x two devices, each packing its own uneven share of the sequences, train like
    one process with four devices: on the same global batch, and on its own batch of all sequences."""
    two, one = tmp_path / "two", tmp_path / "one"
    _launch(["-m", WORKER, str(two), "step"], processes=2)
    _launch(["-m", WORKER, str(one), f"step={two}"], processes=1)
    m = [_npz(two / f"metrics_{p}.npz") for p in range(2)]
    assert [(int(x["shard"]), int(x["shards"])) for x in m] == [(0, 2), (1, 2)]
    # the processes agreed on the batch shape: T from process 1's long sequences, M from process 0's
    # six rows (unpacked step: 6 rows in micro-batches of 2 -> 4, where process 1 alone needs 2)
    b0, b1 = _npz(two / "batch1_0.npz"), _npz(two / "batch1_1.npz")
    assert b0["tokens"].shape == b1["tokens"].shape == (4, 2, 128)
    assert b0["valid"].sum() == 6 and b1["valid"].sum() == 4
    np.testing.assert_array_equal(b0["weight"], b1["weight"])
    assert b0["weight"].tolist() == pytest.approx([0.4, 0.4, 0.2, 0.0])   # sequences: 4 + 4 + 2 of 10
    p0, p1 = _npz(two / "params_0.npz"), _npz(two / "params_1.npz")
    _assert_trees_close(p0, p1, atol=0)
    fed, own = _npz(one / "params_fed_0.npz"), _npz(one / "params_0.npz")
    _assert_trees_close(p0, fed, atol=1e-5)   # the same global batch
    # one process packing all ten sequences itself: other rows, so other f32 summation orders,
    # which Adam's normalised update (lr 1e-2) can magnify to ~2e-5 where a gradient is near 0;
    # a wrong shard would move params by about the learning rate
    _assert_trees_close(p0, own, atol=1e-4)
    from models import llama
    from tests.conftest import tiny_config

    initial = llama.init(tiny_config(), jax.random.PRNGKey(0))
    assert np.abs(p0["['embed']"] - np.asarray(initial["embed"])).max() > 1e-3   # the steps changed it
    mo = _npz(one / "metrics_0.npz")
    for key in ("loss_0", "loss_1", "grad_norm_0", "grad_norm_1"):
        assert float(m[0][key]) == pytest.approx(float(mo[key]), rel=1e-5)


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tmp_path):
    """A checkpoint written by one process restores in two on another mesh, and one written by two
    processes (leaves sharded across them) restores in one."""
    by_one, by_two = tmp_path / "ck1", tmp_path / "ck2"
    _launch(["-m", WORKER, str(tmp_path / "a"), f"save={by_one}"], processes=1)
    _launch(["-m", WORKER, str(tmp_path / "b"), f"restore={by_one}", f"save={by_two}"], processes=2)
    _launch(["-m", WORKER, str(tmp_path / "c"), f"restore={by_two}"], processes=1)
    saved = _npz(tmp_path / "a" / "saved_0.npz")
    saved.pop("across_processes")
    assert int(saved["['step']"]) == 3 and np.abs(saved["['opt_state'][1][0].mu['embed']"]).max() > 0
    for out, writers, across in (("b/state_0", 1, True), ("b/state_1", 1, True), ("c/state_0", 2, False)):
        got = _npz(tmp_path / f"{out}.npz")
        assert int(got.pop("written_by")) == writers and bool(got.pop("as_asked"))
        assert bool(got.pop("across_processes")) == across, out
        _assert_trees_close(saved, got, atol=0)
    two = _npz(tmp_path / "b" / "saved_1.npz")
    assert bool(two.pop("across_processes"))
    _assert_trees_close(saved, two, atol=0)


# ----- train.main ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def _main_args(tiny_dir, run_dir, config="configs/grpo.py", **over):
    return ["-m", "train.main"] + main_args(tiny_dir, run_dir, config, **{
        "eval.limit": 1, "eval.at_start": False, "checkpoint.every": 0, "log.tensorboard": False, **over})


def _lines(run_dir) -> list:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_run_on_two_processes_equals_one(tiny_dir, tmp_path):
    """Each of two processes plays half of every step's groups. Every episode samples from keys of
    its own, so the two processes play the episodes one process plays, and train to its params; the
    metrics are those of all the groups, written once, by process 0; the checkpoint restores. With
    dynamic sampling, both processes agree on each refill round from every shard's groups. The
    auxiliary SFT term's demonstrations are split between the processes like SFT's rows."""
    over = {"steps": 3, "grpo.group_size": 8, "grpo.groups_per_step": 4, "optimizer.learning_rate": 0.03,
            "rollout.temperature": 1.0, "grpo.dynamic_sampling": True, "grpo.max_refill_rounds": 1,
            "grpo.sft_coef": 0.5, "sft.episodes_per_game": 4, "sft.batch_size": 4}
    runs = {n: tmp_path / f"grpo{n}" for n in (1, 2)}
    for n, run in runs.items():
        _launch(_main_args(tiny_dir, run, **over), processes=n)
    one, two = _lines(runs[1]), _lines(runs[2])
    assert [(m["split"], m["step"]) for m in two] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    for a, m in zip(one[:3], two[:3]):
        # at least 4 groups x 8, over both processes, and the same refills as one process
        assert m["episodes"] == a["episodes"] == m["learner_turns"] == 8 * m["groups_played"] >= 32
        assert (m["rows"] + m["dropped_long"] + m["dropped_zero_variance"] + m["dropped_surplus"]
                == m["learner_turns"])
        for key in ("reward", "success", "played", "rows", "zero_variance_groups", "batch_rows",
                    "groups_played", "dropped_surplus", "episodes_colourname", "played_colourname",
                    "success_colourname"):
            assert m.get(key) == a.get(key), (m["step"], key)
        assert m["episodes_colourname"] == m["episodes"] and m["success_colourname"] == m["success"]
        if "loss" in a:
            assert m["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
            assert m["aux_nll"] == pytest.approx(a["aux_nll"], rel=1e-4) and m["aux_nll"] > 0
            assert m["skipped_nonfinite"] == 0
    assert any("loss" in m for m in two[:3]) and len({m["reward"] for m in two[:3]}) > 1
    assert any(m["groups_played"] > 4 for m in two[:3])   # a refill round was played
    pa = load_file(str(runs[1] / "hf" / "model.safetensors"))
    pb = load_file(str(runs[2] / "hf" / "model.safetensors"))
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    assert max(np.abs(pb[k] - start[k]).max() for k in start) > 1e-3
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert sorted(os.listdir(runs[2] / "checkpoints")) == ["3"]
    assert len(list((runs[2] / "eval" / "step_3").rglob("interactions.json"))) == 1


@pytest.mark.slow
def test_sft_run_on_two_processes_equals_one(tiny_dir, tmp_path):
    """SFT has no sampling: two processes, each training on its half of every step's rows, end with
    the params of one process training on all of them."""
    over = {"steps": 3, "sft.episodes_per_game": 6, "sft.batch_size": 6, "batch.micro_batch": 4,
            "optimizer.learning_rate": 0.005}
    runs = {n: tmp_path / f"sft{n}" for n in (1, 2)}
    for n, run in runs.items():
        _launch(_main_args(tiny_dir, run, config="configs/sft.py", **over), processes=n, via_config=True)
    one, two = _lines(runs[1]), _lines(runs[2])
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2, 3, 3]
    for a, b in zip(one[:3], two[:3]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    pa = load_file(str(runs[1] / "hf" / "model.safetensors"))
    pb = load_file(str(runs[2] / "hf" / "model.safetensors"))
    # The two runs pack the rows differently, so sums are taken in another order (differences of
    # ~1e-7); Adam's division by sqrt(v) can enlarge that for a weight whose gradient is nearly 0.
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-3, atol=1e-5, err_msg=k)
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    assert max(np.abs(pa[k] - start[k]).max() for k in start) > 1e-3
