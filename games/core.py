"""The game-master protocol shared by every game.

A game master is a plain Python object that runs one episode. Its rules live in `play()`, a
generator: whenever a player must speak it yields a `Request` (which player, what the player has
seen so far) and receives the reply text back through `send`. Everything else — re-prompts, aborts,
scores, the clembench interaction log — is the master's own business. This makes one code path serve
a sequential driver (`run_episode`), the batched environment (`games.env`), and replay of recorded
episodes (`games.replay`).

Records follow clembench: `interactions.json` holds `turns`, a list of rounds, each a list of events
`{from, to, timestamp, action: {type, content}}`; `scores.json` holds `turn scores` and
`episode scores` with the standard metrics below.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence

METRIC_ABORTED = "Aborted"
METRIC_LOSE = "Lose"
METRIC_SUCCESS = "Success"
METRIC_REQUEST_COUNT = "Request Count"
METRIC_REQUEST_COUNT_PARSED = "Parsed Request Count"
METRIC_REQUEST_COUNT_VIOLATED = "Violated Request Count"
METRIC_REQUEST_SUCCESS_RATIO = "Request Success Ratio"
BENCH_SCORE = "Main Score"
STANDARD_EPISODE_METRICS = (
    METRIC_ABORTED,
    METRIC_LOSE,
    METRIC_SUCCESS,
    METRIC_REQUEST_COUNT,
    METRIC_REQUEST_COUNT_PARSED,
    METRIC_REQUEST_COUNT_VIOLATED,
    METRIC_REQUEST_SUCCESS_RATIO,
    BENCH_SCORE,
)

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}


class GameError(Exception):
    """Bad game input from outside (instance files, records, options), with a message naming it."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One pending utterance: `player` ("Player 1", ...) in `role` must answer `messages`."""

    player: str
    role: str
    messages: tuple[Message, ...]
    # A probe is asked in a throw-away copy of the player's context (e.g. privateshared's
    # yes/no questions); its reply does not stay in the player's history.
    probe: bool = False


@dataclasses.dataclass(frozen=True)
class Event:
    """A clembench interaction-log event."""

    from_: str
    to: str
    type: str
    content: Any
    timestamp: str

    def to_json(self) -> dict:
        return {
            "from": self.from_,
            "to": self.to,
            "timestamp": self.timestamp,
            "action": {"type": self.type, "content": self.content},
        }


def _now() -> str:
    return datetime.datetime.now().isoformat()


class GameMaster:
    """Base class of all game masters.

    Subclasses set `game_name` and `roles` (one role name per player, in player order), and
    implement `setup()` (read the instance) , `play()` (the rules, as a generator built on `ask`)
    and `compute_scores()` (turn and episode scores once `play` has returned). Within `play`:

        reply = yield from self.ask(0, "your prompt")    # Player 1 answers
        self.log_to_self("valid response", ...)
        self.next_round()

    The master must end (return from `play`) on any reply whatever: a malformed reply is scored by
    the game's rules, never raised.
    """

    game_name: str = ""
    roles: tuple[str, ...] = ()

    def __init__(self, instance: Mapping[str, Any], experiment: Mapping[str, Any] | None = None,
                 *, player_models: Sequence[str] | None = None):
        self.instance = dict(instance)
        self.experiment = dict(experiment or {})
        self.player_names = tuple(f"Player {i + 1}" for i in range(len(self.roles)))
        self.player_models = tuple(player_models or ("programmatic",) * len(self.roles))
        if len(self.player_models) != len(self.roles):
            raise GameError(
                f"{self.game_name}: {len(self.roles)} player(s) ({', '.join(self.roles)}) but "
                f"{len(self.player_models)} model name(s) given")
        self.histories: list[list[Message]] = [[] for _ in self.roles]
        # Each probe exchange (see `ask`), per player: the messages it was asked with and its reply
        # as a last assistant message. The histories never hold them, so a learner that trains on
        # the histories alone never sees a probe.
        self.probe_chats: list[list[tuple[Message, ...]]] = [[] for _ in self.roles]
        self.turns: list[list[Event]] = [[]]
        self.turn_scores: dict[int, dict[str, Any]] = {}
        self.episode_scores: dict[str, Any] = {}
        # Request counts per round, as clembench counts them.
        self.request_counts: list[int] = [0]
        self.parsed_counts: list[int] = [0]
        self.violated_counts: list[int] = [0]
        self.done = False
        self._gen: Generator[Request, str, None] | None = None
        self._pending: Request | None = None
        self.setup()

    # ----- what a game implements -------------------------------------------------------------
    def setup(self) -> None:
        """Reads `self.instance` / `self.experiment`; raises GameError on a malformed instance."""

    def play(self) -> Generator[Request, str, None]:
        raise NotImplementedError

    def compute_scores(self) -> None:
        """Fills `self.turn_scores` and `self.episode_scores` after `play` returned."""
        raise NotImplementedError

    # ----- helpers for play() -----------------------------------------------------------------
    @property
    def current_round(self) -> int:
        return len(self.turns) - 1

    def next_round(self) -> None:
        self.turns.append([])
        self.request_counts.append(0)
        self.parsed_counts.append(0)
        self.violated_counts.append(0)

    def log_event(self, from_: str, to: str, type_: str, content: Any) -> None:
        self.turns[-1].append(Event(from_, to, type_, content, _now()))

    def log_to_self(self, type_: str, content: Any) -> None:
        self.log_event("GM", "GM", type_, content)

    def count_parsed(self) -> None:
        self.parsed_counts[-1] += 1

    def count_violated(self) -> None:
        self.violated_counts[-1] += 1

    def add_message(self, player: int, content: str, role: str = "user") -> None:
        """Adds to a player's context without asking it (merged with the next prompt)."""
        history = self.histories[player]
        if history and history[-1]["role"] == role == "user":
            history[-1] = {"role": "user", "content": history[-1]["content"] + "\n\n" + content}
        else:
            history.append({"role": role, "content": content})

    def ask(self, player: int, content: str | None, *, probe: bool = False,
            log_prompt: bool = True, log_reply: bool = True) -> Generator[Request, str, str]:
        """Sends `content` to a player and returns its reply (use with `yield from`).

        With `probe=True` the exchange happens in a copy of the player's context and is not kept
        there; it is kept in `probe_chats`.
        With `content=None` the player answers its context as it stands. `log_prompt=False` /
        `log_reply=False` keep the prompt / the reply out of the interaction log (for exchanges a
        game logs in its own way, e.g. as GM->GM bookkeeping).
        """
        name = self.player_names[player]
        if probe:
            messages = list(self.histories[player])
            if content is not None:
                messages.append({"role": "user", "content": content})
        else:
            if content is not None:
                self.add_message(player, content)
            messages = self.histories[player]
        if log_prompt and content is not None:
            self.log_event("GM", name, "send message", content)
        self.request_counts[-1] += 1
        request = Request(name, self.roles[player], tuple(dict(m) for m in messages), probe)
        reply = yield request
        if not isinstance(reply, str):
            reply = "" if reply is None else str(reply)
        if log_reply:
            self.log_event(name, "GM", "get message", reply)
        if probe:
            self.probe_chats[player].append(request.messages + ({"role": "assistant", "content": reply},))
        else:
            self.histories[player].append({"role": "assistant", "content": reply})
        return reply

    # ----- driving ----------------------------------------------------------------------------
    def start(self) -> Request | None:
        """Starts the episode; returns the first request (None if the game needs no one)."""
        if self._gen is not None:
            raise RuntimeError("episode already started")
        self._gen = self.play()
        return self._advance(None)

    def step(self, reply: str) -> Request | None:
        """Feeds the reply to the pending request; returns the next request, or None when done."""
        if self._pending is None:
            raise RuntimeError("no pending request: call start() first, or the episode is over")
        return self._advance(reply)

    @property
    def pending(self) -> Request | None:
        return self._pending

    def _advance(self, reply: str | None) -> Request | None:
        try:
            self._pending = self._gen.send(reply) if reply is not None else next(self._gen)
        except StopIteration:
            self._pending = None
            self._finish()
        return self._pending

    def _finish(self) -> None:
        self.done = True
        self.compute_scores()
        es = self.episode_scores
        for key in (METRIC_ABORTED, METRIC_LOSE, METRIC_SUCCESS, BENCH_SCORE):
            if key not in es:
                raise RuntimeError(f"{self.game_name}: compute_scores did not set {key!r}")
        requests = sum(self.request_counts)
        parsed = sum(self.parsed_counts)
        es.setdefault(METRIC_REQUEST_COUNT, requests)
        es.setdefault(METRIC_REQUEST_COUNT_PARSED, parsed)
        es.setdefault(METRIC_REQUEST_COUNT_VIOLATED, sum(self.violated_counts))
        es.setdefault(METRIC_REQUEST_SUCCESS_RATIO, parsed / requests if requests else 0.0)
        if es[METRIC_ABORTED]:
            es[BENCH_SCORE] = math.nan

    # ----- standard scoring helpers -------------------------------------------------------------
    def log_turn_score(self, round_index: int, key: str, value: Any) -> None:
        self.turn_scores.setdefault(round_index, {})[key] = value

    def log_request_turn_scores(self) -> None:
        """Per-round request counts as turn scores (what every clembench scorer logs)."""
        for i in range(len(self.turns)):
            self.log_turn_score(i, METRIC_REQUEST_COUNT, self.request_counts[i])
            self.log_turn_score(i, METRIC_REQUEST_COUNT_PARSED, self.parsed_counts[i])
            self.log_turn_score(i, METRIC_REQUEST_COUNT_VIOLATED, self.violated_counts[i])

    def set_outcome(self, *, aborted: bool, success: bool, score: float | None) -> None:
        """Sets Aborted/Success/Lose and Main Score (NaN when aborted)."""
        self.episode_scores[METRIC_ABORTED] = int(bool(aborted))
        self.episode_scores[METRIC_SUCCESS] = int(bool(success) and not aborted)
        self.episode_scores[METRIC_LOSE] = int(not aborted and not success)
        self.episode_scores[BENCH_SCORE] = math.nan if aborted or score is None else float(score)

    # ----- records ------------------------------------------------------------------------------
    def interactions(self, experiment_name: str = "", game_id: Any = None) -> dict:
        players: dict[str, Any] = {"GM": {"game_role": "Game Master", "model_name": "programmatic"}}
        for name, role, model in zip(self.player_names, self.roles, self.player_models):
            players[name] = {"game_role": role, "model_name": model}
        return {
            "meta": {
                "game_name": self.game_name,
                "experiment_name": experiment_name or self.experiment.get("name", ""),
                "game_id": self.instance.get("game_id") if game_id is None else game_id,
                "round_count": len(self.turns),
                "completed": self.done,
            },
            "player_models": dict(zip(self.player_names, self.player_models)),
            "players": players,
            "turns": [[e.to_json() for e in rnd] for rnd in self.turns],
        }

    def scores(self) -> dict:
        if not self.done:
            raise RuntimeError("scores exist only once the episode is over")
        return {
            "turn scores": {str(k): v for k, v in sorted(self.turn_scores.items())},
            "episode scores": dict(self.episode_scores),
        }


# A player maps the messages it has seen to its reply.
PlayerFn = Callable[[Sequence[Message]], str]


def run_episode(master: GameMaster, players: Sequence[PlayerFn] | Mapping[str, PlayerFn]) -> GameMaster:
    """Plays one episode to the end, each request answered by the player of its role."""
    by_role = dict(players) if isinstance(players, Mapping) else dict(zip(master.roles, players))
    missing = [r for r in master.roles if r not in by_role]
    if missing:
        raise GameError(f"{master.game_name}: no player for role(s) {missing}")
    req = master.start()
    while req is not None:
        req = master.step(by_role[req.role](list(req.messages)))
    return master


def mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else math.nan
