#!/usr/bin/env bash
# Usage: scripts/label_noise.sh [NOISE ...]        (default: 0 0.2 0.4)
#
# SFT against PPO on SST-2 when a fraction NOISE of the training labels is wrong
# (`data.label_noise`, flipped rows chosen with the run's seed): the configs and evaluation of
# docs/results.md's SST-2 cells, one run folder per noise, method and seed, each final model then
# scored on the whole dev set (scripts/full_dev_eval.sh); then the table of dev accuracy per noise
# and method (scripts/sst2_tables.py: mean over seeds, min..max, 95% bootstrap intervals).
# Finished runs and evaluations are skipped, so an interrupted sweep continues.
#
# Environment: OUT [runs/label_noise]  SEEDS ["0 1"]
source "$(dirname "$0")/lib.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage "$0"; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/label_noise}"
SEEDS="${SEEDS:-0 1}"
NOISES=("$@")
if [[ ${#NOISES[@]} -eq 0 ]]; then NOISES=(0 0.2 0.4); fi
mkdir -p "$OUT"

for noise in "${NOISES[@]}"; do
  for seed in $SEEDS; do
    for method in sft ppo; do
      dir="$OUT/noise_$noise/${method}_seed$seed"
      if compgen -G "$dir/eval/step_*.json" > /dev/null && [[ -e "$dir/done" ]]; then continue; fi
      noisy=(seed="$seed" data.label_noise="$noise" data.label_noise_seed="$seed")
      if [[ $method == sft ]]; then
        args=(sft --config configs/sft/sst2_cpu.yaml --set "${noisy[@]}")
      else
        args=(train --config configs/demo/sst2_cpu.yaml --set "${noisy[@]}" eval_every=0)
      fi
      timed "$OUT/wall_times.tsv" "$noise" "$method" "$seed" -- \
          jax-nlu-ppo "${args[@]}" --output-dir "$dir"
      touch "$dir/done"
    done
  done
done

WALL_TIMES="$OUT/wall_times_full_dev.tsv" scripts/full_dev_eval.sh "$OUT"/noise_*/*_seed*
python scripts/sst2_tables.py label-noise "$OUT"
