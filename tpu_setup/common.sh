# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared settings and helpers for the tpu_setup scripts; sourced by them, not run on its own.
# Every value can be overridden from the environment, e.g.
#   TPU_NAME=ppo-v4 ACCELERATOR_TYPE=v4-8 ./tpu_setup/launch.sh --config configs/paper/sst2.yaml

TPU_NAME="${TPU_NAME:-jax-nlu-ppo}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-8}"

# A zone that offers the accelerator family. Capacity moves; check
# `gcloud compute tpus accelerator-types list --zone=ZONE` and override ZONE.
case "$ACCELERATOR_TYPE" in
  v4-*)        _default_zone=us-central2-b ;;
  v5litepod-*) _default_zone=us-west4-a ;;
  v5p-*)       _default_zone=us-east5-a ;;
  v6e-*)       _default_zone=us-east5-b ;;
  *)           _default_zone=us-central1-a ;;
esac
ZONE="${ZONE:-$_default_zone}"
# Empty means gcloud's configured project (`gcloud config set project ...`).
PROJECT="${PROJECT:-}"
# "all" runs on every host of the slice at once (a single-host type has only worker 0).
WORKER="${WORKER:-all}"
# The working folder on each worker, relative to the worker's home directory (remote commands
# start with `cd ~`, so no local $HOME leaks into them).
REMOTE_DIR="${REMOTE_DIR:-jax_nlu_ppo_run}"
VENV="${VENV:-$REMOTE_DIR/.venv}"
# DRY_RUN=1 prints the gcloud commands instead of running them.
DRY_RUN="${DRY_RUN:-0}"

# Runs a command, or prints it shell-quoted under DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# The gcloud flags every call shares; --project only when set, so gcloud's default applies.
gcloud_flags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then gcloud_flags+=(--project="$PROJECT"); fi

# Runs one bash command line on the chosen worker(s) over ssh. With --worker=all gcloud runs it
# on every host in parallel, which is what multi-host JAX needs (every host runs the same program).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker="$WORKER" \
    --command="$1"
}

# Copies local files or folders (recursively) to DEST on the chosen worker(s): tpu_scp SRC... DEST
tpu_scp() {
  local dest="${*: -1}"
  run gcloud compute tpus tpu-vm scp "${gcloud_flags[@]}" --worker="$WORKER" --recurse \
    "${@:1:$#-1}" "$TPU_NAME:$dest"
}

# Prints the calling script's header comment (from line 2 to the first line not starting with #).
print_usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$1"
}

# Quotes arguments so they survive as words in a remote command line.
quote() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "${out# }"
}

# Runs a bash script (a string) on the chosen worker(s). It is passed as one quoted word to
# `bash -c`, so it behaves the same whatever the remote login shell does with the line.
tpu_bash() {
  tpu_ssh "bash -c $(printf '%q' "$1")"
}
