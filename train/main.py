"""Training entry point: `python -m train.main --config=configs/grpo.py [--config.key=value ...]`.

Reads and checks the config, builds the mesh, loads the model with its params sharded, creates or
resumes the train state, and runs the method's loop (SFT, DPO, GRPO, or evaluation only). The run
directory receives:

    config.json          the full config of the run
    checkpoints/<step>/  orbax checkpoints (params, optimizer state, step; config and data cursor)
    metrics.jsonl        one line per logged step and per eval (train/..., eval/...)
    tensorboard/         TensorBoard event files of the same metrics
    eval/step_<n>/       clembench-format records of every eval episode, results.json, clemscore.png
    curves.png           learning curves, written at the end
    hf/                  the final policy as an HF safetensors directory (config.export.hf)

With `--config.resume=true` the run continues from the newest complete checkpoint in run_dir.
Every rollout and data order is a function of (seed, step), so a resumed run takes the same path as
an uninterrupted one.

On several hosts, start the same command on each; `playpen_jax.distributed.initialize` connects
them (from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or the config's
`distributed.*` values, or on a Cloud TPU pod slice by itself). Each process plays its share of
the episodes; process 0 writes the run directory's files (orbax checkpoints are written by all).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from games.core import GameError
from models.errors import ModelError
from playpen_jax.config import ConfigError, parse, validate


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = validate(parse(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.deterministic and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
        # GPU reductions (e.g. scatter-adds in the backward pass) otherwise vary from run to run,
        # and a resumed run would drift from an uninterrupted one. CPU and TPU are deterministic.
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"
        os.environ["XLA_FLAGS"] = flags.strip()
    from playpen_jax import distributed

    try:
        d = config.distributed   # values given in the config replace the environment's
        distributed.initialize({"JAX_COORDINATOR_ADDRESS": d.coordinator_address or None,
                                "JAX_NUM_PROCESSES": d.num_processes or None,
                                "JAX_PROCESS_ID": d.process_id if d.process_id >= 0 else None})
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from models.remote import RemoteModelError
    from playpen_jax.checkpoint import CheckpointError
    from train import loop

    try:
        loop.run(config)
    except (ConfigError, ModelError, GameError, CheckpointError, RemoteModelError, loop.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except loop.Preempted as e:
        print(str(e), file=sys.stderr)
        return 143  # the conventional status of a process ended by SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
