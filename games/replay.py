"""Re-score clembench-format episode records with our game masters.

    python -m games.replay RECORDS_DIR [--out DIR] [--games taboo,wordle] [--show N]

For every episode folder under RECORDS_DIR (found by its interactions.json), the game master is started
on the recorded instance and experiment config (or on the game's own defaults when the config is
absent), and each request is answered with that player's next recorded reply. The master decides the
rest itself. The recomputed Aborted / Success / Lose / Main Score are compared with the recorded
scores.json; disagreements are listed with the first round whose events differ.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

from games import records, registry
from games.core import BENCH_SCORE, METRIC_ABORTED, METRIC_LOSE, METRIC_SUCCESS, GameError, GameMaster

COMPARED = (METRIC_ABORTED, METRIC_SUCCESS, METRIC_LOSE, BENCH_SCORE)


@dataclasses.dataclass
class ReplayResult:
    folder: Path
    game: str
    master: GameMaster | None
    recorded: dict | None       # recorded episode scores (None when scores.json is missing)
    differences: dict           # metric -> (recorded, recomputed)
    first_diff_round: int | None
    note: str = ""              # why the episode could not be replayed, or what was odd
    used_default_config: bool = False

    @property
    def agrees(self) -> bool:
        return self.master is not None and self.recorded is not None and not self.differences


def _same(a: Any, b: Any) -> bool:
    def num(x):
        if x is None or (isinstance(x, str) and x.lower() == "nan"):
            return math.nan
        return float(x)

    try:
        fa, fb = num(a), num(b)
    except (TypeError, ValueError):
        return a == b
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    return abs(fa - fb) <= 1e-6 * max(1.0, abs(fa))


@functools.lru_cache(maxsize=None)
def _default_experiments(game: str) -> tuple:
    return tuple(registry.get(game).generate("test", 0)["experiments"])


def default_experiment(game: str, name: str) -> dict:
    """The game's own config for an experiment name (falls back to its first experiment)."""
    exps = _default_experiments(game)
    for e in exps:
        if e.get("name") == name:
            return {k: v for k, v in e.items() if k != "game_instances"}
    return {k: v for k, v in exps[0].items() if k != "game_instances"}


def _player_events(interactions: dict, skip_labels=("pseudo",)) -> tuple[dict, list]:
    """Each player's recorded replies in order, and the GM->GM bookkeeping events.

    Some clembench versions log replies that were never asked of a model ("pseudo") or that the
    game logs again as bookkeeping ("forget", e.g. probe answers); `skip_labels` leaves them out.
    """
    replies = collections.defaultdict(list)
    gm_events = []
    for rnd in interactions.get("turns", []):
        for ev in rnd:
            if not isinstance(ev, dict):
                continue
            action = ev.get("action") or {}
            if ev.get("to") == "GM" and ev.get("from") != "GM" and action.get("type") == "get message":
                if action.get("label") in skip_labels:
                    continue
                replies[ev.get("from")].append(action.get("content"))
            elif ev.get("from") == "GM" and ev.get("to") == "GM":
                gm_events.append(action)
    return replies, gm_events


def _event_key(ev: dict) -> tuple:
    a = ev.get("action") or {}
    content = a.get("content")
    if not isinstance(content, str):
        content = json.dumps(content, sort_keys=True, default=str)
    return ev.get("from"), ev.get("to"), a.get("type"), content


def first_differing_round(recorded: dict, replayed: dict) -> int | None:
    a, b = recorded.get("turns", []), replayed.get("turns", [])
    for i in range(max(len(a), len(b))):
        ra = [_event_key(e) for e in a[i]] if i < len(a) else []
        rb = [_event_key(e) for e in b[i]] if i < len(b) else []
        if ra != rb:
            return i
    return None


# What a game master may raise on a recorded instance or experiment of an unexpected shape.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def replay_record(rec: records.EpisodeRecord) -> ReplayResult:
    """Plays the record's episode again through its game master with the recorded replies. A record
    the master cannot play (an instance or experiment of another shape) is reported in `note`."""
    try:
        return _replay(rec)
    except _MALFORMED as e:
        return ReplayResult(rec.folder, rec.game, None, None, {}, None,
                            f"the recorded instance or experiment is malformed ({type(e).__name__}: "
                            f"{str(e)[:200]})")


def _replay(rec: records.EpisodeRecord) -> ReplayResult:
    try:
        spec = registry.get(rec.game)
    except GameError as e:
        return ReplayResult(rec.folder, rec.game, None, None, {}, None, str(e))
    used_default = rec.experiment is None
    experiment = rec.experiment if rec.experiment is not None else default_experiment(rec.game,
                                                                                    rec.experiment_name)
    experiment = dict(experiment)
    experiment.setdefault("name", rec.experiment_name)
    recorded = (rec.scores or {}).get("episode scores") if rec.scores else None
    try:
        instance = spec.normalize(rec.instance, experiment) if spec.normalize else dict(rec.instance)
        master = spec.master(instance, experiment)
    except GameError as e:
        return ReplayResult(rec.folder, rec.game, None, recorded, {}, None, f"cannot start the game: {e}",
                            used_default)
    replies, gm_events = _player_events(
        rec.interactions, ("pseudo", "forget") if spec.probe_event else ("pseudo",))
    probes = collections.deque(a.get("content") for a in gm_events
                               if spec.probe_event and a.get("type") == spec.probe_event)
    queues = {p: collections.deque(v) for p, v in replies.items()}
    note = ""
    req = master.start()
    steps = 0
    while req is not None:
        steps += 1
        if steps > 10_000:
            note = "the game did not end within 10000 requests"
            break
        if req.probe and spec.probe_event and spec.probe_reply is not None:
            if probes:
                text = spec.probe_reply(probes.popleft())
            else:
                note = note or f"ran out of recorded '{spec.probe_event}' events"
                text = ""
        else:
            q = queues.get(req.player)
            if q:
                text = q.popleft()
                text = text if isinstance(text, str) else json.dumps(text)
            else:
                note = note or f"ran out of recorded replies of {req.player}"
                text = ""
        req = master.step(text)
    left = {p: len(q) for p, q in queues.items() if q}
    if left and not note:
        note = "recorded replies left over: " + ", ".join(f"{p}: {n}" for p, n in left.items())
    diffs = {}
    if master.done and recorded is not None:
        mine = master.episode_scores
        for k in COMPARED:
            if not _same(recorded.get(k), mine.get(k)):
                diffs[k] = (recorded.get(k), mine.get(k))
    first = first_differing_round(rec.interactions, master.interactions()) if diffs else None
    if recorded is None:
        note = note or "no scores.json recorded"
    return ReplayResult(rec.folder, rec.game, master if master.done else None, recorded, diffs, first,
                        note, used_default)


def replay_dir(root: str | Path, games: set | None = None, out: str | Path | None = None):
    root = Path(root)
    results = []
    for folder in records.find_episodes(root):
        try:
            rec = records.read_episode(folder)
        except GameError as e:
            results.append(ReplayResult(folder, "?", None, None, {}, None, str(e)))
            continue
        if games and rec.game not in games:
            continue
        res = replay_record(rec)
        results.append(res)
        if out is not None and res.master is not None:
            records.dump_json(Path(out) / folder.relative_to(root) / "scores.json", res.master.scores())
    return results


def summarize(results) -> dict:
    per_game = collections.OrderedDict()
    for r in results:
        g = per_game.setdefault(r.game, {"episodes": 0, "agree": 0, "disagree": 0, "not replayed": 0})
        g["episodes"] += 1
        if r.agrees:
            g["agree"] += 1
        elif r.master is None or r.recorded is None:
            g["not replayed"] += 1
        else:
            g["disagree"] += 1
    return per_game


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m games.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("records", help="folder of clembench-format episode records")
    p.add_argument("--out", help="write recomputed scores.json files here, same folder layout")
    p.add_argument("--games", default="", help="comma-separated games to replay (default: all found)")
    p.add_argument("--show", type=int, default=20, help="list at most this many disagreements")
    args = p.parse_args(argv)
    try:
        games = {g.strip() for g in args.games.split(",") if g.strip()} or None
        results = replay_dir(args.records, games, args.out)
    except GameError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no episode records (interactions.json) under {args.records}", file=sys.stderr)
        return 2
    summary = summarize(results)
    print(f"{'game':<30} {'episodes':>8} {'agree':>6} {'differ':>6} {'skipped':>7} {'agreement':>9}")
    for game, s in summary.items():
        n = s["agree"] + s["disagree"]
        rate = f"{100 * s['agree'] / n:.1f}%" if n else "-"
        print(f"{game:<30} {s['episodes']:>8} {s['agree']:>6} {s['disagree']:>6} {s['not replayed']:>7} "
              f"{rate:>9}")
    bad = [r for r in results if not r.agrees]
    for r in bad[: args.show]:
        where = f", first differing round {r.first_diff_round}" if r.first_diff_round is not None else ""
        diffs = "; ".join(f"{k}: recorded {a} vs {b}" for k, (a, b) in r.differences.items())
        cfg = (" [no experiment config recorded: the game's own defaults were used]"
               if r.used_default_config else "")
        print(f"- {r.folder}: {diffs or r.note}{where}" + (f" ({r.note})" if diffs and r.note else "") + cfg)
    if len(bad) > args.show:
        print(f"... and {len(bad) - args.show} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
