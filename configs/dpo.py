"""DPO from branching rollouts.

Each prefix episode is played with the policy; at one of the learner's turns the episode branches
into `branches` sampled continuations (plus `teacher_branches` replies of the strong programmatic
player); every branch is played to its end, and the best branch by reward is paired against the worst
(ties give no pair). Reference log-probs are computed once, when a pair is made.
"""

from ml_collections import ConfigDict

from configs.base import get_base_config


def get_config() -> ConfigDict:
    c = get_base_config("dpo")
    c.optimizer.learning_rate = 1e-6
    c.games.learner_roles = "2"
    c.dpo = ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.kind = "sigmoid"          # "sigmoid" | "ipo" | "orpo" | "simpo" (the last two: no reference)
    c.dpo.label_smoothing = 0.0     # > 0: conservative DPO
    c.dpo.gamma = 0.5               # SimPO's target margin (kind "simpo"; ORPO's lambda is beta)
    c.dpo.branches = 3              # sampled continuations at the branching turn
    c.dpo.teacher_branches = 1      # strong programmatic replies added as branches
    c.dpo.prefix_episodes = 8       # episodes branched per round of pair collection
    c.dpo.refresh_every = 0         # steps between new rounds of pairs; 0 = one round at the start
    c.dpo.pairs_per_step = 4
    return c
