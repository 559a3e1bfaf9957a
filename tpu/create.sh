#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice (directly, or as a queued resource that waits for capacity).
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: tpu/create.sh --tpu-name=NAME --zone=ZONE [--accelerator-type=v5p-64] [--pricing=spot] [--queued=1]

Creates the TPU VM (one host) or pod slice (several hosts, one VM each) that the other scripts in
tpu/ use. With QUEUED=1 the request goes through a queued resource, which waits for capacity instead
of failing when the zone has none; WAIT_ACTIVE=1 then polls until it is ACTIVE. Afterwards: tpu/install.sh.
DRY_RUN=1 prints the gcloud commands instead of running them."

setting TPU_NAME "" "name of the TPU VM / slice (required)"
setting ZONE "" "zone, e.g. us-east5-a (v5p), us-west4-a (v5e) (required)"
setting PROJECT "" "Google Cloud project (empty: gcloud's configured project)"
setting ACCELERATOR_TYPE "v5litepod-8" "slice type: v5litepod-8 (8 chips, 1 host), v5p-8 (4 chips), v5p-64 (32 chips, 8 hosts), ..."
setting RUNTIME_VERSION "" "TPU software (runtime) version; empty: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4 and older)"
setting PRICING "on-demand" "on-demand | spot | preemptible (direct creation only) | reserved"
setting QUEUED "0" "1: create through a queued resource (waits for capacity)"
setting QUEUED_ID "" "queued resource id (empty: TPU_NAME)"
setting VALID_UNTIL "" "queued only: give up if not provisioned within this duration, e.g. 6h"
setting WAIT_ACTIVE "1" "queued only: 1 polls until the queued resource is ACTIVE"
setting POLL_SECONDS "30" "seconds between polls while waiting"
setting EXTRA_ARGS "" "more gcloud flags, split on spaces (e.g. --network=NET --internal-ips)"

parse_args "$@"
require TPU_NAME ZONE ACCELERATOR_TYPE
one_of PRICING on-demand spot preemptible reserved
one_of QUEUED 0 1
one_of WAIT_ACTIVE 0 1
[[ "$POLL_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "POLL_SECONDS must be a positive integer, got '$POLL_SECONDS'"

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-* | v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" ;;
  esac
fi
QUEUED_ID="${QUEUED_ID:-$TPU_NAME}"

gcloud_scope
extra=()
if [[ -n "$EXTRA_ARGS" ]]; then
  read -r -a extra <<<"$EXTRA_ARGS"
fi
pricing=()
case "$PRICING" in
  spot) pricing=(--spot) ;;
  preemptible) pricing=(--preemptible) ;;
  reserved) pricing=(--reserved) ;;
esac

echo "creating $ACCELERATOR_TYPE '$TPU_NAME' in $ZONE (runtime $RUNTIME_VERSION, $PRICING$([[ "$QUEUED" == 1 ]] && echo ", queued as '$QUEUED_ID'"))" >&2
if [[ "$QUEUED" == 0 ]]; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_SCOPE[@]}" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
    ${pricing[@]+"${pricing[@]}"} ${extra[@]+"${extra[@]}"}
  exit 0
fi

[[ "$PRICING" != preemptible ]] || die "PRICING=preemptible is not offered for queued resources; use spot"
valid=()
if [[ -n "$VALID_UNTIL" ]]; then
  valid=("--valid-until-duration=$VALID_UNTIL")
fi
run gcloud compute tpus queued-resources create "$QUEUED_ID" "${GCLOUD_SCOPE[@]}" \
  "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION" \
  ${pricing[@]+"${pricing[@]}"} ${valid[@]+"${valid[@]}"} ${extra[@]+"${extra[@]}"}
[[ "$WAIT_ACTIVE" == 1 ]] || exit 0

describe=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${GCLOUD_SCOPE[@]}" "--format=value(state.state)")
if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  exit 0
fi
while true; do
  state="$("${describe[@]}")"
  case "$state" in
    ACTIVE)
      echo "queued resource $QUEUED_ID is ACTIVE: TPU '$TPU_NAME' is ready" >&2
      exit 0
      ;;
    FAILED | SUSPENDED | SUSPENDING)
      die "queued resource $QUEUED_ID is $state (gcloud compute tpus queued-resources describe $QUEUED_ID --zone=$ZONE)"
      ;;
  esac
  echo "queued resource $QUEUED_ID: ${state:-unknown}; next check in ${POLL_SECONDS}s" >&2
  sleep "$POLL_SECONDS"
done
