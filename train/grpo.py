"""GRPO on game play: the loss over a micro-batch, and one iteration's rollouts as a batch.

An iteration picks `groups_per_step` training instances and plays each `group_size` times (one
group per instance) with the current policy sampling the learner's turns. Each episode's reward
comes from its scores (`games.env.RewardConfig`); advantages are normalised within the group
(`train.losses.group_advantages`). A group whose rewards are all equal has zero advantages and no
policy-gradient signal: with `drop_zero_variance` its rows are left out, and with
`dynamic_sampling` (DAPO) new groups are played until the step has `groups_per_step` informative
ones (see `collect`). Every learner turn of the episode is trained on as the sampler saw it (the
prompt it was given + the sampled reply), and all its reply tokens carry the episode's advantage;
with `grpo.credit=abort_turn`, an aborted episode trains only the reply that broke the game's rules
(`credited_turns`). Of the probe turns (questions a game asks outside the chat), `grpo.probe_turns`
per episode train (`probe_picks`); the others are left out and counted in "dropped_probes".
With `grpo.merge_turns` (the default) the turns of one episode whose prompts continue a player's
chat share one sequence, that player's whole chat with the loss on each of its replies
(`buffers.chat_sequences`; in self-play one sequence per player): the same token-mean loss and
gradient as one sequence per turn, at a fraction of the tokens. Old log-probs are the sampler's
own. Turns whose sequence would be longer than `batch.max_seq_len` are left out and counted.

Metrics: "rows" counts the learner turns trained on (each turn's reply), "sequences" the
sequences they were laid out in and "sequence_tokens" those sequences' tokens (the work of the
update).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import numpy as np
from ml_collections import ConfigDict

from games.core import METRIC_ABORTED, METRIC_SUCCESS
from games.env import BatchedGameEnv
from models.config import LlamaConfig
from playpen_jax import buffers, distributed
from playpen_jax.rollout import play
from train import losses


def make_loss_fn(model_config: LlamaConfig, c: ConfigDict, max_tokens: int):
    g = c.grpo
    use_ref = g.kl != "none" and g.beta > 0
    eps_high = float(g.clip_eps_high)

    def loss_fn(params, mb, extra):
        lp, mask = losses.sequence_logprobs(params, mb["tokens"], mb["positions"], mb["segment_ids"],
                                            mb["loss_mask"], config=model_config)
        ref = None
        if use_ref:
            ref, _ = losses.sequence_logprobs(extra["ref_params"], mb["tokens"], mb["positions"],
                                              mb["segment_ids"], mb["loss_mask"], config=model_config)
            ref = jax.lax.stop_gradient(ref)
        # GSPO's sequence ratio needs one advantage per row (rows then hold one sequence each:
        # the config requires a per-sequence aggregation, which packs nothing)
        adv = mb["advantages"] if g.ratio_level == "sequence" else mb["token_advantages"]
        loss, metrics = losses.grpo_loss(lp, mb["old_logprobs"], ref, adv, mask,
                                         clip_eps=float(g.clip_eps), clip_eps_high=eps_high,
                                         beta=float(g.beta), kl=g.kl, aggregation=g.aggregation,
                                         max_tokens=float(max_tokens), ratio_level=g.ratio_level)
        return loss, metrics

    return loss_fn


def uses_reference(c: ConfigDict) -> bool:
    return c.grpo.kl != "none" and c.grpo.beta > 0


@dataclasses.dataclass
class Rollouts:
    sequences: list
    finished: list          # (FinishedEpisode, traces)
    metrics: dict


def episode_metrics(finished, per_game: bool = False) -> dict:
    """reward, % played, quality (Main Score of played episodes), success rate of episodes; with
    `per_game`, also each game's `episodes_<game>`, `played_<game>` and `success_<game>` (a step
    draws its games at random, so the overall numbers mix games of very different difficulty)."""
    if not finished:
        return {}
    rewards = [f.reward for f, _ in finished]
    es = [f.episode_scores for f, _ in finished]
    aborted = [bool(e.get(METRIC_ABORTED)) for e in es]
    won = [bool(e.get(METRIC_SUCCESS)) for e in es]
    quals = [e.get("Main Score") for e, a in zip(es, aborted) if not a]
    quals = [q for q in quals if q is not None and not (isinstance(q, float) and math.isnan(q))]
    out = {
        "episodes": len(finished),
        "reward": float(np.mean(rewards)),
        "played": 100.0 * (1.0 - float(np.mean(aborted))),
        "quality": float(np.mean(quals)) if quals else float("nan"),
        "success": float(np.mean(won)),
    }
    if per_game:
        games = [f.episode.game for f, _ in finished]
        for g in sorted(set(games)):
            idx = [i for i, x in enumerate(games) if x == g]
            out[f"episodes_{g}"] = len(idx)
            out[f"played_{g}"] = 100.0 * (1.0 - float(np.mean([aborted[i] for i in idx])))
            out[f"success_{g}"] = float(np.mean([won[i] for i in idx]))
    return out


def overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of one reply of `length` tokens with
    L_max = max_new_tokens and L_cache = buffer: 0 up to L_max - L_cache tokens, then falling linearly
    to -1 at L_max (the reply was cut there), -1 beyond."""
    if buffer <= 0:
        return -1.0 if length >= max_new_tokens else 0.0
    free = max_new_tokens - buffer
    if length <= free:
        return 0.0
    return -1.0 if length >= max_new_tokens else (free - length) / buffer


def credited_turns(f, traces: list, credit: str) -> list:
    """Which of an episode's learner turns (its traces, in play order) carry its advantage.

    credit="episode": all of them. credit="abort_turn": in an aborted episode only the reply that
    broke the rules. A game master aborts on the reply it cannot accept, so that reply is the
    episode's last answered request; if it was the learner's, it is the last trace, and if it was
    the partner's (or replayed from a script), no learner turn is blamed. The turns before it were
    accepted by the game, and an episode-level penalty on them would push down valid moves for a
    later turn's break; they stay in their sequences as context, with no loss. An episode played to
    the end (won or lost) trains every turn, as with "episode".
    """
    n = len(traces)
    if credit == "episode" or not f.episode_scores.get(METRIC_ABORTED):
        return [True] * n
    last = f.turns[-1] if f.turns else None
    blamed = last is not None and last.learner and not last.scripted
    return [blamed and k == n - 1 for k in range(n)]


def probe_picks(traces: list, limit: int) -> set:
    """Which of an episode's probe turns (`Trace.probe`) train: all with limit -1; else `limit` of
    them spread from the first to the last, and the episode's last turn if it is a probe (the
    reply an abort at a probe blames). A probe is a side branch of its player's chat, so leaving one
    out changes no other turn's prompt; its row would repeat the chat so far."""
    probes = [k for k, t in enumerate(traces) if t is not None and t.probe]
    if limit < 0:
        return set(probes)
    keep = {probes[i] for i in buffers.spread_picks(len(probes), limit)}
    if limit > 0 and probes and probes[-1] == len(traces) - 1:
        keep.add(probes[-1])
    return keep


def _draw(rng: np.random.Generator, pool: list, n: int) -> list:
    picks = []
    for _ in range(n):
        game = pool[int(rng.integers(len(pool)))]
        picks.append(game[int(rng.integers(len(game)))])
    return picks


def collect(pool: list, c: ConfigDict, step: int, learner, partner, learner_roles,
            reward_config, *, env_partner: Optional[str], shard: int = 0, shards: int = 1) -> Rollouts:
    """Plays one iteration's groups and returns the rows to train on.

    pool: the training instances of each game; a group's game is drawn uniformly, then its instance.
    shard / shards: play only block `shard` of `shards` contiguous blocks of the iteration's groups
      (each process of a multi-process run plays its own block); group ids and the programmatic
      partners' seeds are those the groups have when one process plays them all.

    Rewards: the episode's reward, plus with `grpo.overlong=penalty` the mean over its learner turns
    of `overlong_penalty` (times `grpo.overlong_penalty`). With `grpo.overlong=filter` a reply cut at
    `rollout.max_new_tokens` trains nothing (its row is left out), though its episode still counts
    in its group's statistics.

    Credit (`grpo.credit`): which learner turns of an episode carry its advantage (`credited_turns`);
    the turns left out stay in their chat as context and are counted in "context_turns".

    Dynamic sampling (`grpo.dynamic_sampling`, DAPO): while fewer than `groups_per_step` groups have
    unequal rewards, play more groups (new draws of instances), at most `grpo.max_refill_rounds`
    times; a round plays the missing number of groups divided by the share of informative groups
    seen so far, at most `groups_per_step`. The first `groups_per_step` informative groups, in the
    order they were drawn, are kept; the step trains on fewer when the rounds run out.
    """
    g = c.grpo
    size = int(g.group_size)
    target = int(g.groups_per_step)
    rng = np.random.default_rng([int(c.seed), int(step), 1])
    max_new = int(c.rollout.max_new_tokens)
    finished, flat_all, played = [], [], 0   # flat_all: one flag per group drawn, in draw order
    n, rounds = target, 0
    while True:
        picks = _draw(rng, pool, n)
        lo, hi = distributed.share(n, shard, shards)
        first = played + lo   # the global number of this block's first group
        source = [(picks[k], played + k) for k in range(lo, hi) for _ in range(size)]
        env = BatchedGameEnv(iter(source), batch_size=max(1, len(source)), learner_roles=learner_roles,
                             partner=env_partner, reward=reward_config,
                             seed=int(c.seed) * 1_000_003 + step + first * size)
        mine = play(env, learner, partner, episode_offset=first * size) if source else []
        mine.sort(key=lambda x: x[0].episode_id)
        finished.extend(mine)
        flags = np.full((n,), -1, np.int32)   # -1: another shard's group
        for gid in range(played + lo, played + hi):
            r = [_reward(f, t, g, max_new) for f, t in mine if f.tag == gid]
            flags[gid - played] = int(bool(r) and np.ptp(r) == 0)
        if g.dynamic_sampling and shards > 1:   # every shard's flags: all processes take the same rounds
            flags = distributed.allgather(flags).max(axis=0)
        flat_all.extend(int(x) for x in flags)
        played += n
        informative = played - sum(x == 1 for x in flat_all)
        if not g.dynamic_sampling or informative >= target or rounds >= int(g.max_refill_rounds):
            break
        rounds += 1
        rate = max(informative / played, 1.0 / target)
        n = min(target, math.ceil((target - informative) / rate))

    rewards = np.asarray([_reward(f, t, g, max_new) for f, t in finished], np.float32)
    groups = np.asarray([f.tag for f, _ in finished], np.int32)
    adv = (np.asarray(losses.group_advantages(rewards, groups, scale=g.advantage_scale)) if finished
           else np.zeros((0,), np.float32))
    flat = {gid for gid, x in enumerate(flat_all) if x == 1}
    kept = [gid for gid in range(played) if gid not in flat][:target] if g.dynamic_sampling else None
    seqs, no_fit, flat_turns, overlong, surplus, context, probes_out = [], 0, 0, 0, 0, 0, 0
    for (f, traces), a in zip(finished, adv):
        if (g.drop_zero_variance or g.dynamic_sampling) and int(f.tag) in flat:
            flat_turns += len(traces)
            continue
        if kept is not None and int(f.tag) not in kept:
            surplus += len(traces)
            continue
        turns = []
        probes = probe_picks(traces, int(g.probe_turns))
        for k, (t, credited) in enumerate(zip(traces, credited_turns(f, traces, g.credit))):
            if t is None:
                no_fit += 1
                turns.append(None)
                continue
            if t.probe and k not in probes:
                probes_out += 1
                continue
            cut = g.overlong == "filter" and t.truncated
            overlong += int(cut)
            context += int(not credited and not cut)
            turns.append((t.prompt_ids, t.tokens, t.logprobs, credited and not cut))
        scalars = {"advantage": float(a), "reward": f.reward, "group": int(f.tag)}
        if g.merge_turns:
            seqs.extend(buffers.chat_sequences(turns, max_len=int(c.batch.max_seq_len), **scalars))
        else:
            seqs.extend(s for t in turns if t is not None for s in buffers.chat_sequences([t], **scalars))
    fitting, _ = buffers.split_fitting(seqs, int(c.batch.max_seq_len))
    dropped = sum(s.turns for s in seqs if len(s.tokens) > int(c.batch.max_seq_len))   # turns, not rows
    m = episode_metrics(finished, per_game=True)
    mine_flat = sum(1 for gid in {int(f.tag) for f, _ in finished} if gid in flat)
    m.update({"learner_turns": sum(len(t) for _, t in finished), "rows": sum(s.turns for s in fitting),
              "sequences": len(fitting), "sequence_tokens": int(sum(len(s.tokens) for s in fitting)),
              "dropped_long": dropped + no_fit, "zero_variance_groups": mine_flat,
              "dropped_zero_variance": flat_turns,
              "sampled_tokens": int(sum(sum(s.loss_mask) for s in fitting)),
              "truncated_replies": sum(1 for _, ts in finished for t in ts if t is not None and t.truncated)})
    if g.overlong == "filter":
        m["dropped_overlong"] = overlong
    if g.credit != "episode":
        m["context_turns"] = context
    if probes_out:
        m["dropped_probes"] = probes_out
    if g.overlong == "penalty":
        m["penalized_replies"] = sum(
            1 for _, ts in finished for t in ts if t is not None
            and overlong_penalty(len(t.tokens), max_new, int(g.overlong_buffer)) < 0)
    if g.dynamic_sampling:
        m["dropped_surplus"] = surplus
        m["groups_played"] = len({int(f.tag) for f, _ in finished})
    return Rollouts(fitting, finished, m)


def _reward(f, traces, g: ConfigDict, max_new_tokens: int) -> float:
    """The episode's reward for its advantage: with grpo.overlong=penalty, plus the mean soft
    overlong penalty of its learner replies."""
    if g.overlong != "penalty":
        return float(f.reward)
    lengths = [len(t.tokens) for t in traces if t is not None]
    if not lengths:
        return float(f.reward)
    pen = np.mean([overlong_penalty(n, max_new_tokens, int(g.overlong_buffer)) for n in lengths])
    return float(f.reward) + float(g.overlong_penalty) * float(pen)
