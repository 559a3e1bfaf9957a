"""The GRPO-variants benchmark: every variant's config is valid, arguments are checked before any run,
and a short run of two variants on the tiny model writes its curves, table and JSON."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from benchmarks import grpo_variants as bench
from playpen_jax.config import parse, validate


@pytest.mark.parametrize("tiny", [True, False])
@pytest.mark.parametrize("slug", list(bench.VARIANTS))
def test_every_variant_config_is_valid(slug, tiny, tmp_path):
    over = bench.run_overrides(slug, "tiny-dir" if tiny else "smollm2-135m-instruct", "colourname", 3, 7,
                               str(tmp_path / slug), tiny, {})
    c = validate(parse(bench.to_argv(over)))
    for key, value in bench.VARIANTS[slug][1].items():
        section, name = key.split(".")
        assert c[section][name] == value, key
    assert (c.seed, c.steps, c.games.names) == (7, 3, "colourname")
    assert (c.export.hf, c.eval.at_start, c.eval.every, c.checkpoint.every) == (False, False, 0, 0)
    if slug == "dapo":   # L_cache: a fifth of the reply budget, at least one token
        assert c.grpo.overlong_buffer == (1 if tiny else c.rollout.max_new_tokens // 5)


def test_variants_differ_in_the_keys_their_papers_name():
    v = {slug: over for slug, (_, over) in bench.VARIANTS.items()}
    assert {k for over in v.values() for k in over} == set(v["grpo"])   # all set the same keys
    assert (v["grpo"]["grpo.aggregation"], v["grpo"]["grpo.beta"]) == ("sequence-mean", 0.04)
    assert (v["dapo"]["grpo.clip_eps_high"], v["dapo"]["grpo.dynamic_sampling"]) == (0.28, True)
    assert v["dr_grpo"]["grpo.advantage_scale"] == "none"
    assert v["gspo"]["grpo.ratio_level"] == "sequence" and v["gspo"]["grpo.clip_eps"] < 1e-3


def test_variant_names_and_moving_average():
    assert bench.pick_variants("Dr. GRPO, gspo,dr-grpo") == ["dr_grpo", "gspo"]
    np.testing.assert_allclose(bench.moving_average([1, 3, 5, 7], 2), [1, 2, 4, 6])


@pytest.mark.parametrize("argv, needle", [
    (["--variants=ppo"], "unknown variant 'ppo'"),
    (["--variants=,"], "names no variant"),
    (["--set=grpo.beta"], "KEY=VALUE"),
    (["--steps=0"], "--steps=0"),
    (["--game=colourname,wordle"], "exactly one game"),
    (["--set=grpo.aggregation=token-mean"], "variant GSPO"),   # GSPO needs a per-sequence loss
    (["--set=grpo.nope=1"], "unknown config key"),
    (["--tiny", "--model=other"], "exclude each other"),
])
def test_bad_arguments_are_named_before_any_run(argv, needle, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(bench.BenchmarkError, match=needle):
        bench.main(argv + [f"--out={out}"])
    assert not out.exists()


def test_an_existing_run_dir_is_refused(tmp_path):
    (tmp_path / "gspo").mkdir()
    with pytest.raises(bench.BenchmarkError, match="gspo already exists"):
        bench.main([f"--out={tmp_path}", "--variants=grpo,gspo"])
    assert not (tmp_path / "grpo").exists()


@pytest.mark.slow
def test_two_variants_on_the_tiny_model_write_curves_table_and_json(tmp_path, capsys):
    summary = bench.main([f"--out={tmp_path}", "--steps=2", "--variants=dapo,GSPO", "--set=grpo.group_size=2",
                          "--set=grpo.groups_per_step=2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))
    assert summary["failed"] == {} and list(summary["variants"]) == ["DAPO", "GSPO"]
    for label, slug in (("DAPO", "dapo"), ("GSPO", "gspo")):
        s = summary["variants"][label]
        assert s["steps"] == 2 and len(s["rewards"]) == 2
        assert all(-0.5 <= r <= 1.0 for r in s["rewards"])
        assert math.isclose(s["first3"], float(np.mean(s["rewards"])))
        assert s["wall_seconds"] > 0
        cfg = json.loads((tmp_path / slug / "config.json").read_text())
        assert cfg["model"]["name"] == str(tmp_path / "tiny_model") and cfg["steps"] == 2
    dapo = json.loads((tmp_path / "dapo" / "config.json").read_text())["grpo"]
    assert (dapo["overlong"], dapo["overlong_buffer"], dapo["dynamic_sampling"]) == ("penalty", 1, True)
    gspo = json.loads((tmp_path / "gspo" / "config.json").read_text())["grpo"]
    assert (gspo["ratio_level"], gspo["aggregation"], gspo["beta"]) == ("sequence", "sequence-mean", 0.0)
    assert (tmp_path / "grpo_variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "grpo_variants.md").read_text()
    assert "| DAPO | 2 |" in md and "| GSPO | 2 |" in md
    assert os.path.isfile(tmp_path / "tiny_model" / "tokenizer.json")
