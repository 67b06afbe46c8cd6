#!/usr/bin/env bash
# Usage: tpu_setup/copy_data.sh [GLUE_SOURCE] [--help]
#
# Puts a GLUE folder (original TSV layout: CoLA/, SST-2/, ...) on every worker, at
# ~/$REMOTE_DIR/shared/data/glue. That is ../shared/data/glue seen from the source tree
# (~/$REMOTE_DIR/src), the path the configs use, so no --set data.path is needed.
#
# GLUE_SOURCE: a local folder (copied with gcloud scp) or a gs:// path (each worker pulls it
# with gsutil, which is faster for several hosts: the bytes do not pass through this machine).
# Default: ../shared/data/glue beside this checkout. The paper configs read GLUE from the
# Hugging Face hub instead and need no copy (workers have internet).
#
# Environment (defaults in brackets):
#   TPU_NAME [jax-nlu-ppo]  ZONE [by ACCELERATOR_TYPE]  PROJECT [gcloud's]  WORKER [all]
#   REMOTE_DIR [jax_nlu_ppo_run]  GLUE_DEST [$REMOTE_DIR/shared/data/glue]  DRY_RUN [0]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_setup/common.sh  # (run shellcheck -x from the repository root)
source "$here/common.sh"

case "${1:-}" in
  -h|--help) print_usage "$0"; exit 0 ;;
esac
source_path="${1:-$here/../../shared/data/glue}"
GLUE_DEST="${GLUE_DEST:-$REMOTE_DIR/shared/data/glue}"

# Start from an empty destination so a re-run does not nest glue/glue or keep stale files.
prepare="cd ~ && rm -rf $(quote "$GLUE_DEST") && mkdir -p $(quote "$(dirname "$GLUE_DEST")")"

if [[ "$source_path" == gs://* ]]; then
  # gsutil is on the TPU VM images and uses the VM's service account.
  # rsync copies the folder's contents into GLUE_DEST, never a nested glue/glue.
  tpu_bash "set -euo pipefail; $prepare && mkdir -p $(quote "$GLUE_DEST") \
    && gsutil -m -q rsync -r $(quote "${source_path%/}") $(quote "$GLUE_DEST") && ls $(quote "$GLUE_DEST")"
else
  if [[ ! -d "$source_path" ]]; then
    echo "no folder $source_path (give a GLUE folder or a gs:// path; see --help)" >&2
    exit 2
  fi
  tpu_bash "set -euo pipefail; $prepare"
  # scp -r of a folder to a missing destination creates it with the folder's contents.
  tpu_scp "${source_path%/}" "$GLUE_DEST"
fi
