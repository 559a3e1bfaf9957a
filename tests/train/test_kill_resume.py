"""kill -9 at random moments of `python -m train.main` (rollout, update, checkpoint write, eval), then
`--config.resume=true` until the run completes: the final params equal the uninterrupted run's bit
for bit, and no half-written checkpoint is ever restored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import xla_flags
from tests.train.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _argv(model: str, run_dir: Path) -> list:
    over = {"model.name": model, "run_dir": str(run_dir), "games.names": "colourname",
            "eval.games": "colourname", "eval.limit": 1, "eval.every": 3, "games.learner_roles": "all",
            "rollout.max_new_tokens": 4, "log.progress": False, "log.plots": False, "batch.max_seq_len": 128,
            "checkpoint.every": 1, "checkpoint.keep": 2, "log.tensorboard": True, "steps": STEPS,
            "grpo.group_size": 4, "grpo.groups_per_step": 4, "optimizer.learning_rate": 0.03}
    return ([sys.executable, "-m", "train.main", "--config=configs/grpo.py"]
            + [f"--config.{k}={v}" for k, v in over.items()])


def _env() -> dict:
    # the test's own JAX settings stay out, except its compilation cache (tests/conftest.py)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    return env


def _train_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"split": "train"' in line for line in path.read_text().splitlines())


def _run_to_end(argv: list, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    model = make_tiny_model(str(base / "model"))
    run = base / "straight"
    _run_to_end(_argv(model, run))
    return model, load_file(str(run / "hf" / "model.safetensors")), run


@pytest.mark.slow
@pytest.mark.parametrize("seed, times", [(0, 1), (2, 2)])
def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(straight, tmp_path, seed, times):
    model, final, straight_run = straight
    rng = np.random.default_rng(seed)
    run = tmp_path / "killed"
    kills = []
    for attempt in range(times):   # each kill at a random point after a random step
        after = int(rng.integers(0, STEPS - 1))
        argv = _argv(model, run) + (["--config.resume=true"] if attempt else [])
        proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while _train_lines(run) <= after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 1.5)))   # somewhere in the next step, its checkpoint or an eval
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append((after, _train_lines(run)))
        proc.communicate(timeout=60)
    assert kills, "the run ended before it could be killed"
    out = _run_to_end(_argv(model, run) + ["--config.resume=true"])
    assert "resume" in out.stderr
    got = load_file(str(run / "hf" / "model.safetensors"))
    assert got.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(got[k], final[k], err_msg=k)
    # the finished run logged each step and each eval once, as the uninterrupted run did
    def logged(path):
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [(m["split"], m["step"]) for m in rows]

    assert logged(run) == logged(straight_run)
    assert [("train", k) for k in range(1, STEPS + 1)] == [x for x in logged(run) if x[0] == "train"]
    assert sorted(os.listdir(run / "checkpoints")) == sorted(os.listdir(straight_run / "checkpoints"))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_finishes_the_same(straight, tmp_path):
    """The newest checkpoint of a finished run is damaged: a resume says so, restores the one
    before, trains the last step again and exports the same params."""
    import shutil

    model, final, straight_run = straight
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    shutil.rmtree(run / "hf")
    newest = run / "checkpoints" / str(STEPS)
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    out = _run_to_end(_argv(model, run) + ["--config.resume=true"])
    assert f"checkpoint: skipping step {STEPS}" in out.stderr
    got = load_file(str(run / "hf" / "model.safetensors"))
    for k in final:
        np.testing.assert_array_equal(got[k], final[k], err_msg=k)
