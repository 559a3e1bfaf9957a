#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (or its queued resource, which takes the TPU with it).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu/delete.sh --tpu-name=NAME --zone=ZONE [--queued=1]

Deletes the TPU and everything on its workers' disks (logs, the venv, local model copies): copy what
you need to a bucket first. Checkpoints in a bucket (RUN_DIR on a gcsfuse mount or gs://) stay.
A TPU created with QUEUED=1 is deleted through its queued resource (--force deletes the TPU too).
DRY_RUN=1 prints the gcloud command instead of running it."

setting TPU_NAME "" "name of the TPU VM / slice (required)"
setting ZONE "" "zone of the TPU (required)"
setting PROJECT "" "Google Cloud project (empty: gcloud's configured project)"
setting QUEUED "0" "1: the TPU was created through a queued resource"
setting QUEUED_ID "" "queued resource id (empty: TPU_NAME)"

parse_args "$@"
require TPU_NAME ZONE
one_of QUEUED 0 1
QUEUED_ID="${QUEUED_ID:-$TPU_NAME}"
gcloud_scope

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$QUEUED_ID" "${GCLOUD_SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --quiet
fi
