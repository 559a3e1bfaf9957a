"""GRPO on game play: the loss over a micro-batch, and one iteration's rollouts as a batch.

An iteration picks `groups_per_step` training instances and plays each `group_size` times (one
group per instance) with the current policy sampling the learner's turns. Each episode's reward
comes from its scores (`games.env.RewardConfig`); advantages are normalised within the group
(`train.losses.group_advantages`). A group whose rewards are all equal has zero advantages and no
policy-gradient signal: with `drop_zero_variance` its rows are left out (DAPO's dynamic-sampling
filter, without refilling the batch); every learner turn of the episode becomes one row (the prompt
the sampler was given + the sampled reply), and all its reply tokens carry the episode's advantage.
Old log-probs are the sampler's own. Rows longer than `batch.max_seq_len` are left out and counted.
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


def episode_metrics(finished) -> dict:
    """reward, % played, quality (Main Score of played episodes), success rate of episodes."""
    if not finished:
        return {}
    rewards = [f.reward for f, _ in finished]
    es = [f.episode_scores for f, _ in finished]
    aborted = [bool(e.get(METRIC_ABORTED)) for e in es]
    quals = [e.get("Main Score") for e, a in zip(es, aborted) if not a]
    quals = [q for q in quals if q is not None and not (isinstance(q, float) and math.isnan(q))]
    return {
        "episodes": len(finished),
        "reward": float(np.mean(rewards)),
        "played": 100.0 * (1.0 - float(np.mean(aborted))),
        "quality": float(np.mean(quals)) if quals else float("nan"),
        "success": float(np.mean([bool(e.get(METRIC_SUCCESS)) for e in es])),
    }


def collect(pool: list, c: ConfigDict, step: int, learner, partner, learner_roles,
            reward_config, *, env_partner: Optional[str], shard: int = 0, shards: int = 1) -> Rollouts:
    """Plays one iteration's groups and returns the rows to train on.

    pool: the training instances of each game; a group's game is drawn uniformly, then its instance.
    shard / shards: play only block `shard` of `shards` contiguous blocks of the iteration's groups
      (each process of a multi-process run plays its own block); group ids and the programmatic
      partners' seeds are those the groups have when one process plays them all.
    """
    g = c.grpo
    rng = np.random.default_rng([int(c.seed), int(step), 1])
    picks = []
    for _ in range(int(g.groups_per_step)):
        game = pool[int(rng.integers(len(pool)))]
        picks.append(game[int(rng.integers(len(game)))])
    lo, hi = distributed.share(len(picks), shard, shards)
    source = [(picks[gid], gid) for gid in range(lo, hi) for _ in range(g.group_size)]
    env = BatchedGameEnv(iter(source), batch_size=max(1, len(source)), learner_roles=learner_roles,
                         partner=env_partner, reward=reward_config,
                         seed=int(c.seed) * 1_000_003 + step + lo * int(g.group_size))
    finished = play(env, learner, partner, episode_offset=lo * int(g.group_size)) if source else []
    finished.sort(key=lambda x: x[0].episode_id)
    rewards = np.asarray([f.reward for f, _ in finished], np.float32)
    groups = np.asarray([f.tag for f, _ in finished], np.int32)
    adv = (np.asarray(losses.group_advantages(rewards, groups, scale=g.advantage_scale)) if finished
           else np.zeros((0,), np.float32))
    flat = {gid for gid in set(groups.tolist()) if np.ptp(rewards[groups == gid]) == 0}
    seqs, no_fit, flat_turns = [], 0, 0
    for (f, traces), a in zip(finished, adv):
        if g.drop_zero_variance and int(f.tag) in flat:
            flat_turns += len(traces)
            continue
        for t in traces:
            if t is None:
                no_fit += 1
                continue
            if t.tokens:
                seqs.append(buffers.completion(t.prompt_ids, t.tokens, t.logprobs, advantage=float(a),
                                               reward=f.reward, group=int(f.tag)))
    fitting, dropped = buffers.split_fitting(seqs, int(c.batch.max_seq_len))
    m = episode_metrics(finished)
    m.update({"learner_turns": sum(len(t) for _, t in finished), "rows": len(fitting),
              "dropped_long": dropped + no_fit, "zero_variance_groups": len(flat),
              "dropped_zero_variance": flat_turns,
              "sampled_tokens": int(sum(sum(s.loss_mask) for s in fitting))})
    return Rollouts(fitting, finished, m)
