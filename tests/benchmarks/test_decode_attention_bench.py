"""The decode-attention benchmark's smoke run: it checks ours against torch's attention before it
reports, and its JSON line is what it returns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import decode_attention as bench
from models import llama
from tests.benchmarks import assert_usage_error


def test_small_shapes_report_every_key(capsys):
    summary = bench.main(["--batches=1,3", "--slots=16", "--repeats=2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))
    assert sorted(summary["shapes"]) == ["1x16", "3x16"]
    for r in summary["shapes"].values():
        assert r["max_abs_diff"] < 1e-4
        for key in ("ours_ms", "torch_ms", "ours_gb_s", "torch_gb_s", "read_gb_s", "vs_torch"):
            assert r[key] > 0, key
        assert r["step_ms"] == pytest.approx(r["ours_ms"] * summary["layers"])
    assert summary["vs_torch"] == max(r["vs_torch"] for r in summary["shapes"].values())


@pytest.mark.parametrize("argv, needle", [
    (["--batches=2,x"], "--batches must be comma-separated positive integers, got '2,x'"),
    (["--slots=0"], "--slots must be comma-separated positive integers"),
    (["--repeats=0"], "--repeats must be >= 1"),
    (["--preset=nope"], "unknown preset 'nope'"),
])
def test_bad_arguments_get_one_clear_error(argv, needle, capsys):
    assert_usage_error(bench.main, argv, needle, capsys)


def test_masked_slots_do_not_count():
    """The case's left padding is honoured: changing a masked slot's key and value changes nothing."""
    c = bench.case(2, 32, 4, 2, 8)
    assert not c["mask"][1, 0, :8].any() and c["mask"][0].all()
    out = np.asarray(llama._attention(c["q"], c["k"], c["v"], c["mask"], slots_last=True))
    c["k"][1, :, :, :8] += 5.0
    c["v"][1, :, :8] -= 3.0
    again = np.asarray(llama._attention(c["q"], c["k"], c["v"], c["mask"], slots_last=True))
    np.testing.assert_allclose(out, again, rtol=0, atol=1e-6)
    c["v"][1, :, 8] += 1.0   # an unmasked slot does count
    assert np.abs(np.asarray(llama._attention(c["q"], c["k"], c["v"], c["mask"], slots_last=True))
                  - out).max() > 1e-3
