"""The turns benchmark's smoke run on the tiny model: with the prefix cache a multi-turn game's
later turns prefill only what they add, and the episodes play the same replies as without it."""

from __future__ import annotations

import json

import pytest

from benchmarks import turns as bench
from tests.benchmarks import assert_usage_error
from tests.train.tiny_model import make_tiny_model


def test_later_turns_prefill_only_what_they_add(tmp_path, capsys):
    tiny = make_tiny_model(str(tmp_path / "model"))
    # privateshared asks its questions turn after turn whatever the answers (the tiny model's are noise)
    summary = bench.main([f"--model={tiny}", "--games=privateshared", "--limit=2", "--max_new_tokens=4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))
    whole, cached = summary["variants"]["whole"], summary["variants"]["cached"]
    assert summary["same_replies"] is True
    assert whole["turns"] == cached["turns"] > 2 * whole["episodes"]
    assert whole["tokens_prefilled"] == whole["prompt_tokens"] == cached["prompt_tokens"]
    # the first turn of each episode is prefilled whole, each later one only in part
    assert cached["tokens_prefilled"] < 0.6 * cached["prompt_tokens"]
    assert summary["prefilled_fraction"] == round(cached["tokens_prefilled"] / cached["prompt_tokens"], 3)
    assert summary["speedup"] > 0 and whole["compiles"] > 0 and cached["compiles"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--limit=0"], "--limit must be >= 1, got 0"),
    (["--temperature=-1"], "--temperature must be >= 0"),
    (["--games=nosuchgame"], "--games: "),
    (["--model=/nonexistent/model"], "--model: "),
])
def test_bad_arguments_get_one_clear_error(argv, needle, capsys):
    assert_usage_error(bench.main, argv, needle, capsys)
