#!/usr/bin/env bash
# Usage: scripts/reward_model.sh
#
# PPO rewarded by a learned reward model against PPO rewarded by the gold labels, on SST-2 with
# the embedded model, for each seed: a reward model trained on 480 labelled training rows
# (configs/reward_model/sst2_cpu.yaml, its ranking scored on the 872-row dev set), then PPO on 480
# prompts of the training rows after those (configs/demo/sst2_cpu_reward_model.yaml, labels left
# out of the reward), evaluated as docs/results.md's SST-2 PPO cells (200 dev examples), the
# gold-label side of the table. Runs whose last evaluation exists are skipped, so an interrupted
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
done

python - "$OUT" "$GOLD" <<'PYEOF'
import json, pathlib, statistics, sys
out, gold = map(pathlib.Path, sys.argv[1:])
last = lambda run: json.load(open(sorted((run / "eval").glob("step_*.json"))[-1]))
def cell(values):
  return (f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"
          if len(values) > 1 else f"{values[0]:.3f}") if values else "-"
rms = [last(r) for r in sorted(out.glob("rm_seed*")) if (r / "done").exists()]
rm_ppo = [last(r)["accuracy"] for r in sorted(out.glob("ppo_rm_seed*")) if (r / "done").exists()]
gold_ppo = [last(r)["accuracy"] for r in sorted(gold.glob("ppo_seed*"))
            if list((r / "eval").glob("step_*.json"))]
# The reward model as a classifier on the 200 dev rows PPO is scored on.
subset = {p["idx"] for p in last(sorted(out.glob("ppo_rm_seed*"))[0])["predictions"]} if rm_ppo else set()
rm_200 = [statistics.mean(p["prediction"] == p["label"] for p in r["predictions"]
                          if p["idx"] in subset) for r in rms] if subset else []
print("| reward | labelled rows | reward model: dev acc (872) / AUC / acc on PPO's 200 | "
      "PPO dev accuracy (200) | seeds |")
print("|---|---|---|---|---|")
print(f"| gold label | 480 (every prompt's) | - | {cell(gold_ppo)} | {len(gold_ppo)} |")
print(f"| reward model | 480 (the reward model's; PPO's 480 prompts unlabelled) | "
      f"{cell([r['accuracy'] for r in rms])} / {cell([r['auc'] for r in rms])} / {cell(rm_200)} | "
      f"{cell(rm_ppo)} | {len(rm_ppo)} |")
PYEOF
