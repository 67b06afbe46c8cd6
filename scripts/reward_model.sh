#!/usr/bin/env bash
# Usage: scripts/reward_model.sh
#
# PPO rewarded by a learned reward model against PPO rewarded by the gold labels, on SST-2 with
# the embedded model, for each seed: a reward model trained on 480 labelled training rows
# (configs/reward_model/sst2_cpu.yaml, its ranking scored on the 872-row dev set), then PPO on 480
# prompts of the training rows after those (configs/demo/sst2_cpu_reward_model.yaml, labels left
# out of the reward), then the same PPO with the answer format rewarded too (reward_fn's
# answer_format: -3 for an answer no label is read from, still no labels), evaluated as
# docs/results.md's SST-2 PPO cells (200 dev examples); gold-label PPO is the other side of the
# table. Runs whose last evaluation exists are skipped, so an interrupted
# sweep continues; then the table.
#
# Environment: OUT [runs/reward_model]  SEEDS ["0 1"]  GOLD [runs/label_noise/noise_0]: the
# gold-label PPO runs, GOLD/ppo_seedN (`scripts/label_noise.sh 0` runs them: the demo config at
# label noise 0, which are docs/results.md's SST-2 PPO cells)
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0
fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/reward_model}"
SEEDS="${SEEDS:-0 1}"
GOLD="${GOLD:-runs/label_noise/noise_0}"
mkdir -p "$OUT"

finished() { compgen -G "$1/eval/step_*.json" > /dev/null && [[ -e "$1/done" ]]; }
timed() {   # timed NAME SEED COMMAND...: runs it, marks the folder done, records the wall time
  local name=$1 seed=$2 dir=$3; shift 3
  local start=$SECONDS
  "$@"
  touch "$dir/done"
  printf '%s\t%s\t%s\n' "$name" "$seed" "$((SECONDS - start))" >> "$OUT/wall_times.tsv"
}

for seed in $SEEDS; do
  rm_dir="$OUT/rm_seed$seed"
  finished "$rm_dir" || timed reward_model "$seed" "$rm_dir" \
      jax-nlu-ppo reward-model --config configs/reward_model/sst2_cpu.yaml --set seed="$seed" \
      --output-dir "$rm_dir"
  ppo_dir="$OUT/ppo_rm_seed$seed"
  finished "$ppo_dir" || timed ppo_reward_model "$seed" "$ppo_dir" \
      jax-nlu-ppo train --config configs/demo/sst2_cpu_reward_model.yaml \
      --set seed="$seed" reward.model="$rm_dir" --output-dir "$ppo_dir"
  # The same, with the answer format rewarded too (no labels): -3 for an unparsed answer.
  format_dir="$OUT/ppo_rm_format_seed$seed"
  finished "$format_dir" || timed ppo_reward_model_format "$seed" "$format_dir" \
      jax-nlu-ppo train --config configs/demo/sst2_cpu_reward_model.yaml \
      --set seed="$seed" reward.model="$rm_dir" \
      reward.function=jax_nlu_ppo.rl.reward_fn:answer_format --output-dir "$format_dir"
done

python - "$OUT" "$GOLD" <<'PYEOF'
import json, pathlib, statistics, sys
out, gold = map(pathlib.Path, sys.argv[1:])
last = lambda run: json.load(open(sorted((run / "eval").glob("step_*.json"))[-1]))
def cell(values):
  return (f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"
          if len(values) > 1 else f"{values[0]:.3f}") if values else "-"
done = lambda folder, pattern: [last(r) for r in sorted(folder.glob(pattern))
                                if (r / "done").exists()]
acc = lambda runs: cell([r["accuracy"] for r in runs])
unparsed = lambda runs: cell([r["unparsed_rate"] for r in runs])
rms, gold_ppo = done(out, "rm_seed*"), done(gold, "ppo_seed*")
rm_ppo, rm_format_ppo = done(out, "ppo_rm_seed*"), done(out, "ppo_rm_format_seed*")
# The reward models as classifiers on the 200 dev rows PPO is scored on.
subset = {p["idx"] for p in (rm_ppo or gold_ppo or [{"predictions": []}])[0]["predictions"]}
rm_200 = [statistics.mean(p["prediction"] == p["label"] for p in r["predictions"]
                          if p["idx"] in subset) for r in rms] if subset else []
print(f"Reward models ({len(rms)} seeds): dev accuracy (872 rows) {acc(rms)}, AUC "
      f"{cell([r['auc'] for r in rms])}, accuracy on PPO's 200 dev rows {cell(rm_200)}\n")
print("| PPO reward | labels used | PPO dev accuracy (200) | unparsed | seeds |")
print("|---|---|---|---|---|")
for name, labels, runs in [
    ("gold label", "480, every prompt's", gold_ppo),
    ("reward model", "480, the reward model's (PPO's prompts: none)", rm_ppo),
    ("reward model + answer format", "the same", rm_format_ppo)]:
  print(f"| {name} | {labels} | {acc(runs)} | {unparsed(runs)} | {len(runs)} |")
PYEOF
