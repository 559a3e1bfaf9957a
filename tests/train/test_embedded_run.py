"""The main job on the embedded SmolLM2-135M-Instruct: `python -m train.main` in its own process
(one CPU device, as a user runs it), with a shortened config."""

import json
import os
import subprocess
import sys

import pytest

from playpen_jax.metrics import read_jsonl


@pytest.mark.slow
def test_grpo_on_the_embedded_model_runs_end_to_end(tmp_path):
    run = tmp_path / "grpo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    args = [sys.executable, "-m", "train.main", "--config=configs/grpo.py", f"--config.run_dir={run}",
            "--config.steps=1", "--config.games.names=taboo", "--config.eval.games=taboo",
            "--config.grpo.group_size=2", "--config.grpo.groups_per_step=1",
            "--config.rollout.max_new_tokens=16", "--config.eval.max_new_tokens=16",
            "--config.batch.max_seq_len=512", "--config.log.progress=false",
            # every episode of the untrained model aborts: keep the zero-advantage rows so that the
            # update (its KL term) still runs
            "--config.grpo.drop_zero_variance=false"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(str(run / "metrics.jsonl"))
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 1 and train[0]["episodes"] == 2
    # Taboo's guesser (player 2) is the learner; every learner turn was trained on unless too long.
    assert train[0]["learner_turns"] >= 2
    assert train[0]["rows"] + train[0]["dropped_long"] == train[0]["learner_turns"]
    if train[0]["rows"]:
        assert train[0]["tokens_per_second"] > 0 and 0 < train[0]["mfu"] < 1
        assert train[0]["skipped_nonfinite"] == 0 and train[0]["kl"] == 0  # policy == reference
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 1]
    assert (run / "checkpoints" / "1").is_dir()
    cfg = json.loads((run / "hf" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and (run / "hf" / "tokenizer.json").exists()
