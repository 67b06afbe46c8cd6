#!/usr/bin/env bash
# Usage: worker_train.sh OUTPUT_DIR [jax-nlu-ppo train arguments...]   (runs ON a TPU worker)
#
# Copied to the workers and started in the background by launch.sh; not meant to be run here.
# Runs `jax-nlu-ppo train ... --output-dir OUTPUT_DIR` from the source tree and, when SYNC_URI
# (gs://...) is set, mirrors OUTPUT_DIR to it: pulled before the start (so a new VM continues a
# preempted run), pushed every SYNC_EVERY seconds while training and once at the end.
#
# Environment: REMOTE_DIR [jax_nlu_ppo_run]  VENV [$REMOTE_DIR/.venv]  SYNC_URI []  SYNC_EVERY [300]
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help || $# -lt 1 ]]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0
fi
cd ~
REMOTE_DIR="${REMOTE_DIR:-jax_nlu_ppo_run}"
VENV="${VENV:-$REMOTE_DIR/.venv}"
SYNC_URI="${SYNC_URI:-}"
SYNC_EVERY="${SYNC_EVERY:-300}"
VENV="$(cd "$VENV" && pwd)"
output_dir="$1"; shift
# A relative OUTPUT_DIR means relative to ~/$REMOTE_DIR, not to the source tree, so that
# re-installing (which replaces src/) never deletes checkpoints.
if [[ "$output_dir" != /* ]]; then output_dir="$HOME/$REMOTE_DIR/$output_dir"; fi
mkdir -p "$output_dir"

push() { gsutil -m -q rsync -r "$output_dir" "$SYNC_URI" || echo "sync to $SYNC_URI failed" >&2; }
if [[ -n "$SYNC_URI" ]]; then
  # Only the newest copy matters: a half-written step that comes back is set aside by the
  # trainer (checkpoints.unreadable/) and the step before it is used.
  gsutil -m -q rsync -r "$SYNC_URI" "$output_dir" || echo "nothing to restore from $SYNC_URI yet" >&2
  ( while sleep "$SYNC_EVERY"; do push; done ) &
  syncer=$!
  trap 'kill "$syncer" 2>/dev/null || true' EXIT
fi

cd "$REMOTE_DIR/src"   # the configs' relative paths (configs/..., ../shared/data/glue) start here
status=0
# Not exec: the final push must run after the trainer. SIGTERM is passed on to the trainer,
# which finishes its step, saves a checkpoint and exits 0.
"$VENV/bin/jax-nlu-ppo" train --output-dir "$output_dir" "$@" &
trainer=$!
trap 'kill -TERM "$trainer" 2>/dev/null || true' TERM INT
# The first wait returns early (status 143) when a trapped signal arrives; the second one waits
# for the trainer to finish saving and returns its own status (bash keeps it for a finished job).
wait "$trainer" || true
wait "$trainer" || status=$?
if [[ -n "$SYNC_URI" ]]; then push; fi
echo "trainer exited with status $status"
exit "$status"
