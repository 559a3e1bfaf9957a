"""Pieces the training tests share: a fixed optimizer, a GRPO loss over micro-batches, and the
command line of a short `train.main` run of the tiny model on the colourname test game."""

from __future__ import annotations

from ml_collections import ConfigDict

from train import losses
from train import step as train_step


def optimizer():
    return train_step.make_optimizer(ConfigDict(dict(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                                                     b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
                                                     grad_clip=1.0)), 10)


def grpo_loss_fn(cfg, aggregation):
    """GRPO loss of a micro-batch with the reference params in extra["ref"] (beta 0.1)."""
    def loss_fn(params, mb, extra):
        lp, mask = losses.sequence_logprobs(params, mb["tokens"], mb["positions"], mb["segment_ids"],
                                            mb["loss_mask"], config=cfg)
        ref, _ = losses.sequence_logprobs(extra["ref"], mb["tokens"], mb["positions"], mb["segment_ids"],
                                          mb["loss_mask"], config=cfg)
        return losses.grpo_loss(lp, mb["old_logprobs"], ref, mb["token_advantages"], mask, beta=0.1,
                                aggregation=aggregation)
    return loss_fn


def main_args(model_dir, run_dir, config="configs/grpo.py", **over) -> list:
    """`train.main` arguments: the tiny model on colourname, every role, short replies, no PNG plots
    (tests that check them ask for `log.plots`); `over` adds or replaces config values (dotted keys)."""
    base = {"model.name": model_dir, "run_dir": str(run_dir), "games.names": "colourname",
            "eval.games": "colourname", "games.learner_roles": "all", "rollout.max_new_tokens": 4,
            "log.progress": False, "log.plots": False, "batch.max_seq_len": 128}
    base.update(over)
    return [f"--config={config}"] + [f"--config.{k}={v}" for k, v in base.items()]
