"""Reward curves of short GRPO-family runs, one per variant, on one game.

    python -m benchmarks.grpo_variants                       # tiny test model, colourname, 16 steps
    python -m benchmarks.grpo_variants --variants=grpo,dapo --steps=4 --out=/tmp/gv
    python -m benchmarks.grpo_variants --model=smollm2-135m-instruct --game=wordle \\
        --set games.learner_roles=all --set rollout.max_new_tokens=32

The default run takes 3 to 4 minutes on a 2-core CPU.

Each variant is a set of `configs/grpo.py` overrides named after its paper:

    GRPO      (Shao et al. 2024)  sequence-mean loss, advantages scaled by the group's std,
                                  symmetric clip 0.2, k3 KL to the reference with beta 0.04
    DAPO      (Yu et al. 2025)    token-mean loss, clip-higher 0.2 / 0.28, no KL, dynamic sampling
                                  (refill up to grpo.max_refill_rounds), soft overlong penalty
    Dr. GRPO  (Liu et al. 2025)   sum over tokens / max_new_tokens per sequence, no std scaling,
                                  no KL, symmetric clip 0.2
    GSPO      (Zheng et al. 2025) one length-normalised ratio per sequence, sequence-mean loss,
                                  clip 3e-4 / 4e-4, no KL

Every variant sets all of these keys (aggregation, advantage_scale, clip_eps, clip_eps_high,
ratio_level, kl, beta, dynamic_sampling, overlong), so no variant inherits another's choice from the
config file. DAPO's overlong buffer L_cache is a fifth of `rollout.max_new_tokens` (at least one
token; the paper's 4096 of 20480) unless `--set grpo.overlong_buffer=N` gives it. Everything else is
shared: `grpo.drop_zero_variance` (default true: a group whose rewards all tie trains nothing in any
variant), `grpo.updates_per_batch` (default 1: one optimizer step per rollout batch, so the ratio
starts at 1 and the clip ranges matter little), the learning rate and the group sizes.

Each variant is one `train.main` run, in this process, in its own run directory `--out/<variant>`,
with the same seed and therefore the same training instances at every step (DAPO's refills draw
more). Evals are minimal (none at the start, one instance at the end), there are no intermediate
checkpoints, no HF export, no TensorBoard and no progress bar. `--set KEY=VALUE` (repeatable)
changes the config of every variant and is applied last.

The default model is the tiny random test model (`tests/train/tiny_model.py`, built in
`--out/tiny_model`) with the settings under which it learns the `colourname` test game within a
few dozen steps: every role, groups of 8 on 4 instances per step, learning rate 0.03, 4 new tokens,
sequences of at most 128 tokens. The embedded SmolLM2-135M-Instruct is of little use here on a
CPU: on referencegame, wordle, taboo and privateshared it broke the answer format in every episode
of a first step (all rewards equal, no signal), on colourname it answered with a colour in 1 of 32
episodes, and a step of 32 episodes takes it one to two minutes on 2 cores, so a run of a few steps
per variant cannot show a trend. With `--model` (any name or path `train.main` reads) the config
file's learning rate and group sizes apply, with every role of the game played by the learner.

Output: `--out/grpo_variants.png` (reward per step of each variant: the raw values as a thin line
and a trailing moving average of `--window` steps), `--out/grpo_variants.md` (a table: variant,
steps, mean reward of the first and of the last 3 steps, updates = steps that trained rows, wall
seconds of the run) and, as the last line printed, the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "grpo.py")
TINY = "tiny"

# Variants: slug -> (label as in the paper, overrides). Every GRPO-family key is set by every variant.
# What every variant sets (so that none takes a value from the config file), then each one's own.
# Two optimizer steps per rollout batch: the second one is off-policy, so the clip ranges act.
_COMMON = {
    "grpo.aggregation": "sequence-mean", "grpo.advantage_scale": "std", "grpo.clip_eps": 0.2,
    "grpo.clip_eps_high": 0.2, "grpo.ratio_level": "token", "grpo.kl": "none", "grpo.beta": 0.0,
    "grpo.dynamic_sampling": False, "grpo.overlong": "none", "grpo.updates_per_batch": 2}
VARIANTS = {
    "grpo": ("GRPO", {**_COMMON, "grpo.kl": "k3", "grpo.beta": 0.04}),
    "dapo": ("DAPO", {**_COMMON, "grpo.aggregation": "token-mean", "grpo.clip_eps_high": 0.28,
                      "grpo.dynamic_sampling": True, "grpo.overlong": "penalty"}),
    "dr_grpo": ("Dr. GRPO", {**_COMMON, "grpo.aggregation": "sequence-sum-norm",
                             "grpo.advantage_scale": "none"}),
    "gspo": ("GSPO", {**_COMMON, "grpo.clip_eps": 3e-4, "grpo.clip_eps_high": 4e-4,
                      "grpo.ratio_level": "sequence"}),
}

# The tiny test model learns colourname with these (tests/train/test_train.py).
TINY_SETTINGS = {
    "games.learner_roles": "all", "grpo.group_size": 8, "grpo.groups_per_step": 4,
    "optimizer.learning_rate": 0.03, "rollout.max_new_tokens": 4, "batch.max_seq_len": 128,
}
# Any other model: the config file's values, but the learner plays every role of the game.
MODEL_SETTINGS = {"games.learner_roles": "all"}

EDGE = 3   # steps averaged at each end of a curve for the table


class BenchmarkError(ValueError):
    """A benchmark argument is malformed, or a run failed."""


def make_tiny_model_dir(path: str) -> str:
    """Writes the tiny random test model (`tests.train.tiny_model.make_tiny_model`) at `path`,
    unless a model directory is already there, and returns `path`.

    That module lives with the tests and is importable from the repository root only. Importing it
    imports `tests/conftest.py`, which asks for 8 simulated CPU devices and the highest matmul
    precision; both are put back as they were before any device is used."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import jax

    saved_env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    saved_precision = jax.config.jax_default_matmul_precision
    try:
        from tests.train.tiny_model import make_tiny_model
    except ImportError as e:
        raise BenchmarkError(f"--model={TINY} needs tests/train/tiny_model.py, importable from the "
                             f"repository root (run from there, or pass --model): {e}") from None
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        jax.config.update("jax_default_matmul_precision", saved_precision)
    return make_tiny_model(path)


def parse_sets(items) -> dict:
    """`KEY=VALUE` strings (config keys without the `config.` prefix) as an ordered dict."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if key.startswith("config."):
            key = key[len("config."):]
        if not eq or not key:
            raise BenchmarkError(f"--set {item!r}: expected KEY=VALUE (e.g. grpo.group_size=4)")
        out[key] = value
    return out


def pick_variants(text: str) -> list:
    """Variant slugs from a comma-separated list of slugs or labels ("dr_grpo", "Dr. GRPO", "drgrpo")."""
    def norm(s):
        return re.sub(r"[^a-z0-9]", "", s.lower())

    by_name = {norm(slug): slug for slug in VARIANTS}
    by_name.update({norm(label): slug for slug, (label, _) in VARIANTS.items()})
    picked = []
    for part in text.split(","):
        if not part.strip():
            continue
        slug = by_name.get(norm(part))
        if slug is None:
            raise BenchmarkError(f"--variants: unknown variant {part.strip()!r}; "
                                 f"known: {', '.join(VARIANTS)}")
        if slug not in picked:
            picked.append(slug)
    if not picked:
        raise BenchmarkError(f"--variants={text!r} names no variant; known: {', '.join(VARIANTS)}")
    return picked


def run_overrides(slug: str, model: str, game: str, steps: int, seed: int, run_dir: str,
                  tiny: bool, sets: dict) -> dict:
    """The config overrides of one variant's run, in the order they are applied."""
    from playpen_jax.config import load_file

    over = {"model.name": model, "run_dir": run_dir, "seed": seed, "steps": steps,
            "games.names": game, "eval.games": game, "eval.at_start": False, "eval.every": 0,
            "eval.limit": 1, "export.hf": False, "checkpoint.every": 0, "log.progress": False,
            "log.tensorboard": False}
    over.update(TINY_SETTINGS if tiny else MODEL_SETTINGS)
    over.update(VARIANTS[slug][1])
    over.update(sets)
    if over["grpo.overlong"] == "penalty" and "grpo.overlong_buffer" not in sets:
        max_new = int(over.get("rollout.max_new_tokens", load_file(CONFIG).rollout.max_new_tokens))
        over["grpo.overlong_buffer"] = max(1, max_new // 5)
    return over


def _value_text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def to_argv(over: dict) -> list:
    return [f"--config={CONFIG}"] + [f"--config.{k}={_value_text(v)}" for k, v in over.items()]


def check_config(argv: list, label: str) -> None:
    """Raises BenchmarkError naming the variant when its config does not parse or validate."""
    from playpen_jax.config import ConfigError, parse, validate

    try:
        validate(parse(argv))
    except ConfigError as e:
        raise BenchmarkError(f"variant {label}: {e}") from None


def train_curve(run_dir: str) -> dict:
    """Per-step train rewards of a finished run and how many steps trained rows."""
    from playpen_jax.metrics import read_jsonl

    rows = [m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if m.get("split") == "train"]
    steps = [int(m["step"]) for m in rows if m.get("reward") is not None]
    rewards = [float(m["reward"]) for m in rows if m.get("reward") is not None]
    return {"step": steps, "reward": rewards, "updates": sum(1 for m in rows if m.get("loss") is not None)}


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    v = np.asarray(values, np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def summarise(curve: dict, wall: float) -> dict:
    """The table's numbers of one run; the means are None when the run logged no reward."""
    r = curve["reward"]
    return {"steps": len(r), "updates": curve["updates"],
            "first3": float(np.mean(r[:EDGE])) if r else None,
            "last3": float(np.mean(r[-EDGE:])) if r else None,
            "wall_seconds": wall}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def table(results: dict) -> str:
    lines = ["| variant | steps | updates | first-3 mean reward | last-3 mean reward | wall s |",
             "|---|---|---|---|---|---|"]
    for label, s in results.items():
        lines.append(f"| {label} | {s['steps']} | {s['updates']} | {_fmt(s['first3'])} | "
                     f"{_fmt(s['last3'])} | {s['wall_seconds']:.0f} |")
    return "\n".join(lines)


def plot(curves: dict, path: str, title: str, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, curve) in enumerate(curves.items()):
        col = colours[k % len(colours)]
        ax.plot(curve["step"], curve["reward"], color=col, linewidth=0.8, alpha=0.4)
        ax.plot(curve["step"], moving_average(curve["reward"], window), color=col, linewidth=2.0,
                label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean episode reward")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=f"thin: per step, thick: mean of {window}", fontsize=9, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=TINY,
                   help=f"a model name or path train.main reads; '{TINY}' (the default) builds the tiny "
                        f"test model in OUT/tiny_model")
    p.add_argument("--tiny", action="store_true", help=f"the same as --model={TINY}")
    p.add_argument("--game", default="colourname", help="one game name (default: colourname)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per variant (default: 16)")
    p.add_argument("--out", default="runs/grpo_variants",
                   help="output directory; each variant runs in OUT/<variant>, which must not exist yet")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--seed", type=int, default=0, help="the config seed of every run (default: 0)")
    p.add_argument("--window", type=int, default=4, help="steps in the plot's moving average (default: 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a config override for every variant, applied last (repeatable)")
    args = p.parse_args(argv)
    if args.tiny and args.model != TINY:
        raise BenchmarkError(f"--tiny and --model={args.model} exclude each other")
    if args.steps < 1:
        raise BenchmarkError(f"--steps={args.steps} must be >= 1")
    if args.window < 1:
        raise BenchmarkError(f"--window={args.window} must be >= 1")
    if args.seed < 0:
        raise BenchmarkError(f"--seed={args.seed} must be >= 0")
    if "," in args.game or not args.game.strip():
        raise BenchmarkError(f"--game={args.game!r}: give exactly one game name")
    slugs = pick_variants(args.variants)
    sets = parse_sets(args.sets)
    tiny = args.model == TINY
    out = os.path.abspath(args.out)
    model = os.path.join(out, "tiny_model") if tiny else args.model

    # Check every run's config before the first run starts.
    plans = {}
    for slug in slugs:
        run_dir = os.path.join(out, slug)
        if os.path.exists(run_dir):
            raise BenchmarkError(f"{run_dir} already exists; choose another --out or remove it")
        over = run_overrides(slug, model, args.game, args.steps, args.seed, run_dir, tiny, sets)
        run_argv = to_argv(over)
        check_config(run_argv, VARIANTS[slug][0])
        plans[slug] = (over, run_argv)

    os.makedirs(out, exist_ok=True)
    if tiny:
        make_tiny_model_dir(model)
    from train import main as train_main

    t_all = time.perf_counter()
    curves, results, failed = {}, {}, {}
    for slug, (over, run_argv) in plans.items():
        label = VARIANTS[slug][0]
        print(f"== {label}: python -m train.main {' '.join(shlex.quote(a) for a in run_argv)}", flush=True)
        t = time.perf_counter()
        code = train_main.main(run_argv)
        wall = time.perf_counter() - t
        if code != 0:
            print(f"== {label}: train.main exited with {code}", file=sys.stderr, flush=True)
            failed[label] = code
            continue
        curves[label] = train_curve(over["run_dir"])
        results[label] = summarise(curves[label], wall)
        s = results[label]
        print(f"== {label}: {s['steps']} steps, reward {_fmt(s['first3'])} -> {_fmt(s['last3'])}, "
              f"{wall:.0f} s", flush=True)
    total = time.perf_counter() - t_all

    png = os.path.join(out, "grpo_variants.png")
    md = os.path.join(out, "grpo_variants.md")
    model_name = "tiny test model" if tiny else args.model
    title = f"{args.game}, {model_name}, seed {args.seed}, {args.steps} steps"
    if curves:
        plot(curves, png, title, args.window)
    text = table(results)
    command = "python -m benchmarks.grpo_variants " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with open(md, "w") as f:
        f.write(f"# GRPO variants on {args.game}\n\n`{command.strip()}`\n\n"
                f"Model: {model_name}; {args.steps} steps per variant, seed {args.seed}; "
                f"{platform.machine()}, {os.cpu_count()} CPUs; total {total:.0f} s.\n\n{text}\n")
        if failed:
            f.write("\nFailed: " + ", ".join(f"{k} (exit {v})" for k, v in failed.items()) + "\n")
    print(text)
    summary = {"model": model_name, "game": args.game, "steps": args.steps, "seed": args.seed,
               "variants": {label: {**results[label], "rewards": curves[label]["reward"]}
                            for label in results},
               "failed": failed, "total_seconds": total, "png": png if curves else None, "md": md}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        summary = main()
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if summary["failed"] else 0)
