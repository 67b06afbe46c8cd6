#!/usr/bin/env bash
# Usage: scripts/reward_model.sh
#
# PPO rewarded by a learned reward model against PPO rewarded by the gold labels, on SST-2 with
# the embedded model, for each seed: a reward model trained on 480 labelled training rows
# (configs/reward_model/sst2_cpu.yaml, its ranking scored on the 872-row dev set), then PPO on 480
# prompts of the training rows after those (configs/demo/sst2_cpu_reward_model.yaml, labels left
# out of the reward), then the same PPO with the answer format rewarded too (reward_fn's
# answer_format: -3 for an answer no label is read from, still no labels); every PPO policy then
# scored on the whole dev set (scripts/full_dev_eval.sh); gold-label PPO is the other side of the
# table (scripts/sst2_tables.py). Finished runs and evaluations are skipped, so an interrupted
# sweep continues.
#
# Environment: OUT [runs/reward_model]  SEEDS ["0 1"]  GOLD [runs/label_noise/noise_0]: the
# gold-label PPO runs, GOLD/ppo_seedN (`scripts/label_noise.sh 0` runs them: the demo config at
# label noise 0, which are docs/results.md's SST-2 PPO cells)
source "$(dirname "$0")/lib.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage "$0"; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/reward_model}"
SEEDS="${SEEDS:-0 1}"
GOLD="${GOLD:-runs/label_noise/noise_0}"
mkdir -p "$OUT"

finished() { compgen -G "$1/eval/step_*.json" > /dev/null && [[ -e "$1/done" ]]; }
train() {   # train NAME SEED DIR COMMAND...: runs it, records its wall time, marks DIR done
  local name=$1 seed=$2 dir=$3; shift 3
  timed "$OUT/wall_times.tsv" "$name" "$seed" -- "$@"
  touch "$dir/done"
}

for seed in $SEEDS; do
  rm_dir="$OUT/rm_seed$seed"
  finished "$rm_dir" || train reward_model "$seed" "$rm_dir" \
      jax-nlu-ppo reward-model --config configs/reward_model/sst2_cpu.yaml --set seed="$seed" \
      --output-dir "$rm_dir"
  ppo_dir="$OUT/ppo_rm_seed$seed"
  finished "$ppo_dir" || train ppo_reward_model "$seed" "$ppo_dir" \
      jax-nlu-ppo train --config configs/demo/sst2_cpu_reward_model.yaml \
      --set seed="$seed" reward.model="$rm_dir" --output-dir "$ppo_dir"
  # The same, with the answer format rewarded too (no labels): -3 for an unparsed answer.
  format_dir="$OUT/ppo_rm_format_seed$seed"
  finished "$format_dir" || train ppo_reward_model_format "$seed" "$format_dir" \
      jax-nlu-ppo train --config configs/demo/sst2_cpu_reward_model.yaml \
      --set seed="$seed" reward.model="$rm_dir" \
      reward.function=jax_nlu_ppo.rl.reward_fn:answer_format --output-dir "$format_dir"
done

WALL_TIMES="$OUT/wall_times_full_dev.tsv" scripts/full_dev_eval.sh "$OUT"/ppo_rm*_seed*
python scripts/sst2_tables.py reward-model "$OUT" "$GOLD"
