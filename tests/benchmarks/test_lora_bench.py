"""The LoRA benchmark's smoke run on the tiny model: each mode's bytes are what its trees hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import lora as bench
from models import lora, registry
from tests.train.tiny_model import make_tiny_model


@pytest.mark.slow
def test_modes_hold_what_they_train(tmp_path, capsys):
    tiny = make_tiny_model(str(tmp_path / "model"))
    summary = bench.main([f"--model={tiny}", "--size=2x32", "--rank=2", "--repeats=1", "--block=8",
                           "--modes=full,qlora-int4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))
    r = summary["results"]
    cfg = registry.load(tiny).config
    shapes = lora.param_shapes(cfg, lora.LoraSpec.parse(2, 4.0, "all"))
    adapter_bytes = 4 * sum(int(np.prod(s)) for t in shapes.values() for s in t.values())
    full_bytes = 4 * cfg.num_params()
    assert r["full"]["trained"] == r["full"]["reference"] == full_bytes and r["full"]["base"] == 0
    assert r["full"]["optimizer"] >= 2 * full_bytes
    for mode in ("qlora-int4",):
        assert r[mode]["trained"] == adapter_bytes and r[mode]["reference"] == 0, mode
        assert r[mode]["seconds"] > 0 and r[mode]["peak"] == r[mode]["held"] + r[mode]["temporaries"]
        assert summary["peak_vs_full"][mode] < 1
    assert set(r) == {"full", "qlora-int4"} and r["qlora-int4"]["base"] < full_bytes / 2
    assert summary["v5e8_total_gib"]["full"] > summary["v5e8_total_gib"]["qlora-int4"]
    # tpu.memory's estimate for this very run counts at least the arrays the step holds, and less
    # for the adapters than for full training; the CPU's allocator keeps no peak
    for mode in ("full", "qlora-int4"):
        assert r[mode]["estimate"] >= r[mode]["held"], mode
    assert r["full"]["estimate"] > r["qlora-int4"]["estimate"]
    assert summary["device_peak"] is None
