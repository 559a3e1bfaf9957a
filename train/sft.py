"""SFT on the learner role's turns of episode records.

Sources:
- "strong": the strong programmatic players play training instances of the configured games (every
  role programmatic); episodes are played in memory, deterministically from the seed.
- a directory of clembench-format records (both layouts, see `games.records`): every episode is
  replayed through its game master, which rebuilds each player's chat exactly as the player saw it.

Each learner player's whole chat (its prompts and its replies, all turns) becomes one row: the ids of
the chat template, with the loss on the assistant turns only (`Tokenizer.encode_chat`'s mask).
A probe (a question a game asks outside the player's chat, e.g. privateshared's "ME: ... yes or
no" checks) is not in that chat, so `sft.probe_rows` of each player's probe exchanges per episode,
spread evenly from its first to its last, become rows of their own: the chat as the probe was
asked, with the loss on the probe's reply only. Without them a learner never sees a probe reply
and breaks that game's format at its first probe.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from ml_collections import ConfigDict

from games import records, registry, replay
from games.core import METRIC_SUCCESS, run_episode
from games.eval import parse_roles
from models.config import LlamaConfig
from playpen_jax import buffers
from playpen_jax.config import ConfigError
from train import losses


def make_loss_fn(model_config: LlamaConfig):
    def loss_fn(params, mb, extra):
        lp, mask = losses.sequence_logprobs(params, mb["tokens"], mb["positions"], mb["segment_ids"],
                                            mb["loss_mask"], config=model_config)
        return losses.sft_loss(lp, mask)

    return loss_fn


def _learner_players(master, game: str, learner_roles) -> list[str]:
    roles = master.roles
    chosen = roles if learner_roles == "all" else learner_roles.get(game, roles)
    return [master.player_names[roles.index(r)] for r in chosen]


def _chat_rows(tokenizer, master, game, learner_roles, probe_rows: int = 0) -> list:
    rows = []
    for player in _learner_players(master, game, learner_roles):
        index = master.player_names.index(player)
        chat = master.histories[index]
        if any(m["role"] == "assistant" for m in chat):
            enc = tokenizer.encode_chat(list(chat))
            rows.append(buffers.TokenSequence(list(enc.ids), [int(x) for x in enc.assistant_mask]))
        probes = master.probe_chats[index]
        for k in buffers.spread_picks(len(probes), probe_rows):
            enc = tokenizer.encode_chat(list(probes[k]))
            _, start, end = enc.turns[-1]
            mask = [0] * len(enc.ids)
            mask[start:end] = [1] * (end - start)
            rows.append(buffers.TokenSequence(list(enc.ids), mask))
    return rows


def strong_episodes(games: list, per_game: int, seed: int) -> list:
    masters = []
    for game in games:
        eps = registry.instances(game, "train", seed)
        order = np.random.default_rng([seed, 7]).permutation(len(eps))[:per_game]
        spec = registry.get(game)
        for k, i in enumerate(order):
            ep = eps[int(i)]
            players = {r: registry.make_player(game, "strong", r, ep, seed=seed + k) for r in spec.roles}
            masters.append((game, run_episode(registry.make_master(ep), players)))
    return masters


def record_episodes(root: str, games: set) -> list:
    if not os.path.isdir(root):
        raise ConfigError(f"sft.source={root!r} is neither 'strong' nor a records directory")
    masters, bad = [], 0
    for folder in records.find_episodes(root):
        try:
            rec = records.read_episode(folder)
        except Exception as e:  # one unreadable episode does not stop the others; it is counted
            print(f"sft: skipping {folder}: {e}", file=sys.stderr)
            bad += 1
            continue
        if rec.game not in games:
            continue
        res = replay.replay_record(rec)
        if res.master is None:
            print(f"sft: skipping {folder}: {res.note or 'the episode did not replay'}", file=sys.stderr)
            bad += 1
            continue
        masters.append((rec.game, res.master))
    if not masters:
        raise ConfigError(f"sft.source={root!r}: no episode of the games {sorted(games)} found "
                         f"({bad} unreadable)")
    return masters


def build_dataset(c: ConfigDict, tokenizer, names: str | None = None) -> tuple[list, dict]:
    """The SFT rows and a summary (episodes, kept, rows, dropped), of the games `names`
    (default: `games.names`)."""
    games = registry.resolve_names(names or c.games.names)
    learner_roles = parse_roles(c.games.learner_roles, games)
    if c.sft.source == "strong":
        masters = strong_episodes(games, int(c.sft.episodes_per_game), int(c.seed))
    else:
        masters = record_episodes(c.sft.source, set(games))
    kept = [(g, m) for g, m in masters
            if not c.sft.only_success or m.episode_scores.get(METRIC_SUCCESS)]
    probe_rows = int(c.sft.probe_rows)
    rows = [r for g, m in kept for r in _chat_rows(tokenizer, m, g, learner_roles, probe_rows)]
    fitting, dropped = buffers.split_fitting(rows, int(c.batch.max_seq_len))
    if not fitting:
        raise ConfigError(f"SFT: no training rows ({len(masters)} episodes, {len(kept)} kept, "
                         f"{dropped} rows longer than batch.max_seq_len={c.batch.max_seq_len})")
    probes = sum(len(buffers.spread_picks(len(m.probe_chats[m.player_names.index(p)]), probe_rows))
                 for g, m in kept for p in _learner_players(m, g, learner_roles))
    info = {"episodes": len(masters), "episodes_kept": len(kept), "rows": len(fitting),
            "dropped_long": dropped, "probe_rows": probes}
    return fitting, info


def batch_for_step(rows: list, step: int, batch_size: int, seed: int) -> list:
    """The rows of one step: epochs are seeded permutations, so step s always gets the same rows."""
    n = len(rows)
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, 11, epoch]).permutation(n)
    picked = order[k * batch_size:(k + 1) * batch_size]
    return [rows[int(i)] for i in picked]
