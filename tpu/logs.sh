#!/usr/bin/env bash
# Shows the training log of one TPU worker, or of all of them (lines prefixed with the worker).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu/logs.sh --tpu-name=NAME --zone=ZONE [--worker=0|N|all] [--run-name=NAME] [--follow=0]

Prints the last TAIL_LINES lines of LOG_DIR/RUN_NAME.worker<N>.log on the chosen worker(s) and, with
FOLLOW=1, keeps following it (Ctrl-C stops following; the run goes on). Without RUN_NAME, each
worker's newest log is shown. With WORKER=all every line is prefixed with its worker.
DRY_RUN=1 prints the gcloud command instead of running it."

setting TPU_NAME "" "name of the TPU VM / slice (required)"
setting ZONE "" "zone of the TPU (required)"
setting PROJECT "" "Google Cloud project (empty: gcloud's configured project)"
setting WORKER "0" "worker number, or all"
setting REMOTE_DIR "playpen_jax" "project directory on the workers (relative: under the home directory)"
setting LOG_DIR "logs" "log directory (relative: under REMOTE_DIR)"
setting RUN_NAME "" "which run's log (empty: the newest log)"
setting TAIL_LINES "100" "lines of history to print"
setting FOLLOW "1" "1: keep following the log"

parse_args "$@"
require TPU_NAME ZONE REMOTE_DIR LOG_DIR
one_of FOLLOW 0 1
[[ "$TAIL_LINES" =~ ^[0-9]+$ ]] || die "TAIL_LINES must be a number, got '$TAIL_LINES'"
[[ -z "$RUN_NAME" || "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME must be letters, digits, '.', '_' or '-', got '$RUN_NAME'"

logs="$(quote "$LOG_DIR")"
if [[ -n "$RUN_NAME" ]]; then
  pick="f=$logs/$RUN_NAME.worker\$w.log"
else
  pick="f=\$(ls -t $logs/*.log 2>/dev/null | head -n 1)"
fi
tail_cmd="tail -n $TAIL_LINES"
[[ "$FOLLOW" == 0 ]] || tail_cmd+=" -F"
prefix=""
[[ "$WORKER" != all ]] || prefix=" | sed -u \"s/^/[worker \$w] /\""
script="$WORKER_ID_SNIPPET
cd $(quote "$REMOTE_DIR")
$pick
if [ -z \"\$f\" ] || [ ! -f \"\$f\" ]; then echo \"worker \$w: no log \${f:-in $LOG_DIR}\" >&2; exit 1; fi
echo \"== worker \$w (\$(hostname)): \$(pwd)/\$f\"
$tail_cmd \"\$f\"$prefix"
tpu_ssh "$WORKER" "$script"
