"""Evaluate a model (or the programmatic players) on the games: records, clemscore table, plot.

    python -m games.eval --model=smollm2-135m-instruct --games=all --split=test [--limit=N] [--out=DIR]
    python -m games.eval --players=strong --games=all          # programmatic players only
    python -m games.eval --model=openai:MODEL --games=all      # a model behind OPENAI_BASE_URL

A model named `openai:MODEL` is played through an OpenAI-compatible HTTP API (models/remote.py;
server and key from OPENAI_BASE_URL / OPENAI_API_KEY); `--partner=openai:MODEL` makes such a model
the partner of the roles the evaluated model does not play.

The model plays every role (self-play, as clembench evaluates a model) unless `--partner` names a
programmatic partner for the roles not in `--model_roles`. All pending requests of all live episodes
go to the sampler together. Writes clembench-format records under OUT, `results.json` and
`clemscore.png`, and prints a table per game.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

from games import clemscore, records, registry, split
from games.core import GameError, run_episode
from games.env import BatchedGameEnv

PROGRAMMATIC = ("strong", "weak")


def parse_roles(spec: str, games: list[str]):
    """'all', or comma-separated role names / player numbers (1, 2) -> learner roles per game."""
    if spec == "all":
        return "all"
    items = [s.strip() for s in spec.split(",") if s.strip()]
    out = {}
    for g in games:
        roles = registry.get(g).roles
        chosen = [r for r in roles if r in items]
        chosen += [roles[int(s) - 1] for s in items if s.isdigit() and 0 < int(s) <= len(roles)]
        out[g] = sorted(set(chosen)) or list(roles)  # a one-role game: the model plays it
    return out


def spread(episodes: list, limit: int) -> list:
    """At most `limit` of a game's episodes, taken in turn from each of its experiments (the first
    of each, then the second of each, ...), so that a limited evaluation covers every experiment
    (a game's difficulty levels or variants) as evenly as the limit allows, in their order."""
    by_exp: dict = {}
    for ep in episodes:
        by_exp.setdefault(str(ep.experiment.get("name", "")), []).append(ep)
    out, k = [], 0
    while len(out) < limit and any(k < len(v) for v in by_exp.values()):
        out.extend(v[k] for v in by_exp.values() if k < len(v))
        k += 1
    return out[:limit]


def episodes_for(games: list[str], split_name: str, seed: int, limit: int | None):
    """Every game's instances of a split; with `limit`, at most that many per game, spread over
    the game's experiments (`spread`)."""
    eps = []
    for g in games:
        got = registry.instances(g, split_name, seed)
        eps.extend(spread(got, limit) if limit else got)
    return eps


def _nan_to_none(obj):
    """results.json is strict JSON: a missing quality (NaN) is written as null."""
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_results(out: Path, per_game: dict, meta: dict, plots: bool = True) -> dict:
    """results.json (the clemscore aggregate with `meta`) and, with `plots`, clemscore.png in `out`."""
    res = clemscore.aggregate(per_game)
    res["meta"] = meta
    res["games"] = {g: {**s, "set": split.set_of(g)}
                    for g, s in res["games"].items()}
    records.dump_json(out / "results.json", _nan_to_none(res))
    if plots:
        plot(out / "clemscore.png", res, title=meta.get("model", ""))
    return res


def plot(path: Path, res: dict, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = list(res["games"])
    vals = [res["games"][g]["clemscore"] for g in games] + [res["clemscore"]]
    palette = {"training": "#4c72b0", "held-out": "#dd8452", "test": "#55a868"}
    colors = [palette[split.set_of(g)] for g in games] + ["#333333"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(vals) + 2), 4))
    ax.bar(range(len(vals)), [0 if (v is None or math.isnan(v)) else v for v in vals], color=colors)
    ax.set_xticks(range(len(vals)), games + ["overall"], rotation=45, ha="right")
    ax.set_ylabel("clemscore")
    ax.set_ylim(0, 100)
    ax.set_title(f"clemscore {title}".strip() + "  (blue: training games, orange: held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(res: dict) -> None:
    def f(x):
        return "   -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.1f}"

    print(f"{'game':<28} {'set':<9} {'eps':>4} {'%played':>8} {'quality':>8} {'clemscore':>9}")
    for g, s in res["games"].items():
        print(f"{g:<28} {s['set']:<9} {s['episodes']:>4} {f(s['played']):>8} {f(s['quality']):>8} "
              f"{f(s['clemscore']):>9}")
    print(f"{'overall':<28} {'':<9} {'':>4} {f(res['played']):>8} {f(res['quality']):>8} "
          f"{f(res['clemscore']):>9}")


def run_programmatic(episodes, kind: str, out: Path, progress) -> dict:
    per_game: dict = {}
    for i, ep in enumerate(episodes):
        spec = registry.get(ep.game)
        players = {r: registry.make_player(ep.game, kind, r, ep, seed=i) for r in spec.roles}
        master = run_episode(registry.make_master(ep, [f"{kind}-programmatic"] * len(spec.roles)), players)
        records.write_episode(out, master, ep.experiment)
        per_game.setdefault(ep.game, []).append(master.episode_scores)
        progress.update(1)
    return per_game


def run_model(episodes, policy, out: Path, progress, *, batch_size: int, learner_roles, partner,
              model_name: str, partner_policy=None, partner_name=None) -> dict:
    """Plays the episodes with `policy` in the learner roles and, for the other roles, the
    programmatic `partner` kind or the callable `partner_policy`; writes every finished episode."""
    per_game: dict = {}
    env = BatchedGameEnv(iter(episodes), batch_size=batch_size, learner_roles=learner_roles,
                         partner=partner, learner_name=model_name, partner_name=partner_name)

    def collect(finished):
        for fin in finished:
            records.write_episode(out, fin.master, fin.episode.experiment)
            per_game.setdefault(fin.episode.game, []).append(fin.master.episode_scores)
            progress.update(1)

    collect(env.step({}))  # episodes that finished without the model
    while not env.done:
        reqs = env.pending()
        mine = [r for r in reqs if r.learner]
        theirs = [r for r in reqs if not r.learner]
        replies = dict(zip((r.id for r in mine), policy(mine))) if mine else {}
        if theirs:
            replies.update(zip((r.id for r in theirs), partner_policy(theirs)))
        collect(env.step(replies))
    return per_game


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m games.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="registry name or path (HF dir / GGUF), or openai:MODEL (an HTTP API)")
    p.add_argument("--players", default=None, choices=PROGRAMMATIC,
                   help="play programmatic players in every role instead of a model")
    p.add_argument("--games", default="all", help="all, train, heldout, or a comma-separated list")
    p.add_argument("--split", default="test", choices=registry.SPLITS)
    p.add_argument("--seed", type=int, default=0, help="instance-generation and sampling seed")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many instances per game, taken from each of its experiments in turn")
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<time>)")
    p.add_argument("--partner", default=None,
                   help="partner for the roles the model does not play: strong, weak (programmatic) "
                        "or openai:MODEL")
    p.add_argument("--model_roles", default="all",
                   help="roles the model plays: all, or role names / player numbers (1,2)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--remote_timeout", type=float, default=60.0, help="openai: seconds per HTTP request")
    p.add_argument("--remote_retries", type=int, default=4, help="openai: retries of a failed request")
    p.add_argument("--requests_per_second", type=float, default=0.0, help="openai: rate limit (0: none)")
    p.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight at once")
    args = p.parse_args(argv)

    if (args.model is None) == (args.players is None):
        print("error: give exactly one of --model or --players", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print(f"error: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.max_new_tokens < 1:
        print("error: --batch_size and --max_new_tokens must be >= 1", file=sys.stderr)
        return 2
    from models import remote

    if args.partner is not None and args.partner not in PROGRAMMATIC and not remote.is_remote(args.partner):
        print(f"error: --partner={args.partner!r}: expected strong, weak or openai:MODEL", file=sys.stderr)
        return 2
    if args.model_roles != "all" and args.partner is None:
        print("error: --model_roles needs a --partner for the other roles", file=sys.stderr)
        return 2
    from tqdm import tqdm

    try:
        games = registry.resolve_names(args.games)
        episodes = episodes_for(games, args.split, args.seed, args.limit)
        learner_roles = parse_roles(args.model_roles, games)
    except GameError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/eval-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    progress = tqdm(total=len(episodes), desc="episodes", disable=args.quiet, file=sys.stderr)
    try:
        if args.players:
            name = f"{args.players}-programmatic"
            per_game = run_programmatic(episodes, args.players, out, progress)
        else:
            from models import registry as model_registry
            from models.errors import ModelError
            from playpen_jax.rollout import ModelPolicy

            def http_model(spec):
                return remote.RemotePolicy(spec, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, timeout=args.remote_timeout,
                                           retries=args.remote_retries,
                                           requests_per_second=args.requests_per_second,
                                           concurrency=args.concurrency)

            try:
                if remote.is_remote(args.model):
                    name, policy = args.model, http_model(args.model)
                else:
                    model = model_registry.load(args.model, param_dtype=args.dtype, dtype=args.dtype)
                    name = Path(str(args.model)).name
                    policy = ModelPolicy(model, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, seed=args.seed,
                                         batch_size=args.batch_size)
                partner_policy = http_model(args.partner) if remote.is_remote(args.partner) else None
            except (ModelError, remote.RemoteModelError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            try:
                per_game = run_model(episodes, policy, out, progress, batch_size=args.batch_size,
                                     learner_roles=learner_roles,
                                     partner=None if partner_policy else args.partner, model_name=name,
                                     partner_policy=partner_policy,
                                     partner_name=args.partner if partner_policy else None)
            except remote.RemoteModelError as e:
                print(f"error: {e} (the finished episodes' records are in {out})", file=sys.stderr)
                return 1
    finally:
        progress.close()
    meta = {"model": name, "games": games, "split": args.split, "seed": args.seed, "limit": args.limit,
            "partner": args.partner, "model_roles": args.model_roles, "episodes": len(episodes),
            "wall_s": round(time.time() - t0, 1), "date": stamp}
    res = write_results(out, {g: per_game.get(g, []) for g in games}, meta)
    print_table(res)
    print(f"records, results.json and clemscore.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
