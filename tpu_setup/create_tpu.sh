#!/usr/bin/env bash
# Usage: tpu_setup/create_tpu.sh [--spot | --preemptible] [--help]
#
# Creates a Cloud TPU VM: a single host (v4-8, v5litepod-8, v5p-8) or a pod slice (v4-32,
# v5litepod-16 and up, v5p-16 and up). Only single hosts can train today; see README.md.
#
#   --spot         Spot VM: cheapest, can be preempted at any time, no 24 h limit.
#   --preemptible  Legacy preemptible TPU (v4 and older): preempted at the latest after 24 h.
#
# Environment (defaults in brackets):
#   TPU_NAME [jax-nlu-ppo]  ACCELERATOR_TYPE [v5litepod-8]  ZONE [by family]  PROJECT [gcloud's]
#   RUNTIME_VERSION [by family, see below]  EXTRA_CREATE_FLAGS [] (e.g. "--network=my-net")
#   DRY_RUN [0]  1 prints the gcloud command instead of running it
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_setup/common.sh  # (run shellcheck -x from the repository root)
source "$here/common.sh"

pricing=""
for arg in "$@"; do
  case "$arg" in
    --spot) pricing=--spot ;;
    --preemptible) pricing=--preemptible ;;
    -h|--help) print_usage "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

# The TPU VM software image, which must match the TPU generation. These are the images the
# Cloud TPU and JAX docs name for each family; images get renamed and retired, so check
# `gcloud compute tpus versions list --zone=$ZONE` and set RUNTIME_VERSION if one is refused.
case "$ACCELERATOR_TYPE" in
  v4-*)        _default_runtime=tpu-ubuntu2204-base ;;
  v5litepod-*) _default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*)       _default_runtime=v2-alpha-tpuv5 ;;
  v6e-*)       _default_runtime=v2-alpha-tpuv6e ;;
  *) echo "no default runtime for $ACCELERATOR_TYPE; set RUNTIME_VERSION" >&2; _default_runtime="" ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$_default_runtime}"
EXTRA_CREATE_FLAGS="${EXTRA_CREATE_FLAGS:-}"
if [[ -z "$RUNTIME_VERSION" ]]; then exit 2; fi

cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}"
     --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ -n "$pricing" ]]; then cmd+=("$pricing"); fi
# Word splitting is wanted here: EXTRA_CREATE_FLAGS holds several flags.
# shellcheck disable=SC2206
if [[ -n "$EXTRA_CREATE_FLAGS" ]]; then cmd+=($EXTRA_CREATE_FLAGS); fi

run "${cmd[@]}"
echo "next: TPU_NAME=$TPU_NAME ZONE=$ZONE tpu_setup/install.sh" >&2
