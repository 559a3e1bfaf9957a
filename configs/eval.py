"""Evaluation only: clemscore of a model on the chosen games and split, no training."""

from ml_collections import ConfigDict

from configs.base import get_base_config


def get_config() -> ConfigDict:
    c = get_base_config("eval")
    c.steps = 0
    c.eval.games = "all"
    c.eval.split = "test"
    c.eval.limit = 2
    c.eval.at_start = True
    c.export.hf = False
    return c
