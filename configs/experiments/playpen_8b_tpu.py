"""The Playpen protocol at full scale: Llama-3.1-8B-Instruct on a one-host TPU v5p-8 (4 chips).

    python -m train.experiment --config=configs/experiments/playpen_8b_tpu.py

The same stages as configs/experiments/playpen_cpu.py (base evaluation, SFT on the strong players'
episodes, DPO and GRPO from the SFT model, every model evaluated on unseen instances of the
training games, on the held-out games and on the prepared TFDS tasks), sized for a TPU:

- every stage: bfloat16 params and compute, params/gradients/AdamW moments sharded over all chips
  (`mesh.fsdp=-1`), rows of up to 2048 tokens, 16 rows per micro-batch (4 per chip);
- `python -m tpu.memory --preset llama-3.1-8b --accelerator v5p-8 --data 1 --fsdp -1
  --micro-batch 16 --seq-len 2048 --rollout-batch 128 --prompt-len 1792 --new-tokens 256` puts
  the GRPO stage (with the frozen reference) at 57 GiB of 95 GiB per chip.

The weights are read from the bucket mount that tpu/install.sh makes (tpu/README.md, "Weights"),
and the run directory is kept there too, so that a preempted run resumes where it stopped when the
command is run again. The TFDS tasks are read from `tasks_data_dir` (prepared with
`tfds build ... --file_format=array_record`). This experiment drives its stages from one process:
on a multi-host slice run each stage's `train.main` command (results.md lists them) through
tpu/launch.sh instead.
"""

from configs.experiments.playpen_cpu import get_config as cpu_config


def get_config():
    c = cpu_config()
    c.out_dir = "/mnt/gcs/runs/playpen-8b"
    c.model = "/mnt/gcs/models/Llama-3.1-8B-Instruct"
    c.eval_limit = 10                # the Playpen test split's instances per game, up to 10
    c.eval_max_new_tokens = 256      # grids, clue lists and explanations need longer replies
    c.tasks_data_dir = "/mnt/gcs/tensorflow_datasets"
    c.tasks_limit = 1000
    c.common = ("model.param_dtype=bfloat16;model.dtype=bfloat16;export.dtype=bfloat16;"
                "mesh.data=1;mesh.fsdp=-1;mesh.tensor=1;batch.max_seq_len=2048;batch.micro_batch=16;"
                "rollout.batch_size=128")
    # SFT: up to 64 strong-player episodes per training game (fewer where the train split is
    # smaller), 32 chats per step.
    c.sft = ("steps=300;optimizer.learning_rate=1e-5;sft.episodes_per_game=64;sft.batch_size=32;"
             "optimizer.schedule=cosine;optimizer.warmup_steps=20;checkpoint.every=50;"
             "checkpoint.keep=2;eval.every=100;eval.limit=4")
    c.dpo = ("steps=200;dpo.prefix_episodes=64;dpo.pairs_per_step=32;optimizer.learning_rate=5e-7;"
             "rollout.max_new_tokens=256;checkpoint.every=50;checkpoint.keep=2;eval.every=100;"
             "eval.limit=4")
    c.grpo = ("steps=200;grpo.group_size=8;grpo.groups_per_step=16;grpo.dynamic_sampling=true;"
              "rollout.max_new_tokens=256;optimizer.learning_rate=1e-6;optimizer.warmup_steps=10;"
              "checkpoint.every=10;checkpoint.keep=3;eval.every=25;eval.limit=4")
    return c
