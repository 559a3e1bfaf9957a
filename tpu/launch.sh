#!/usr/bin/env bash
# Starts (or stops, or reports on) `python -m train.main` on every worker of a TPU VM / slice at once.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu/launch.sh --tpu-name=NAME --zone=ZONE --run-dir=/mnt/gcs/runs/NAME [--config=configs/grpo.py] [-- --config.key=value ...]

Starts the same command on every worker, in the background with nohup:
  cd REMOTE_DIR && .venv/bin/python -m train.main --config=CONFIG --config.run_dir=RUN_DIR \\
      [--config.resume=true] ARGS...   > LOG_DIR/RUN_NAME.<worker>.log
where ARGS are the arguments after '--' and <worker> is the worker's number. The processes find each
other through the TPU metadata (playpen_jax.distributed.initialize); each host plays its share of
the episodes, and process 0 writes the run directory, so RUN_DIR must be one directory that every
worker sees (a gcsfuse mount of a bucket: tpu/install.sh GCS_BUCKET=...). Follow the logs with
tpu/logs.sh; ACTION=stop sends SIGTERM (the run saves a checkpoint and exits); ACTION=status tells
whether each worker's process runs. DRY_RUN=1 prints the gcloud commands instead of running them."

setting TPU_NAME "" "name of the TPU VM / slice (required)"
setting ZONE "" "zone of the TPU (required)"
setting PROJECT "" "Google Cloud project (empty: gcloud's configured project)"
setting WORKER "all" "worker number, or all (a slice's run needs all workers)"
train_settings

parse_args "$@"
require TPU_NAME ZONE
check_train_settings

tpu_ssh "$WORKER" "$WORKER_ID_SNIPPET
w=worker\$w
$(job_script ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"})"
