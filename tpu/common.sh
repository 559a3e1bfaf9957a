# Shared by the scripts in tpu/ (sourced, not run): settings, --help, flag parsing and DRY_RUN.
#
# A script declares its settings with `setting VAR DEFAULT "description"`, then calls
# `parse_args "$@"`. Every setting is read from the environment variable VAR, or from the flag
# --var (lower case, "_" -> "-") given as `--var=value` or `--var value`; a flag wins over the
# environment. Arguments after `--` are kept in the array PASSTHROUGH. `--help` prints the script's
# USAGE text and every setting with its default and current value.
#
# Keeps to bash 3.2 features (the /bin/bash of macOS); tested with bash 5.
#
# With DRY_RUN=1, `run` prints each command (shell-quoted, prefixed with "+ "; a remote script shows
# as one quoted argument over several lines) instead of running it; nothing else in the scripts
# touches a machine. Remote scripts are POSIX shell, run by the remote login shell.

_SETTING_NAMES=()
_SETTING_DEFAULTS=()
_SETTING_HELP=()
PASSTHROUGH=()

die() {
  echo "error: $*" >&2
  exit 2
}

# setting VAR DEFAULT DESCRIPTION
setting() {
  _SETTING_NAMES+=("$1")
  _SETTING_DEFAULTS+=("$2")
  _SETTING_HELP+=("$3")
}

_flag_of() {
  echo "--$(printf '%s' "$1" | tr 'A-Z_' 'a-z-')"
}

usage() {
  local i name def now
  printf '%s\n\nSettings (environment variable, or flag; a flag wins):\n' "$USAGE"
  for i in "${!_SETTING_NAMES[@]}"; do
    name="${_SETTING_NAMES[$i]}"
    def="${_SETTING_DEFAULTS[$i]}"
    now="${!name-$def}"
    printf '  %-22s %-26s %s\n' "$name" "$(_flag_of "$name")" "${_SETTING_HELP[$i]}"
    printf '  %-22s %-26s default: %s%s\n' "" "" "${def:-(empty)}" \
      "$([[ "$now" != "$def" ]] && printf '; now: %s' "${now:-(empty)}")"
  done
}

parse_args() {
  local arg key value name i found
  while (($#)); do
    arg="$1"
    shift
    case "$arg" in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        PASSTHROUGH=("$@")
        break
        ;;
      --*)
        key="${arg%%=*}"
        if [[ "$arg" == *=* ]]; then
          value="${arg#*=}"
        elif (($#)); then
          value="$1"
          shift
        else
          die "flag $key needs a value (use $key=VALUE)"
        fi
        found=""
        for i in "${!_SETTING_NAMES[@]}"; do
          name="${_SETTING_NAMES[$i]}"
          if [[ "$(_flag_of "$name")" == "$key" ]]; then
            printf -v "$name" '%s' "$value"
            found=1
          fi
        done
        [[ -n "$found" ]] || die "unknown flag $key (see --help)"
        ;;
      *)
        die "unexpected argument '$arg' (settings are flags --name=value; train arguments go after --)"
        ;;
    esac
  done
  for i in "${!_SETTING_NAMES[@]}"; do
    name="${_SETTING_NAMES[$i]}"
    if [[ -z "${!name+set}" ]]; then
      printf -v "$name" '%s' "${_SETTING_DEFAULTS[$i]}"
    fi
  done
  DRY_RUN="${DRY_RUN:-0}"
  [[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name}" ]] || die "$name is not set (environment variable $name or flag $(_flag_of "$name"))"
  done
}

# one_of VAR CHOICE...
one_of() {
  local name="$1" c
  shift
  for c in "$@"; do
    [[ "${!name}" == "$c" ]] && return 0
  done
  die "$name must be one of: $* (got '${!name}')"
}

# run CMD ARG... : runs the command, or prints it with DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# The gcloud flags every TPU command shares.
gcloud_scope() {
  GCLOUD_SCOPE=("--zone=$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_SCOPE+=("--project=$PROJECT")
  fi
}

# tpu_ssh WORKER SCRIPT : runs SCRIPT (POSIX shell, run by the login shell) on one worker of the TPU,
# or on all of them at once.
tpu_ssh() {
  gcloud_scope
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_SCOPE[@]}" "--worker=$1" "--command=$2"
}

# quote ARG... : the arguments as one string that a POSIX shell splits back into them (words of
# plain characters as they are, others in single quotes).
quote() {
  local out="" a sq="'" rep="'\\''"
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then
      out+="${out:+ }$a"
    else
      out+="${out:+ }'${a//$sq/$rep}'"
    fi
  done
  printf '%s' "$out"
}

# A remote shell snippet that sets $w to this TPU worker's number (from the VM metadata), or to the
# host name where the metadata server does not answer.
WORKER_ID_SNIPPET='w=$(curl -sf -m 5 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)'

# --- training jobs (launch.sh on TPU workers, gpu_launch.sh on GPU hosts) --------------------------

train_settings() {
  setting ACTION "start" "start | stop (SIGTERM: the run saves a checkpoint and exits) | status"
  setting REMOTE_DIR "playpen_jax" "project directory on the hosts (relative: under the home directory)"
  setting CONFIG "configs/grpo.py" "config file, relative to REMOTE_DIR"
  setting RUN_DIR "" "run directory that every host sees: a shared mount, e.g. /mnt/gcs/runs/grpo-8b (required to start)"
  setting RUN_NAME "" "name of the log and pid files (empty: the last part of RUN_DIR)"
  setting LOG_DIR "logs" "log directory on each host (relative: under REMOTE_DIR)"
  setting RESUME "1" "1: pass --config.resume=true (continues from the newest checkpoint; starts fresh when there is none)"
  setting RUN_ENV "" "more environment variables for the run, space-separated NAME=VALUE words"
  setting ALLOW_GS_RUN_DIR "0" "1: accept a gs:// RUN_DIR (see tpu/README.md: only checkpoints can go there)"
}

# Checks the training settings and sets TRAIN_CMD (the run's command line, quoted for a remote shell).
check_train_settings() {
  one_of ACTION start stop status
  one_of RESUME 0 1
  one_of ALLOW_GS_RUN_DIR 0 1
  require REMOTE_DIR LOG_DIR
  if [[ "$ACTION" == start ]]; then
    require CONFIG RUN_DIR
    if [[ "$RUN_DIR" == gs://* && "$ALLOW_GS_RUN_DIR" != 1 ]]; then
      die "RUN_DIR=$RUN_DIR: orbax writes checkpoints to gs://, but metrics.jsonl, config.json, eval records, plots and the exported model are written with plain file calls and would land in a local directory named 'gs:' on process 0; mount the bucket with gcsfuse (tpu/install.sh GCS_BUCKET=...) and use the mount path, or set ALLOW_GS_RUN_DIR=1"
    fi
  fi
  if [[ -z "$RUN_NAME" ]]; then
    [[ -n "$RUN_DIR" ]] || die "RUN_DIR or RUN_NAME is not set: ACTION=$ACTION needs one to find the run's files"
    RUN_NAME="$(basename "$RUN_DIR")"
  fi
  [[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME must be letters, digits, '.', '_' or '-', got '$RUN_NAME'"
  local envs=() word
  if [[ -n "$RUN_ENV" ]]; then
    read -r -a envs <<<"$RUN_ENV"
  fi
  for word in ${envs[@]+"${envs[@]}"}; do
    [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "RUN_ENV must be NAME=VALUE words, got '$word'"
  done
  local resume=()
  [[ "$RESUME" == 0 ]] || resume=(--config.resume=true)
  TRAIN_ENV=(${envs[@]+"${envs[@]}"})
  TRAIN_ARGS=(-m train.main "--config=$CONFIG" "--config.run_dir=$RUN_DIR" ${resume[@]+"${resume[@]}"}
    ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
}

# job_script ENV_WORD... : the remote script for ACTION. It expects the shell variable $w to name this
# host's process (set by the caller's snippet) and uses LOG_DIR/RUN_NAME.$w.{log,pid}.
job_script() {
  local dir log pid
  dir="$(quote "$REMOTE_DIR")"
  log="$(quote "$LOG_DIR/$RUN_NAME").\$w.log"
  pid="$(quote "$LOG_DIR/$RUN_NAME").\$w.pid"
  printf 'cd %s\nmkdir -p %s\n' "$dir" "$(quote "$LOG_DIR")"
  case "$ACTION" in
    start)
      cat <<EOS
if [ -f $pid ] && kill -0 "\$(cat $pid)" 2>/dev/null; then
  echo "\$w (\$(hostname)): $RUN_NAME is already running as pid \$(cat $pid); ACTION=stop first" >&2
  exit 1
fi
nohup env $(quote "$@") .venv/bin/python $(quote "${TRAIN_ARGS[@]}") >$log 2>&1 </dev/null &
echo \$! >$pid
echo "\$w (\$(hostname)): started pid \$!, log \$(pwd)/$log"
EOS
      ;;
    stop)
      cat <<EOS
if [ -f $pid ] && kill -0 "\$(cat $pid)" 2>/dev/null; then
  kill -TERM "\$(cat $pid)"
  echo "\$w (\$(hostname)): sent SIGTERM to pid \$(cat $pid); it finishes its step, saves and exits"
else
  echo "\$w (\$(hostname)): $RUN_NAME is not running"
fi
EOS
      ;;
    status)
      cat <<EOS
if [ -f $pid ] && kill -0 "\$(cat $pid)" 2>/dev/null; then state="running as pid \$(cat $pid)"; else state="not running"; fi
echo "\$w (\$(hostname)): $RUN_NAME \$state"
if [ -f $log ]; then tail -n 3 $log | sed "s/^/  /"; fi
EOS
      ;;
  esac
}
