"""The train-step benchmark's smoke run on a tiny model: every reported number is there and sane."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import train_step as bench
from tests.train.tiny_model import make_tiny_model

TINY_GAME = ["games.names=colourname", "games.learner_roles=all", "batch.max_seq_len=256",
             "eval.games=colourname", "grpo.drop_zero_variance=false"]


@pytest.fixture(scope="module")
def quick_argv(tmp_path_factory):
    tiny = make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))
    return ["--quick", f"--model={tiny}"] + [f"--override={o}" for o in TINY_GAME]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_run_reports_every_key(quick_argv, capsys):
    summary = bench.main(quick_argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))
    assert "| rows x seq |" in "\n".join(out)
    for key in ("best_mfu", "vs_bare_lm_step", "rollout_share", "update_share", "env_share",
                "roof_gflops"):
        assert _positive(summary[key]), (key, summary[key])
    assert set(summary["tokens_per_second"]) == set(summary["mfu"]) == {"2x64"}
    assert _positive(summary["tokens_per_second"]["2x64"]) and _positive(summary["mfu"]["2x64"])
    assert summary["best_mfu"] == summary["mfu"]["2x64"]
    row = summary["rows"][0]
    assert row["tokens"] == 2 * 64 and _positive(row["beta0_seconds"])
    assert math.isfinite(summary["reference_forward_share"])
    # The shares are parts of one iteration / of one rollout.
    assert summary["rollout_share"] + summary["update_share"] <= 1.0
    assert summary["env_share"] <= 1.0
    it = summary["iterations"]["iterations"]
    assert len(it) == 1 and it[0]["episodes"] == 2 and it[0]["update_seconds"] > 0


@pytest.mark.slow
def test_quick_run_with_bf16_weight_matmuls(quick_argv, capsys):
    summary = bench.main(quick_argv + ["--matmul_dtype=bfloat16", "--iterations=0"])
    assert summary["matmul_dtype"] == "bfloat16" and summary["dtype"] == "float32"
    assert "(bfloat16 weight matmuls)" in capsys.readouterr().out
    assert _positive(summary["tokens_per_second"]["2x64"]) and _positive(summary["roof_gflops"])


@pytest.mark.parametrize("argv, needle", [
    (["--sizes=4by64"], "ROWSxSEQ"),
    (["--sizes=0x64"], "ROWSxSEQ"),
    (["--override=grpo.beta"], "KEY=VALUE"),
    (["--repeats=0"], "--repeats=0"),
])
def test_bad_arguments_are_named(argv, needle):
    with pytest.raises(ValueError, match=needle):
        bench.main(argv + ["--iterations=0"])
