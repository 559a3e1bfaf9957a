#!/usr/bin/env bash
# Starts (or stops, or reports on) one `python -m train.main` process per GPU host over ssh.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: HOSTS=\"gpu0 gpu1 ...\" tpu/gpu_launch.sh --run-dir=/shared/runs/NAME [--config=configs/grpo.py] [-- --config.key=value ...]

For N GPU hosts without TPU metadata: the first host of HOSTS runs process 0 and the coordinator.
On host i (0-based) it starts, in the background with nohup,
  cd REMOTE_DIR && JAX_COORDINATOR_ADDRESS=COORDINATOR:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \\
      .venv/bin/python -m train.main --config=CONFIG --config.run_dir=RUN_DIR [--config.resume=true] ARGS...
      > LOG_DIR/RUN_NAME.process<i>.log
Each process uses all GPUs of its host (one JAX device each). The project must already be installed
in REMOTE_DIR/.venv on every host (tpu/README.md, 'GPU hosts'), and RUN_DIR must be one directory
that every host sees (NFS or a gcsfuse mount). ACTION=stop sends SIGTERM (the run saves and exits),
ACTION=status shows each process's state and last log lines. DRY_RUN=1 prints the ssh commands
instead of running them."

setting HOSTS "" "space-separated ssh destinations ([user@]host), the first is the coordinator (required)"
setting COORDINATOR "" "address the other hosts reach process 0 at (empty: the first host, without user@)"
setting PORT "8476" "coordinator port on the first host"
setting SSH "ssh" "ssh client"
setting SSH_OPTS "-o BatchMode=yes" "ssh options, split on spaces"
train_settings

parse_args "$@"
require HOSTS PORT SSH
[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "PORT must be in 1..65535, got '$PORT'"
check_train_settings
read -r -a hosts <<<"$HOSTS"
n=${#hosts[@]}
((n > 0)) || die "HOSTS lists no host"
ssh_opts=()
if [[ -n "$SSH_OPTS" ]]; then
  read -r -a ssh_opts <<<"$SSH_OPTS"
fi
coordinator="${COORDINATOR:-${hosts[0]#*@}}"

for i in "${!hosts[@]}"; do
  dist=("JAX_COORDINATOR_ADDRESS=$coordinator:$PORT" "JAX_NUM_PROCESSES=$n" "JAX_PROCESS_ID=$i")
  script="w=process$i
$(job_script "${dist[@]}" ${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"})"
  run "$SSH" ${ssh_opts[@]+"${ssh_opts[@]}"} "${hosts[$i]}" "$script"
done
