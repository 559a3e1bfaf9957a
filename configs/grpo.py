"""GRPO online on game play: G episodes per instance, advantages normalised within each group.

Defaults: 2 instances x 4 episodes per step on the training games, the learner plays every role it
can, with the strong programmatic player as partner. For Llama-3.1-8B on a pod: group_size=8,
groups_per_step=64, model.param_dtype=bfloat16, mesh.fsdp=-1.
"""

from ml_collections import ConfigDict

from configs.base import get_base_config
from configs.sft import sft_section


def get_config() -> ConfigDict:
    c = get_base_config("grpo")
    c.optimizer.learning_rate = 1e-6
    c.games.learner_roles = "2"     # the second player (one-player games: the only one)
    c.grpo = ConfigDict()
    c.grpo.group_size = 4           # G episodes per instance
    c.grpo.groups_per_step = 2      # instances per step
    c.grpo.clip_eps = 0.2
    c.grpo.clip_eps_high = 0.2      # > clip_eps: DAPO's clip-higher
    c.grpo.beta = 0.04              # KL weight; 0 skips the reference forward
    c.grpo.kl = "k3"                # "k1" | "k2" | "k3" | "none"
    c.grpo.aggregation = "token-mean"  # "token-mean" (DAPO) | "sequence-mean" (GRPO) | "sequence-sum-norm"
    c.grpo.advantage_scale = "std"  # "std" | "none" (Dr. GRPO)
    c.grpo.ratio_level = "token"    # "token" | "sequence" (GSPO: one clipped ratio per sequence)
    # an episode's turns whose prompts continue the chat train as one sequence (same token-mean
    # loss, fewer tokens); with a per-sequence aggregation or GSPO a sequence is then an episode's
    # replies, not one turn's. False: one sequence per turn.
    c.grpo.merge_turns = True
    # which learner turns carry an episode's advantage: "episode" (all) | "abort_turn" (in an
    # aborted episode only the reply that broke the rules; the accepted turns before it are context)
    c.grpo.credit = "episode"
    # probe turns (asked outside the chat, e.g. privateshared's "ME:" checks; each one's prompt is the
    # whole chat so far, so training all of an episode's dozens costs dozens of chats) that train
    # per episode: this many, spread from the first to the last, and the episode's last turn if it
    # is a probe (the reply an abort blames); the others are left out. -1: all of them.
    c.grpo.probe_turns = 4
    # true: play and log every step's rollouts but never update (a control: the starting policy on
    # the same draws and sampling keys as a training run with the same seed and settings)
    c.grpo.rollout_only = False
    c.grpo.updates_per_batch = 1    # optimizer steps per rollout batch (old log-probs from the sampler)
    c.grpo.drop_zero_variance = True  # leave out groups whose rewards are all equal (no signal)
    c.grpo.dynamic_sampling = False   # DAPO: play more groups until groups_per_step have signal
    c.grpo.max_refill_rounds = 3      # at most this many extra rounds of play per step
    c.grpo.overlong = "none"          # "none" | "filter" (cut replies train nothing) | "penalty" (DAPO)
    c.grpo.overlong_buffer = 16       # penalty: L_cache, the last tokens before max_new_tokens
    c.grpo.overlong_penalty = 1.0     # penalty: its weight added to the reward
    # > 0: each update also descends sft_coef x the SFT loss (mean NLL) of sft.batch_size
    # demonstration chats (the learner roles' turns of `sft.source` episodes), as InstructGPT's
    # PPO-ptx mixes pretraining data into RL: keeps the answer formats SFT taught while GRPO moves
    # the policy. 0: pure GRPO.
    c.grpo.sft_coef = 0.0
    # the games whose demonstration chats the SFT term trains on ("" = games.names): e.g. GRPO on
    # the games that give it a signal, while the SFT term keeps the formats of all training games
    c.grpo.sft_games = ""
    c.sft = sft_section()
    return c
