"""The Playpen protocol end to end, as one command: baseline, SFT, DPO, GRPO, and their evaluations.

    python -m train.experiment --config=configs/experiments/playpen_cpu.py [--config.key=value ...]

Stages, each a `train.main` run (or `playpen_jax.tasks`) in its own directory under `out_dir`:

1. `eval/base`: the starting model's clemscore on `eval_limit` unseen (`eval_split`) instances of
   every training game and every held-out game, and its TFDS benchmark scores (`tasks`, read from
   `tasks_data_dir`; a task whose dataset is not prepared there is reported as such).
2. `sft`: SFT on the strong programmatic players' episodes of the training games.
3. `dpo`, `grpo`: each starting from the SFT stage's model (`init=sft`) or the base model.
4. `eval/<method>`: every trained model evaluated as in 1.
5. With `grpo_control`, `grpo_control`: the GRPO stage's run again with `grpo.rollout_only=true`,
   i.e. its starting model playing the same steps' draws with the same sampling keys and never
   updated. Each GRPO step draws its own instances, so its training curve moves with the draws as
   much as with the policy; the report sets GRPO's per-step reward, % played and % won beside the
   control's.

`common` holds overrides (`;`-separated KEY=VALUE) given to every training and game-evaluation
stage, e.g. `model.matmul_dtype=bfloat16`; `sft`, `dpo`, `grpo` those of one training stage.

A stage whose outputs exist is not run again, and a training stage cut short resumes from its last
checkpoint: running the command again continues the experiment. `budget_minutes` (0: none) stops
starting stages once that much wall time has passed in this invocation. The report:

- `results.json`: every score, each stage's wall time and command;
- `results.md`: clemscore per game per method (training games' unseen instances, held-out games),
  TFDS scores, GRPO against its control, and the stages' commands and times, ready for RESULTS.md;
- `clemscore.png` (per game per method) and `curves.png` (each training stage's reward or loss per
  step, and the control's reward).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Optional

from ml_collections import ConfigDict

from playpen_jax.config import ConfigError, parse

METHODS = ("sft", "dpo", "grpo")
# the GRPO control stage's settings on top of the GRPO stage's: no update, no export, no in-run eval
CONTROL = ("grpo.rollout_only=true", "export.hf=false", "eval.every=0", "eval.at_start=false")


class ExperimentError(RuntimeError):
    """A stage failed; the message names it and its run directory."""


def check(c: ConfigDict) -> list:
    """The training stages to run, after checking the experiment config (ConfigError on a bad value)."""
    for key in ("out_dir", "model", "train_games", "heldout_games", "eval_split", "methods", "init",
                "tasks", "tasks_data_dir", "sft", "dpo", "grpo", "grpo_control"):
        if key not in c:
            raise ConfigError(f"experiment config lacks {key!r} "
                              "(start from configs/experiments/playpen_cpu.py)")
    methods = [m.strip() for m in c.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or len(set(methods)) != len(methods):
        raise ConfigError(f"config.methods={c.methods!r}: expected distinct names from {', '.join(METHODS)}")
    if c.init not in ("sft", "base") or (c.init == "sft" and "sft" not in methods and
                                           any(m != "sft" for m in methods)):
        raise ConfigError(f"config.init={c.init!r}: 'base', or 'sft' with sft among the methods")
    for key in ("eval_limit", "tasks_limit", "eval_max_new_tokens"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ConfigError(f"config.{key}={c[key]!r}: must be an integer >= 1")
    if not isinstance(c.grpo_control, bool) or (c.grpo_control and "grpo" not in methods):
        raise ConfigError(f"config.grpo_control={c.grpo_control!r}: true (with grpo among the methods) "
                          "or false")
    if not isinstance(c.budget_minutes, (int, float)) or not c.budget_minutes >= 0:
        raise ConfigError(f"config.budget_minutes={c.budget_minutes!r}: must be >= 0")
    for m in ["common"] + methods:
        _overrides(c, m)
    return methods


def _overrides(c: ConfigDict, method: str) -> list:
    """(key, value) pairs of `c[method]` ("common": those of every stage, evaluations included)."""
    out = []
    for part in c.get(method, "").split(";"):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"config.{method}: {part.strip()!r} is not KEY=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def train_argv(c: ConfigDict, method: str, model: str, run: str, resume: bool) -> list:
    """The `train.main` arguments of a training stage."""
    argv = [f"--config=configs/{method}.py", f"--config.model.name={model}",
            f"--config.run_dir={run}", f"--config.seed={int(c.seed)}",
            f"--config.games.names={c.train_games}", f"--config.eval.games={c.train_games}",
            "--config.eval.split=validation", "--config.log.progress=false",
            f"--config.resume={str(resume).lower()}"]
    return argv + [f"--config.{k}={v}" for k, v in _overrides(c, "common") + _overrides(c, method)]


def eval_argv(c: ConfigDict, games: str, model: str, run: str) -> list:
    """The `train.main` arguments of a game evaluation."""
    argv = ["--config=configs/eval.py", f"--config.model.name={model}", f"--config.run_dir={run}",
            f"--config.seed={int(c.seed)}", f"--config.eval.games={games}",
            f"--config.games.names={games}", f"--config.eval.split={c.eval_split}",
            f"--config.eval.limit={int(c.eval_limit)}", "--config.log.progress=false",
            f"--config.eval.max_new_tokens={int(c.eval_max_new_tokens)}"]
    return argv + [f"--config.{k}={v}" for k, v in _overrides(c, "common")]


class Experiment:
    def __init__(self, c: ConfigDict, argv: list):
        self.c = c
        self.argv = argv
        self.out = os.path.expanduser(c.out_dir)
        self.start = time.monotonic()
        self.path = os.path.join(self.out, "results.json")
        self.results = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.results = json.load(f)
        self.results.setdefault("stages", {})
        self.results.setdefault("scores", {})

    # ----- bookkeeping ---------------------------------------------------------------------------
    def _save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        tmp = self.path + ".partial"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=2)
        os.replace(tmp, self.path)

    def out_of_budget(self) -> bool:
        b = float(self.c.budget_minutes)
        return b > 0 and time.monotonic() - self.start > 60 * b

    def _stage(self, name: str, fn) -> Optional[dict]:
        """Runs fn() unless the stage is recorded as done; records its wall time."""
        done = self.results["stages"].get(name)
        if done and done.get("status") == "done":
            return done
        if self.out_of_budget():
            self.results["stages"][name] = {"status": "skipped (budget)"}
            self._save()
            return None
        # A stage stopped part-way (failed, interrupted, killed) is resumed by its next run;
        # "seconds" is the last run's wall time, so the runs are counted to say so. A killed run
        # leaves its stage "running".
        attempts = (done or {}).get("attempts", 0) + 1
        self.results["stages"][name] = {**(done or {}), "status": "running", "attempts": attempts}
        self._save()
        t = time.monotonic()
        print(f"== {name}", file=sys.stderr)
        try:
            info = fn() or {}
        except BaseException:
            self.results["stages"][name]["status"] = "stopped part-way"
            self._save()
            raise
        info.update({"status": "done", "seconds": round(time.monotonic() - t, 1),
                     "attempts": attempts})
        self.results["stages"][name] = info
        self._save()
        return info

    @staticmethod
    def _main(argv: list, where: str) -> None:
        from train import main as train_main

        code = train_main.main(argv)
        if code != 0:
            raise ExperimentError(f"stage {where} failed (exit {code}); its run directory keeps what it "
                                  f"did; run the experiment again to resume it")

    # ----- stages --------------------------------------------------------------------------------
    def train(self, method: str, model: str, name: Optional[str] = None, extra: tuple = ()) -> str:
        """Runs configs/<method>.py from `model` in out/<name> (default: the method), with `extra`
        overrides (KEY=VALUE) after the experiment's."""
        name = name or method
        run = os.path.join(self.out, name)
        c = self.c

        def go():
            import shutil

            resume = os.path.isdir(os.path.join(run, "checkpoints"))
            if not resume:   # killed before its first checkpoint: start over, without its old metrics
                shutil.rmtree(run, ignore_errors=True)
            argv = train_argv(c, method, model, run, resume) + [f"--config.{kv}" for kv in extra]
            self._main(argv, name)
            return {"command": "python -m train.main " + " ".join(argv), "model": model,
                    "run_dir": run}

        self._stage(f"train/{name}", go)
        return os.path.join(run, "hf")

    def evaluate(self, label: str, model: str) -> None:
        c = self.c
        for part, games in (("train_games", c.train_games), ("heldout_games", c.heldout_games)):
            run = os.path.join(self.out, "eval", label, part)

            def go(run=run, games=games):
                import shutil

                shutil.rmtree(run, ignore_errors=True)   # an eval cut short starts over
                argv = eval_argv(c, games, model, run)
                self._main(argv, f"eval/{label}/{part}")
                with open(os.path.join(run, "eval", "step_0", "results.json"), encoding="utf-8") as f:
                    res = json.load(f)
                self.results["scores"].setdefault(label, {})[part] = {
                    "clemscore": res["clemscore"], "played": res["played"], "quality": res["quality"],
                    "games": {g: s["clemscore"] for g, s in res["games"].items()}}
                return {"command": "python -m train.main " + " ".join(argv)}

            self._stage(f"eval/{label}/{part}", go)
        if c.tasks.strip():
            self._tasks_stage(label, model)

    def _task_names(self) -> list:
        return [t.strip() for t in self.c.tasks.split(",") if t.strip()]

    def _tasks_stage(self, label: str, model: str) -> None:
        """A tasks stage done while some datasets were not prepared runs again, for those only,
        once they are."""
        from playpen_jax import tasks

        name = f"tasks/{label}"
        done = self.results["stages"].get(name)
        if done and done.get("status") == "done":
            old = self.results["scores"].get(label, {}).get("tasks", {})
            data_dir = os.path.expanduser(self.c.tasks_data_dir)
            if any("error" in old.get(t, {"error": ""}) and t in tasks.TASKS
                   and tasks.is_prepared(tasks.get(t), data_dir) for t in self._task_names()):
                done["status"] = "to complete (datasets prepared since)"
        self._stage(name, lambda: self._tasks(label, model))

    def _tasks(self, label: str, model_path: str) -> dict:
        from models import registry
        from playpen_jax import tasks

        model = registry.load(model_path)
        old = self.results["scores"].get(label, {}).get("tasks", {})
        scores = {}
        for name in self._task_names():
            if name in old and "error" not in old[name]:
                scores[name] = old[name]
                continue
            try:
                scores[name] = tasks.evaluate(model, [name], os.path.expanduser(self.c.tasks_data_dir),
                                              limit=int(self.c.tasks_limit))[name]
            except tasks.TaskError as e:   # e.g. not prepared here: reported, the rest goes on
                scores[name] = {"error": str(e)}
        self.results["scores"].setdefault(label, {})["tasks"] = scores
        return {}

    # ----- the whole protocol --------------------------------------------------------------------
    def run(self, methods: list) -> None:
        c = self.c
        self.results["config"] = c.to_dict()
        self.results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
        self.results["command"] = "python -m train.experiment " + " ".join(self.argv)
        self.results["date"] = datetime.date.today().isoformat()
        self.evaluate("base", c.model)
        sft_model = None
        for m in methods:
            start = sft_model if (m != "sft" and c.init == "sft") else c.model
            model = self.train(m, start)
            if self.results["stages"].get(f"train/{m}", {}).get("status") != "done":
                continue   # skipped for the budget
            if m == "sft":
                sft_model = model
            self.evaluate(m, model)
            if m == "grpo" and c.grpo_control:
                self.train("grpo", start, name="grpo_control", extra=CONTROL)
        report(self.out, self.results, methods)


# ----- the report ------------------------------------------------------------------------------------

def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def report(out: str, results: dict, methods: list) -> None:
    """results.md, clemscore.png and curves.png from results.json's scores and the runs' metrics."""
    labels = [lb for lb in ["base"] + methods if lb in results["scores"]]
    scores = results["scores"]
    lines = [f"# Playpen experiment ({results.get('date', '')}, {results.get('machine', '')})", "",
             f"`{results.get('command', '')}`", ""]
    for part, title in (("train_games", "Training games, unseen instances"),
                        ("heldout_games", "Held-out games")):
        games = sorted({g for lb in labels for g in scores[lb].get(part, {}).get("games", {})})
        lines += [f"## {title}: clemscore", "", "| game | " + " | ".join(labels) + " |",
                  "|---" * (len(labels) + 1) + "|"]
        for g in games:
            lines.append(f"| {g} | " + " | ".join(_fmt(scores[lb].get(part, {}).get("games", {}).get(g))
                                                    for lb in labels) + " |")
        lines.append("| **all** | " + " | ".join(_fmt(scores[lb].get(part, {}).get("clemscore"))
                                                  for lb in labels) + " |")
        lines.append("")
    tasks = sorted({t for lb in labels for t in scores[lb].get("tasks", {})})
    if tasks:
        lines += ["## Standard benchmarks (TFDS): acc / exact match", "",
                  "| task | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for t in tasks:
            cells = []
            for lb in labels:
                s = scores[lb].get("tasks", {}).get(t, {})
                if "error" in s:
                    cells.append("not prepared" if "not prepared" in s["error"] else "error")
                else:
                    cells.append(_fmt(s.get("acc", s.get("exact_match"))))
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _control_table(out)
    lines += ["## Stages", "", "| stage | status | minutes |", "|---|---|---|"]
    for name, info in results["stages"].items():
        secs, runs = info.get("seconds"), info.get("attempts", 1)
        cell = "-" if secs is None else f"{secs / 60:.1f}" + (f" (the last of {runs} runs)" if runs > 1
                                                              else "")
        lines.append(f"| {name} | {info.get('status')} | {cell} |")
    lines += [""] + [f"- `{name}`: `{info['command']}`" for name, info in results["stages"].items()
                     if "command" in info]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plots(out, results, labels, methods)


def _train_rows(path: str) -> list:
    from playpen_jax.metrics import read_jsonl

    return [r for r in read_jsonl(path) if r.get("split") == "train"] if os.path.exists(path) else []


def _control_table(out: str, windows: int = 4) -> list:
    """results.md lines: GRPO's and its control's rollouts (reward, % played, % won), episode-weighted
    over up to `windows` windows of the steps both logged; none without a control run."""
    runs = {"GRPO": _train_rows(os.path.join(out, "grpo", "metrics.jsonl")),
            "control (no updates)": _train_rows(os.path.join(out, "grpo_control", "metrics.jsonl"))}
    by_step = {k: {r["step"]: r for r in rows if r.get("episodes")} for k, rows in runs.items()}
    steps = sorted(set.intersection(*(set(v) for v in by_step.values())))
    if not steps:
        return []
    k = min(windows, len(steps))
    cuts = [steps[len(steps) * i // k:len(steps) * (i + 1) // k] for i in range(k)]
    heads = [f"{w[0]}-{w[-1]}" if len(w) > 1 else f"{w[0]}" for w in cuts]
    lines = ["## GRPO against its control (its starting model on the same draws, never updated)", "",
             "| steps | " + " | ".join(heads) + " |", "|---" * (k + 1) + "|"]
    for key, label, scale in (("reward", "mean reward", 1.0), ("played", "% played", 1.0),
                              ("success", "% won", 100.0)):
        for run, rows in by_step.items():
            cells = []
            for w in cuts:
                n = sum(rows[s]["episodes"] for s in w)
                cells.append(f"{scale * sum(rows[s][key] * rows[s]['episodes'] for s in w) / n:.3g}")
            lines.append(f"| {label}, {run} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plots(out: str, results: dict, labels: list, methods: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scores = results["scores"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, part, title in ((axes[0], "train_games", "training games, unseen instances"),
                            (axes[1], "heldout_games", "held-out games")):
        games = sorted({g for lb in labels for g in scores[lb].get(part, {}).get("games", {})}) + ["all"]
        x = np.arange(len(games))
        width = 0.8 / max(1, len(labels))
        for i, lb in enumerate(labels):
            s = scores[lb].get(part, {})
            vals = [s.get("games", {}).get(g, np.nan) if g != "all" else s.get("clemscore", np.nan)
                    for g in games]
            ax.bar(x + i * width, [0 if v is None else v for v in vals], width, label=lb)
        ax.set_xticks(x + width * (len(labels) - 1) / 2, games, rotation=45, ha="right")
        ax.set_ylabel("clemscore")
        ax.set_title(title)
        if labels:
            ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "clemscore.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = [(m, m) for m in methods] + ([("grpo_control", "grpo control")] if "grpo" in methods else [])
    for m, label in runs:
        rows = _train_rows(os.path.join(out, m, "metrics.jsonl"))
        key = "reward" if m.startswith("grpo") else "loss"
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=f"{label} {key}", linestyle="--" if m == "grpo_control" else "-")
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def _lock(out: str):
    """Holds `out/experiment.pid` while the experiment runs: a second invocation on the same out_dir
    (whose stages would write into the same run directories) is refused while the first is alive."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "experiment.pid")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _alive(pid):
                raise ExperimentError(f"{out} is in use by another run of this experiment (pid {pid}); "
                                      f"wait for it or stop it first") from None
            os.remove(path)   # left by a run that is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        c = parse(argv)
        methods = check(c)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exp = Experiment(c, argv)
    try:
        with _lock(exp.out):
            exp.run(methods)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"results: {os.path.join(exp.out, 'results.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
