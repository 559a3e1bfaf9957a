"""Which games exist, their roles, instance sets and programmatic players.

Every game module defines a `SPEC = GameSpec(...)`; this registry imports them on demand so that
`games.list` stays quick. Instance sets use clembench's `instances.json` structure:
`{"experiments": [{"name": ..., <experiment config>, "game_instances": [{"game_id": ..., ...}]}]}`
whether they come from our generators or from a clembench file on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import random
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping

from games.core import GameError, GameMaster, PlayerFn

SPLITS = ("train", "validation", "test")

# Module per game; a module may define several games (the wordle family) via `SPECS`.
GAME_MODULES = {
    "taboo": "games.taboo",
    "wordle": "games.wordle",
    "wordle_withclue": "games.wordle",
    "wordle_withcritic": "games.wordle",
    "referencegame": "games.referencegame",
    "imagegame": "games.imagegame",
    "privateshared": "games.privateshared",
    "codenames": "games.codenames",
    "matchit_ascii": "games.matchit",
    "guesswhat": "games.guesswhat",
    "textmapworld": "games.textmapworld",
    "textmapworld_graphreasoning": "games.textmapworld",
    "textmapworld_specificroom": "games.textmapworld",
    # A test game for learning code; it is in neither list of games.split.
    "colourname": "games.colourname",
}

# A player factory builds a player for one role of one episode.
PlayerFactory = Callable[[str, Mapping[str, Any], Mapping[str, Any], random.Random], PlayerFn]


@dataclasses.dataclass(frozen=True)
class GameSpec:
    name: str
    master: type[GameMaster]
    # generate(split, seed) -> instances.json dict for that split.
    generate: Callable[[str, int], dict]
    # The identity of an instance for the train/test overlap check (e.g. the target word).
    instance_key: Callable[[Mapping[str, Any]], Hashable]
    # "strong" and "weak" factories: factory(role, instance, experiment, rng) -> player.
    players: Mapping[str, PlayerFactory]
    description: str = ""
    # Rewrites an instance read from a clembench file (older layouts) into what `master` reads.
    normalize: Callable[[Mapping[str, Any], Mapping[str, Any]], dict] | None = None
    # Replay of records that log a probe's answer only as a GM->GM event (not as the player's
    # reply): `probe_event` names that event type and `probe_reply` turns its content back into a
    # reply the master parses to the same value.
    probe_event: str | None = None
    probe_reply: Callable[[Any], str] | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        return self.master.roles


def get(name: str) -> GameSpec:
    if name not in GAME_MODULES:
        raise GameError(f"unknown game {name!r}; known games: {', '.join(GAME_MODULES)}")
    module = importlib.import_module(GAME_MODULES[name])
    specs = {s.name: s for s in getattr(module, "SPECS", [getattr(module, "SPEC", None)]) if s}
    if name not in specs:
        raise GameError(f"module {GAME_MODULES[name]} defines no game named {name!r}")
    return specs[name]


def names() -> list[str]:
    return list(GAME_MODULES)


def resolve_names(spec: str) -> list[str]:
    """'all', 'train', 'heldout' (the Playpen split, see games.split) or a comma-separated list."""
    from games import split as game_split

    spec = spec.strip()
    if spec == "all":
        return game_split.TRAINING_GAMES + game_split.HELD_OUT_GAMES
    if spec in ("train", "training"):
        return list(game_split.TRAINING_GAMES)
    if spec in ("heldout", "held_out", "held-out"):
        return list(game_split.HELD_OUT_GAMES)
    out = [s.strip() for s in spec.split(",") if s.strip()]
    for n in out:
        get(n)
    return out


def split_of(key: Hashable, salt: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """Deterministic split of a resource item, independent of any seed.

    Games use it to partition their resources (words, grids, maps) so that test instances can never
    share their identity with training instances, whatever seed makes the sets.
    """
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


@dataclasses.dataclass(frozen=True)
class Episode:
    """One instance to play: its game, experiment config and instance dict."""

    game: str
    experiment: dict
    instance: dict

    @property
    def experiment_name(self) -> str:
        return str(self.experiment.get("name", ""))

    @property
    def game_id(self) -> Any:
        return self.instance.get("game_id")


def iter_instances(instances: Mapping[str, Any], game: str) -> Iterator[Episode]:
    """Episodes of an instances.json dict; experiment config = the experiment minus its instances."""
    if not isinstance(instances, Mapping) or not isinstance(instances.get("experiments"), list):
        raise GameError(f"{game}: an instances file must be an object with an 'experiments' list")
    spec = get(game)
    for exp in instances["experiments"]:
        if not isinstance(exp, Mapping) or not isinstance(exp.get("game_instances"), list):
            raise GameError(f"{game}: every experiment needs a 'game_instances' list")
        config = {k: v for k, v in exp.items() if k != "game_instances"}
        for inst in exp["game_instances"]:
            if not isinstance(inst, Mapping):
                raise GameError(f"{game}: experiment {config.get('name')!r} has a non-object instance")
            inst = spec.normalize(inst, config) if spec.normalize else dict(inst)
            yield Episode(game, config, inst)


def instances(game: str, split: str, seed: int = 0) -> list[Episode]:
    if split not in SPLITS:
        raise GameError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    return list(iter_instances(get(game).generate(split, seed), game))


def load_instances_file(path: str | Path, game: str) -> list[Episode]:
    """Reads a clembench `instances.json` (or a single `instance.json` beside experiment config)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GameError(f"instances file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GameError(f"cannot read instances file {path}: {e}") from None
    if isinstance(data, Mapping) and "experiments" not in data:  # a single instance.json
        data = {"experiments": [{"name": path.parent.name, "game_instances": [data]}]}
    return list(iter_instances(data, game))


def make_master(ep: Episode, player_models=None) -> GameMaster:
    return get(ep.game).master(ep.instance, ep.experiment, player_models=player_models)


def make_player(game: str, kind: str, role: str, ep: Episode, seed: int = 0) -> PlayerFn:
    spec = get(game)
    if kind not in spec.players:
        raise GameError(f"{game}: no {kind!r} player; known: {', '.join(spec.players)}")
    if role not in spec.roles:
        raise GameError(f"{game}: unknown role {role!r}; roles: {', '.join(spec.roles)}")
    rng = random.Random(f"{game}/{kind}/{role}/{ep.experiment_name}/{ep.game_id}/{seed}")
    return spec.players[kind](role, ep.instance, ep.experiment, rng)
