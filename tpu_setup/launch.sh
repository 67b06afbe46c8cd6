#!/usr/bin/env bash
# Usage: tpu_setup/launch.sh [--help] [jax-nlu-ppo train arguments...]
#   e.g. OUTPUT_DIR=runs/sst2 SYNC_URI=gs://my-bucket/runs/sst2 tpu_setup/launch.sh --config configs/paper/sst2.yaml
#
# Starts the same `jax-nlu-ppo train ARGS --output-dir OUTPUT_DIR` on all workers at once
# (--worker=all), in the background with nohup, so closing this terminal does not stop it.
# Each worker logs to ~/$REMOTE_DIR/logs/train-<UTC time>.log (latest: logs/train.log).
#
# Resuming: run the same command again. A folder holding checkpoints continues from its latest
# step. A preemption sends SIGTERM: the trainer finishes the step, saves a checkpoint and exits 0.
# A preempted Spot VM loses its disk, so give SYNC_URI: the run folder is mirrored there and
# pulled back first on a new VM (create_tpu.sh, install.sh, copy_data.sh, then this again).
# OUTPUT_DIR must be a path on the worker; the trainer does not write gs:// itself yet.
#
# Environment (defaults in brackets):
#   TPU_NAME [jax-nlu-ppo]  ZONE [by ACCELERATOR_TYPE]  PROJECT [gcloud's]  WORKER [all]
#   REMOTE_DIR [jax_nlu_ppo_run]  VENV [$REMOTE_DIR/.venv]
#   OUTPUT_DIR [runs/train]  a path on the workers, relative to ~/$REMOTE_DIR
#   SYNC_URI []  gs:// folder mirroring OUTPUT_DIR   SYNC_EVERY [300] seconds between pushes
#   DRY_RUN [0]
# Follow a run:  tpu_setup/launch.sh --logs    Stop it (saves first):  tpu_setup/launch.sh --stop
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_setup/common.sh  # (run shellcheck -x from the repository root)
source "$here/common.sh"

OUTPUT_DIR="${OUTPUT_DIR:-runs/train}"
SYNC_URI="${SYNC_URI:-}"
SYNC_EVERY="${SYNC_EVERY:-300}"
if [[ "$OUTPUT_DIR" == gs://* ]]; then
  echo "OUTPUT_DIR must be a worker path; put the bucket in SYNC_URI=$OUTPUT_DIR" >&2
  exit 2
fi
cd_dir="cd ~/$(quote "$REMOTE_DIR")"
pid_file="logs/train.pid"

case "${1:-}" in
  -h|--help) print_usage "$0"; exit 0 ;;
  --logs)  # the last lines of each worker's log, then follow it (Ctrl-C to leave; the run goes on)
    tpu_bash "$cd_dir && tail -n 50 -F logs/train.log"; exit 0 ;;
  --stop)  # SIGTERM, as a preemption would: the trainer saves a checkpoint and exits 0
    tpu_bash "$cd_dir && if [[ -f $pid_file ]]; then kill -TERM -- -\$(cat $pid_file) && echo \"[\$(hostname)] stopping\"; fi"
    exit 0 ;;
esac

# The worker-side wrapper travels with each launch, so it always matches these scripts.
tpu_bash "mkdir -p ~/$(quote "$REMOTE_DIR")/logs"
tpu_scp "$here/worker_train.sh" "$REMOTE_DIR/worker_train.sh"

train_cmd="$(quote env REMOTE_DIR="$REMOTE_DIR" VENV="$VENV" SYNC_URI="$SYNC_URI" SYNC_EVERY="$SYNC_EVERY" \
  bash "$REMOTE_DIR/worker_train.sh" "$OUTPUT_DIR" "$@")"
# setsid: the run gets its own process group (the pid file holds its id, so --stop can signal
# it) and no tie to the ssh session; nohup + redirects let ssh return at once. A run already
# going on a worker is refused rather than doubled: two trainers would share one run folder.
tpu_bash "set -euo pipefail
cd ~
log=$(quote "$REMOTE_DIR")/logs/train-\$(date -u +%Y%m%dT%H%M%SZ).log
pid=$(quote "$REMOTE_DIR/$pid_file")
if [[ -f \$pid ]] && kill -0 -- -\$(cat \$pid) 2>/dev/null; then
  echo \"[\$(hostname)] a run is still going (process group \$(cat \$pid)); --stop it first\" >&2
  exit 1
fi
setsid nohup $train_cmd > \"\$log\" 2>&1 < /dev/null &
echo \$! > \"\$pid\"
ln -sf \"\$(basename \"\$log\")\" $(quote "$REMOTE_DIR")/logs/train.log
echo \"[\$(hostname)] started, log ~/\$log\""
