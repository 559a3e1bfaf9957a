"""A batched environment: many episodes of many games in flight at once.

The environment keeps up to `batch_size` live episodes. Roles played by programmatic players are
answered inside the environment; every other request is handed out by `pending()` — which episode,
which role, the chat messages so far, and whether that role is the learner — and `step(replies)`
takes back one reply per request. The caller answers all pending requests of one step together
(one generate call per model), episodes finish independently, and finished episodes are replaced by
the next ones from the source.

    env = BatchedGameEnv(source, batch_size=32, learner_roles={"taboo": ["WordGuesser"]},
                         partner="strong")
    while not env.done:
        reqs = env.pending()
        finished = env.step(policy([r.messages for r in reqs]))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from games import registry
from games.core import BENCH_SCORE, METRIC_ABORTED, METRIC_SUCCESS, GameError, GameMaster, Message, Request


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How an episode's scores become a scalar reward.

    kind: "quality" (Main Score / 100) or "success" (1 on success, else 0).
    abort_penalty: an aborted episode's reward is -abort_penalty (it has no Main Score).
    """

    kind: str = "quality"
    abort_penalty: float = 0.5

    def __post_init__(self):
        if self.kind not in ("quality", "success"):
            raise GameError(f"reward kind must be 'quality' or 'success', got {self.kind!r}")
        if not math.isfinite(self.abort_penalty):
            raise GameError(f"abort_penalty must be finite, got {self.abort_penalty}")

    def __call__(self, episode_scores: Mapping[str, Any]) -> float:
        if episode_scores.get(METRIC_ABORTED):
            return -float(self.abort_penalty)
        if self.kind == "success":
            return float(bool(episode_scores.get(METRIC_SUCCESS)))
        q = episode_scores.get(BENCH_SCORE)
        if q is None or (isinstance(q, float) and math.isnan(q)):
            return 0.0
        return float(q) / 100.0


@dataclasses.dataclass(frozen=True)
class EnvRequest:
    """A request handed out by the environment; answer it through `step` by its `id`."""

    id: int
    episode_id: int
    game: str
    role: str
    player: str
    messages: tuple[Message, ...]
    learner: bool
    probe: bool = False


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    """One answered request of an episode, in order."""

    role: str
    player: str
    messages: tuple[Message, ...]
    reply: str
    learner: bool
    probe: bool
    scripted: bool = False  # replayed from the episode's script, not answered by a player


@dataclasses.dataclass
class FinishedEpisode:
    episode_id: int
    episode: registry.Episode
    master: GameMaster
    reward: float
    turns: list[TurnRecord]
    learner_roles: tuple[str, ...]
    tag: Any = None  # what the source attached (e.g. a GRPO group id)

    @property
    def scores(self) -> dict:
        return self.master.scores()

    @property
    def episode_scores(self) -> dict:
        return self.master.episode_scores

    def conversation(self, player: str) -> list[Message]:
        """The player's whole chat (its context with all its replies)."""
        i = self.master.player_names.index(player)
        return list(self.master.histories[i])


# A partner answers a request from its messages; a kind name ("strong", "weak") builds the
# game's programmatic player of that kind for each episode.
Partner = str | None


@dataclasses.dataclass
class _Live:
    episode_id: int
    episode: registry.Episode
    master: GameMaster
    players: dict  # role -> programmatic player fn (roles absent are answered from outside)
    learner: frozenset
    turns: list
    tag: Any
    request: Request | None = None
    request_id: int | None = None
    script: list = dataclasses.field(default_factory=list)  # replies for the first requests


class BatchedGameEnv:
    """Runs episodes from `source` (Episodes, or (Episode, tag) pairs) `batch_size` at a time.

    A source item (Episode, tag, script) replays `script` (a list of reply texts) as the answers to
    the episode's first len(script) requests, whoever they are for, and then plays on normally:
    this branches an episode from a recorded prefix (the game masters are deterministic).

    learner_roles: roles the learner plays; "all" (self-play: every role is the learner), or a
      mapping game -> roles, or a sequence of role names applied to every game. Roles of a game
      that are not the learner's are the partner's.
    partner: "strong" / "weak" (programmatic players inside the env), or None (partner requests
      are handed out too, with `learner=False`, for the caller to route to another model).
    player_models: names written into the records, by "learner" / "partner".
    """

    def __init__(self, source: Iterable[registry.Episode | tuple[registry.Episode, Any]], *,
                 batch_size: int = 32,
                 learner_roles: str | Mapping[str, Sequence[str]] | Sequence[str] = "all",
                 partner: Partner = "strong", reward: RewardConfig | None = None, seed: int = 0,
                 learner_name: str = "policy", partner_name: str | None = None,
                 on_finish: Callable[[FinishedEpisode], None] | None = None):
        if batch_size < 1:
            raise GameError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.learner_roles = learner_roles
        self.partner = partner
        self.reward = reward or RewardConfig()
        self.seed = seed
        self.learner_name = learner_name
        self.partner_name = partner_name or (f"{partner}-programmatic" if isinstance(partner, str)
                                             else "partner")
        self.on_finish = on_finish
        self._source: Iterator = iter(source)
        self._exhausted = False
        self._live: list[_Live] = []
        self._next_episode = 0
        self._next_request = 0
        self._by_request: dict[int, _Live] = {}
        self.finished_count = 0
        self._finished_now: list[FinishedEpisode] = []
        self._refill()

    # ----- which roles belong to whom -------------------------------------------------------------
    def _learner_for(self, game: str, roles: Sequence[str]) -> frozenset:
        lr = self.learner_roles
        if lr == "all":
            chosen = set(roles)
        elif isinstance(lr, Mapping):
            chosen = set(lr.get(game, roles if game not in lr else ()))
        else:
            chosen = set(lr) & set(roles)
        unknown = chosen - set(roles)
        if unknown:
            raise GameError(f"{game}: learner role(s) {sorted(unknown)} not among {list(roles)}")
        if not chosen:
            raise GameError(f"{game}: the learner plays none of the roles {list(roles)}")
        return frozenset(chosen)

    # ----- episode lifecycle ----------------------------------------------------------------------
    def _refill(self) -> None:
        while len(self._live) < self.batch_size and not self._exhausted:
            try:
                item = next(self._source)
            except StopIteration:
                self._exhausted = True
                break
            if not isinstance(item, tuple):
                item = (item, None)
            self._start(*item)

    def _start(self, ep: registry.Episode, tag: Any, script: Sequence[str] = ()) -> None:
        spec = registry.get(ep.game)
        learner = self._learner_for(ep.game, spec.roles)
        players = {}
        for role in spec.roles:
            if role not in learner and isinstance(self.partner, str):
                players[role] = registry.make_player(ep.game, self.partner, role, ep,
                                                     seed=self.seed + self._next_episode)
        models = [self.learner_name if r in learner else
                  (self.partner_name if r in players or self.partner is None else "partner")
                  for r in spec.roles]
        master = registry.make_master(ep, player_models=models)
        live = _Live(self._next_episode, ep, master, players, learner, [], tag, script=list(script))
        self._next_episode += 1
        self._live.append(live)
        self._advance(live, master.start())

    def _advance(self, live: _Live, req: Request | None) -> None:
        # Scripted replies, then programmatic players, answer inside the environment until an
        # outside request or the end.
        while req is not None and (live.script or req.role in live.players):
            scripted = bool(live.script)
            if scripted:
                reply = live.script.pop(0)
            else:
                reply = live.players[req.role](list(req.messages))
            learner = scripted and req.role in live.learner
            live.turns.append(TurnRecord(req.role, req.player, req.messages, reply, learner, req.probe,
                                         scripted))
            req = live.master.step(reply)
        live.request = req
        if req is None:
            self._finish(live)
            return
        live.request_id = self._next_request
        self._next_request += 1
        self._by_request[live.request_id] = live

    def _finish(self, live: _Live) -> None:
        self._live.remove(live)
        fin = FinishedEpisode(live.episode_id, live.episode, live.master,
                              self.reward(live.master.episode_scores), live.turns,
                              tuple(sorted(live.learner)), live.tag)
        self.finished_count += 1
        self._finished_now.append(fin)
        if self.on_finish is not None:
            self.on_finish(fin)

    # ----- public API -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._exhausted and not self._live

    @property
    def live_count(self) -> int:
        return len(self._live)

    def pending(self) -> list[EnvRequest]:
        """Every request waiting for an outside reply, oldest episode first."""
        out = []
        for live in self._live:
            r = live.request
            if r is not None:
                out.append(EnvRequest(live.request_id, live.episode_id, live.episode.game, r.role,
                                      r.player, r.messages, r.role in live.learner, r.probe))
        return out

    def step(self, replies: Mapping[int, str] | Sequence[str]) -> list[FinishedEpisode]:
        """Answers pending requests (a mapping request id -> reply, or a list in `pending()` order)
        and returns the episodes that finished, after refilling the batch."""
        if not isinstance(replies, Mapping):
            reqs = self.pending()
            if len(replies) != len(reqs):
                raise GameError(f"step got {len(replies)} replies for {len(reqs)} pending requests")
            replies = {r.id: text for r, text in zip(reqs, replies)}
        for rid in replies:
            if rid not in self._by_request:
                raise GameError(f"no pending request with id {rid}")
        for rid, text in replies.items():
            live = self._by_request.pop(rid)
            req = live.request
            text = text if isinstance(text, str) else ("" if text is None else str(text))
            live.turns.append(TurnRecord(req.role, req.player, req.messages, text,
                                         req.role in live.learner, req.probe))
            self._advance(live, live.master.step(text))
        self._refill()
        finished, self._finished_now = self._finished_now, []
        return finished

    def run(self, policy: Callable[[list[EnvRequest]], Sequence[str]]) -> list[FinishedEpisode]:
        """Plays until the source is exhausted; `policy` answers a list of requests at once."""
        finished, self._finished_now = self._finished_now, []
        while not self.done:
            reqs = self.pending()
            if not reqs:
                raise RuntimeError("live episodes but no pending requests")
            finished.extend(self.step({r.id: t for r, t in zip(reqs, policy(reqs))}))
        return finished
