"""The Playpen protocol at CPU scale on the embedded SmolLM2-135M-Instruct.

    python -m train.experiment --config=configs/experiments/playpen_cpu.py

Stages (train/experiment.py): evaluate the base model; SFT on the strong programmatic players'
episodes of the training games; DPO and GRPO, each starting from the SFT model (`init`); then every
model is evaluated on unseen (test-split) instances of the training games, on the held-out games and
on the TFDS benchmarks that are prepared under `tasks_data_dir`. Training stages take their method's
config file (configs/sft.py, dpo.py, grpo.py) plus the overrides below (`;`-separated KEY=VALUE, any
key of that file). The stage sizes are the budget: the defaults take several hours on a 2-core CPU;
`budget_minutes` stops starting new stages once spent (the report marks what was skipped). The
base model's two evaluations took 4.4 minutes here. Every stage is kept in `out_dir`; running the
command again resumes where it stopped.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.out_dir = "runs/experiments/playpen_cpu"
    c.model = "smollm2-135m-instruct"
    c.seed = 0
    c.train_games = "train"         # the Playpen training games (games/split.py)
    c.heldout_games = "heldout"     # never trained on
    c.eval_split = "test"           # unseen instances of every game
    c.eval_limit = 4                # instances per game per evaluation
    c.eval_max_new_tokens = 64
    c.methods = "sft,dpo,grpo"      # the training stages, in order
    c.init = "sft"                  # DPO and GRPO start from "sft" (the SFT stage's model) or "base"
    c.budget_minutes = 0.0          # 0: no limit
    # true: after GRPO, its starting model plays the same steps' rollouts without updates (a
    # control for GRPO's training curve, at about the GRPO stage's rollout time again)
    c.grpo_control = False
    c.tasks = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,gsm8k"
    # TFDS datasets prepared as array_record (`tfds build`, or `python -m playpen_jax.task_data`)
    c.tasks_data_dir = "~/tensorflow_datasets"
    c.tasks_limit = 200             # examples per task
    # Overrides for every stage (training and the game evaluations): on CPUs with bf16 units the
    # weight matmuls take bf16 inputs under f32 activations, which makes rollouts about 1.4x and
    # training steps about 1.15x faster there; on CPUs without them (AVX2 alone) a train step was
    # 1.25x slower so, and "auto" keeps float32 (BENCHMARKS.md). "" for plain float32 everywhere.
    c.common = "model.matmul_dtype=auto"
    # SFT: about 1.7 epochs of the 416 rows of 32 strong-player episodes per game (352 chats and 64
    # private/shared probe exchanges); a step of 8 rows takes about a minute on 2 CPU cores
    # (float32), so about 1.5 hours.
    c.sft = ("steps=90;optimizer.learning_rate=2e-5;sft.episodes_per_game=32;sft.batch_size=8;"
             "optimizer.schedule=cosine;optimizer.warmup_steps=10;checkpoint.every=15;eval.every=45")
    c.dpo = ("steps=40;dpo.prefix_episodes=16;dpo.pairs_per_step=8;optimizer.learning_rate=5e-7;"
             "checkpoint.every=10;eval.every=20")
    # GRPO: a step plays 4 groups of 4 episodes, and up to 3 more rounds while fewer than 4 groups
    # have unequal rewards; rollouts take most of a step's 3-5 minutes on 2 CPU cores.
    c.grpo = ("steps=20;grpo.group_size=4;grpo.groups_per_step=4;optimizer.learning_rate=1e-6;"
              "rollout.max_new_tokens=48;grpo.dynamic_sampling=true;checkpoint.every=5;eval.every=10")
    return c
