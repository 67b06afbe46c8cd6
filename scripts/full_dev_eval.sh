#!/usr/bin/env bash
# Usage: scripts/full_dev_eval.sh RUN_DIR...
#
# Scores each run's final model on the whole SST-2 dev set (872 sentences) with the settings of
# the runs' own evaluations (chat prompts, greedy answers of at most 32 tokens, lenient parsing),
# into RUN_DIR/dev_full.json; a run whose file exists is skipped. The wall time of each goes to
# the file named by WALL_TIMES (default: none), a line "RUN_DIR<TAB>seconds".
source "$(dirname "$0")/lib.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help || $# -eq 0 ]]; then usage "$0"; fi
cd "$(dirname "$0")/.."
for run in "$@"; do
  [[ -e "$run/dev_full.json" ]] && continue
  timed "${WALL_TIMES:-/dev/null}" "$run" -- jax-nlu-ppo eval --model "$run" --task sst2 \
      --data ../shared/data/glue --split validation --shuffle-seed 0 --format chat \
      --max-new-tokens 32 --output "$run/dev_full.json"
done
