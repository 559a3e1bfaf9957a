"""The rollout driver: game environments answered by the sampler, episodes kept as tokens.

`ModelPolicy(model)(requests)` turns each request's chat messages into a prompt with the model's
chat template, answers all of them in as few sampler calls as the batch size allows, and keeps the
sampled token ids and log-probs of the last call (`last`) for the trainer. A prompt that would not
fit the model's context gets an empty reply, which the game scores by its own rules. `params`
(default: the model's) may be replaced between calls, e.g. by the weights being trained.

Each turn of a game prompts with the whole chat so far, so a policy keeps the KV cache of its last
calls (`models.sampler.PrefixCache`) and prefills only what a prompt adds to a kept row: the reply
as the chat template wraps it and the next message. `play` empties it when the episodes end (and a
call with other params does). `prefix_cache=False` prefills every prompt whole. The kept caches
are bounded in bytes (`prefix_cache_bytes`; default `prefix_cache_share`, a quarter, of the memory
of the devices the sampler runs on, the host's on CPU): a game played by many episodes at once
keeps one cache per sampler call of a turn, and a call's cache can be GBs.

`play(env, learner, partner)` runs a `games.env.BatchedGameEnv` to the end: at every step all
pending learner requests of all live episodes go to the learner policy in one call (and the
partner's, when the partner is a model, to the partner). It returns each finished episode with the
learner's turns as the sampler produced them (`Trace`: prompt ids, sampled ids, their log-probs),
so training uses the exact tokens that were sampled, never a re-encoding of the text.

A model's reply is sampled from a key of its own: the policy's key folded with a seed made of the
episode's number and the turn's number within that episode (`turn_seed`). So an episode plays the
same way whichever other episodes share its sampler calls, however the batch is split into calls,
and whichever process of a multi-process run plays it (`episode_offset` numbers a process's
episodes as one process playing them all would).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax

from models import generate as gen
from models.sampler import PrefixCache, memory_bytes


@dataclasses.dataclass
class PolicyOutput:
    texts: list
    prompt_ids: list       # token ids of each prompt (None when it did not fit)
    tokens: list           # sampled token ids per reply (without padding)
    logprobs: list         # log-prob of each sampled token
    truncated: list = dataclasses.field(default_factory=list)  # reply cut at max_new_tokens


class ModelPolicy:
    def __init__(self, model, *, max_new_tokens: int = 200, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32, sampler=None,
                 strip: bool = True, params=None, prefix_cache: bool = True,
                 prefix_cache_bytes: Optional[int] = None, prefix_cache_share: float = 0.25):
        self.model = model
        self.params = model.params if params is None else params
        self.sampler = sampler or gen.make_sampler(model)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.batch_size = int(batch_size)
        self.strip = strip
        self._key = jax.random.PRNGKey(seed)
        self._calls = 0
        self.last: Optional[PolicyOutput] = None
        self.limit = int(model.config.max_position_embeddings)
        self.prefix_cache = None
        if prefix_cache:
            if prefix_cache_bytes is None:
                mesh = getattr(self.sampler, "mesh", None)
                total = memory_bytes(mesh.devices.flat if mesh is not None else None)
                prefix_cache_bytes = None if total is None else int(total * prefix_cache_share)
            self.prefix_cache = PrefixCache(max_bytes=prefix_cache_bytes)

    def forget(self) -> None:
        """Frees the KV caches kept for the next turn's prompts."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def player(self):
        """A single-episode player for `games.core.run_episode`: messages -> reply text."""
        return lambda messages: self([list(messages)])[0]

    def encode(self, messages: Sequence[dict]) -> list:
        return self.model.tokenizer.encode_chat(list(messages), add_generation_prompt=True).ids

    def __call__(self, requests: Sequence[Any], seeds: Optional[Sequence[int]] = None) -> list:
        """Reply texts for requests (env requests or chats). seeds: one per request; each reply is
        then sampled from `fold_in(key, seed)` whatever the batching. Without seeds, each sampler
        call takes the next key of the policy's sequence."""
        if seeds is not None and len(seeds) != len(requests):
            raise ValueError(f"ModelPolicy: {len(seeds)} seeds for {len(requests)} requests")
        chats = [list(r.messages) if hasattr(r, "messages") else list(r) for r in requests]
        prompts = [self.encode(c) for c in chats]
        texts = [""] * len(chats)
        tokens: list = [[] for _ in chats]
        logprobs: list = [[] for _ in chats]
        truncated = [False] * len(chats)
        fits = [i for i, p in enumerate(prompts) if len(p) + self.max_new_tokens <= self.limit]
        if self.prefix_cache is not None:   # this call's caches and the previous call's (two players)
            self.prefix_cache.max_entries = max(2, 2 * -(-len(fits) // self.batch_size))
        for start in range(0, len(fits), self.batch_size):
            idx = fits[start:start + self.batch_size]
            if seeds is None:
                key, row_seeds = jax.random.fold_in(self._key, self._calls), None
                self._calls += 1
            else:
                key, row_seeds = self._key, [int(seeds[i]) for i in idx]
            out = self.sampler.generate(
                self.params, [prompts[i] for i in idx], max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, rng=key,
                seeds=row_seeds, stop_ids=gen.stop_ids(self.model), tokenizer=self.model.tokenizer,
                prefix_cache=self.prefix_cache)
            for j, i in enumerate(idx):
                n = int(out.lengths[j])
                tokens[i] = [int(t) for t in out.tokens[j][:n]]
                logprobs[i] = [float(x) for x in out.logprobs[j][:n]]
                truncated[i] = out.finish_reasons[j] == "length"
                texts[i] = out.texts[j].strip() if self.strip else out.texts[j]
        fit = set(fits)
        self.last = PolicyOutput(texts, [p if i in fit else None for i, p in enumerate(prompts)], tokens,
                                 logprobs, truncated)
        return texts


@dataclasses.dataclass
class Trace:
    """One learner turn as sampled: the prompt's ids, the reply's ids and their log-probs."""

    prompt_ids: list
    tokens: list
    logprobs: list
    truncated: bool = False   # the reply hit max_new_tokens before a stop
    probe: bool = False       # asked outside the player's chat (`games.core.Request.probe`)


def turn_seed(episode: int, turn: int) -> int:
    """A 32-bit sampling seed for a player's `turn`-th reply in `episode` (splitmix64 of both)."""
    if episode < 0 or not 0 <= turn < 1 << 24:
        raise ValueError(f"turn_seed: episode {episode}, turn {turn} out of range")
    x = ((episode << 24) | turn) & 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0xFFFFFFFF


def _answer(policy: Callable, reqs: list, counts: dict, offset: int, first_turn: int = 0) -> list:
    """policy's replies to reqs; a ModelPolicy gets each reply's seed (episode, its turn number,
    counted from first_turn: the partner's from 2**23, apart from the learner's even when the
    partner is the learner's own policy)."""
    if not isinstance(policy, ModelPolicy):
        return policy(reqs)
    seeds = []
    for r in reqs:
        k = counts.get(r.episode_id, 0)
        counts[r.episode_id] = k + 1
        seeds.append(turn_seed(offset + r.episode_id, first_turn + k))
    return policy(reqs, seeds=seeds)


def play(env, learner: Callable, partner: Optional[Callable] = None,
         on_step: Optional[Callable[[int], None]] = None, episode_offset: int = 0) -> list:
    """Plays `env` to the end; returns [(FinishedEpisode, [Trace or None per learner turn])].

    learner / partner: callables over a list of env requests returning reply texts; a
    `ModelPolicy` learner also yields traces (None for a turn whose prompt did not fit).
    partner is needed only when the env hands out partner requests (its `partner` is None).
    on_step(number of requests answered) is called after every env step.
    episode_offset: added to env's episode ids in the sampling seeds (see the module docstring).
    """
    try:
        return _play(env, learner, partner, on_step, episode_offset)
    finally:   # the kept KV caches of these episodes' turns: no longer needed
        for policy in (learner, partner):
            if isinstance(policy, ModelPolicy):
                policy.forget()


def _play(env, learner, partner, on_step, episode_offset) -> list:
    traces: dict = {}
    turns: dict = {"learner": {}, "partner": {}}   # replies sampled so far, per episode
    finished = list(env.step({}))
    while not env.done:
        reqs = env.pending()
        if not reqs:
            raise RuntimeError("live episodes but no pending requests")
        mine = [r for r in reqs if r.learner]
        theirs = [r for r in reqs if not r.learner]
        replies = {}
        if mine:
            texts = _answer(learner, mine, turns["learner"], episode_offset)
            out = getattr(learner, "last", None)
            for i, r in enumerate(mine):
                replies[r.id] = texts[i]
                trace = None
                if isinstance(out, PolicyOutput) and out.prompt_ids[i] is not None:
                    trace = Trace(list(out.prompt_ids[i]), list(out.tokens[i]), list(out.logprobs[i]),
                                  bool(out.truncated[i]) if out.truncated else False, bool(r.probe))
                traces.setdefault(r.episode_id, []).append(trace)
        if theirs:
            if partner is None:
                raise RuntimeError("the environment hands out partner requests but no partner was given")
            for r, text in zip(theirs, _answer(partner, theirs, turns["partner"], episode_offset, 1 << 23)):
                replies[r.id] = text
        finished.extend(env.step(replies))
        if on_step is not None:
            on_step(len(reqs))
    return [(f, traces.pop(f.episode_id, [])) for f in finished]
