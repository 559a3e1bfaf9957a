"""The prefill benchmark's smoke run on the tiny model: the split prefill computes fewer token
slots than one padded to the longest prompt, and both sample the same tokens."""

from __future__ import annotations

import json

import pytest

from benchmarks import prefill as bench
from tests.benchmarks import assert_usage_error
from tests.train.tiny_model import make_tiny_model


def test_split_prefills_fewer_tokens(tmp_path, capsys):
    tiny = make_tiny_model(str(tmp_path / "model"))
    summary = bench.main([f"--model={tiny}", "--lengths=3,100,7,90,20", "--new_tokens=4", "--repeats=1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))
    whole, split = summary["variants"]["whole"], summary["variants"]["split"]
    assert [list(c) for c in whole["chunks"]] == [[0, 8, 128]] and whole["tokens_prefilled"] == 8 * 128
    # 5 prompts in a batch of 8, longest first: halves would be 4 x 128 + 4 x 64; quarters are
    # 2 x 128 + 2 x 64 + 2 x 64, the last two rows (bucket padding) left out
    assert split["tokens_prefilled"] == 2 * 128 + 2 * 64 + 2 * 64 and len(split["chunks"]) == 3
    for r in (whole, split):
        assert r["call_seconds"] > 0 and r["prefill_seconds"] > 0
    assert summary["split_speedup"] > 0 and summary["prefill_speedup"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--lengths=5,x"], "--lengths must be comma-separated positive integers, got '5,x'"),
    (["--new_tokens=0"], "--new_tokens must be >= 1"),
    (["--repeats=0"], "--repeats must be >= 1"),
    (["--model=/nonexistent/model"], "--model: "),
])
def test_bad_arguments_get_one_clear_error(argv, needle, capsys):
    assert_usage_error(bench.main, argv, needle, capsys)
