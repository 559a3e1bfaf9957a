"""clembench-compatible episode records: writing, finding and reading them.

We write the current clembench layout,
`<out>/<player-models>/<game>/<experiment>/instance_<nnnnn>/{instance,interactions,scores}.json`
plus `transcript.html`, with the experiment config in `<experiment>/experiment.json`. Reading accepts
that layout and the public-runs v2 layout (`<i>_<experiment>/episode_<n>/`, config in
`<i>_<experiment>/experiment_<experiment>.json`); episodes are found by walking for
`interactions.json`, never by folder names.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from games.core import GameError, GameMaster


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def dump_json(path: Path, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
    os.replace(tmp, path)


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._")
    return name or "unnamed"


def pair_name(player_models) -> str:
    """clembench names a run folder after its models: 'a--b' (or 'a--a' in self-play)."""
    models = [str(m) for m in player_models] or ["programmatic"]
    if len(models) == 1:
        models = models * 2
    return "--".join(_safe(m) for m in models)


def episode_dir(out: Path, master: GameMaster, experiment_name: str, index: int) -> Path:
    return (Path(out) / pair_name(master.player_models) / _safe(master.game_name)
            / _safe(experiment_name or "default") / f"instance_{int(index):05d}")


def write_episode(out: str | Path, master: GameMaster, experiment: Mapping[str, Any],
                  index: int | None = None) -> Path:
    """Writes one finished episode's records; returns its folder."""
    exp_name = str(experiment.get("name", "") or "default")
    idx = index if index is not None else master.instance.get("game_id", 0)
    try:
        idx = int(idx)
    except (TypeError, ValueError):
        idx = 0
    folder = episode_dir(Path(out), master, exp_name, idx)
    exp_file = folder.parent / "experiment.json"
    if not exp_file.exists():
        dump_json(exp_file, dict(experiment))
    dump_json(folder / "instance.json", master.instance)
    interactions = master.interactions(exp_name)
    dump_json(folder / "interactions.json", interactions)
    if master.done:
        dump_json(folder / "scores.json", master.scores())
    (folder / "transcript.html").write_text(transcript_html(interactions, master.scores() if master.done
                                                            else None))
    return folder


# ----- HTML transcript ---------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
h1{font-size:1.3em} table.meta td{padding:2px 10px}
.round{border-top:2px solid #bbb;margin-top:1em;padding-top:.3em;color:#888;font-size:.85em}
.ev{margin:.4em 0;padding:.5em .8em;border-radius:8px;white-space:pre-wrap;font-family:ui-monospace,monospace;
font-size:.9em;max-width:80%}
.gm2p{background:#eef3fb;margin-right:auto}
.p2gm{background:#e9f7ea;margin-left:auto}
.gm{background:#f4f4f4;color:#555;margin:0 auto;font-size:.8em;max-width:60%}
.who{font-family:system-ui,sans-serif;font-size:.75em;color:#666;display:block;margin-bottom:.2em}
"""


def transcript_html(interactions: Mapping[str, Any], scores: Mapping[str, Any] | None = None) -> str:
    meta = interactions.get("meta", {})
    players = interactions.get("players", {})

    def who(name):
        p = players.get(name)
        if isinstance(p, Mapping):
            return f"{name} ({p.get('game_role', '')}, {p.get('model_name', '')})"
        return f"{name} ({p})" if p else name

    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>{html.escape(str(meta.get('game_name', 'episode')))}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(str(meta.get('game_name', '')))} · "
           f"{html.escape(str(meta.get('experiment_name', '')))} · "
           f"episode {html.escape(str(meta.get('game_id', '')))}</h1>",
           "<table class='meta'>"]
    for name in players:
        out.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(who(name))}</td></tr>")
    out.append("</table>")
    for i, rnd in enumerate(interactions.get("turns", [])):
        out.append(f"<div class='round'>round {i}</div>")
        for ev in rnd:
            a = ev.get("action", {})
            frm, to = ev.get("from", ""), ev.get("to", "")
            content = a.get("content", "")
            if not isinstance(content, str):
                content = json.dumps(content, ensure_ascii=False, default=_json_default)
            if frm == "GM" and to == "GM":
                cls, head = "gm", f"GM · {a.get('type', '')}"
            elif frm == "GM":
                cls, head = "gm2p", f"GM → {who(to)}"
            else:
                cls, head = "p2gm", f"{who(frm)} → GM"
            out.append(f"<div class='ev {cls}'><span class='who'>{html.escape(head)}</span>"
                       f"{html.escape(content)}</div>")
    if scores:
        out.append("<h2>Episode scores</h2><table class='meta'>")
        for k, v in scores.get("episode scores", {}).items():
            if isinstance(v, float) and math.isnan(v):
                v = "NaN"
            out.append(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


# ----- reading ------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpisodeRecord:
    folder: Path
    game: str
    experiment_name: str
    experiment: dict | None  # None when no experiment config was found
    instance: dict
    interactions: dict
    scores: dict | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GameError(f"cannot read {path}: {e}") from None


def _experiment_config(folder: Path, name: str) -> dict | None:
    for cand in (folder.parent / "experiment.json", folder.parent / f"experiment_{name}.json"):
        if cand.is_file():
            return _read_json(cand)
    for cand in sorted(folder.parent.glob("experiment_*.json")):
        return _read_json(cand)
    return None


def read_episode(folder: str | Path) -> EpisodeRecord:
    folder = Path(folder)
    where = folder / "interactions.json"
    interactions = _read_json(where)
    if not isinstance(interactions, Mapping) or not isinstance(interactions.get("turns"), list):
        raise GameError(f"{where}: no 'turns' list")
    for i, rnd in enumerate(interactions["turns"]):
        if not isinstance(rnd, list):
            raise GameError(f"{where}: round {i} is a {type(rnd).__name__}, not a list of events")
        for ev in rnd:
            if isinstance(ev, Mapping) and not isinstance(ev.get("action") or {}, Mapping):
                raise GameError(f"{where}: round {i} has an event whose 'action' is not an object")
    if not (folder / "instance.json").is_file():
        raise GameError(f"{folder}: no instance.json beside interactions.json")
    instance = _read_json(folder / "instance.json")
    if not isinstance(instance, Mapping):
        raise GameError(f"{folder / 'instance.json'}: expected a JSON object, got {type(instance).__name__}")
    meta = interactions.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise GameError(f"{where}: 'meta' is not an object")
    exp_dir = folder.parent.name
    # v2 names experiment folders '<i>_<experiment>'; clemcore >= 3 uses the experiment name.
    exp_name = meta.get("experiment_name") or re.sub(r"^\d+_", "", exp_dir)
    game = meta.get("game_name") or folder.parent.parent.name
    if not isinstance(exp_name, str) or not isinstance(game, str):
        raise GameError(f"{where}: meta's game_name / experiment_name must be text")
    scores = _read_json(folder / "scores.json") if (folder / "scores.json").is_file() else None
    if scores is not None and not isinstance(scores, Mapping):
        raise GameError(f"{folder / 'scores.json'}: expected a JSON object")
    experiment = _experiment_config(folder, exp_name)
    if experiment is not None and not isinstance(experiment, Mapping):
        raise GameError(f"{folder.parent}: the experiment config is not a JSON object")
    return EpisodeRecord(folder, game, exp_name, experiment, instance, interactions, scores)


def find_episodes(root: str | Path) -> Iterator[Path]:
    root = Path(root)
    if not root.exists():
        raise GameError(f"records folder not found: {root}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "interactions.json" in filenames:
            yield Path(dirpath)
