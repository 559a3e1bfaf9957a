"""SFT on the learner role's turns of episode records.

Default source: the strong programmatic players, played on training instances of the training
games (successful episodes only). `sft.source` may instead name a directory of clembench-format
records (both layouts), e.g. a stronger model's runs.
"""

from ml_collections import ConfigDict

from configs.base import get_base_config


def get_config() -> ConfigDict:
    c = get_base_config("sft")
    c.optimizer.learning_rate = 2e-5
    c.sft = sft_section()
    return c


def sft_section() -> ConfigDict:
    """The demonstrations SFT trains on (also GRPO's auxiliary SFT term, `grpo.sft_coef`)."""
    s = ConfigDict()
    s.source = "strong"             # "strong" | a records directory
    s.episodes_per_game = 8         # strong-player episodes per game (source "strong")
    s.only_success = True           # train on successful episodes only
    s.batch_size = 4                # rows (a player's chat or a probe exchange) per step
    s.probe_rows = 2                # probe exchanges (asked outside the chat, e.g. privateshared's
                                    # "ME:" checks) per player per episode, rows of their own
    return s
