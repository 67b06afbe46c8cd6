#!/usr/bin/env bash
# Usage: scripts/results.sh TABLE...        (tables: main)
#
# Reruns a table of docs/results.md by name on the embedded 135M model, skipping every cell
# already done (a run folder with a `done` file, an evaluation already in its results file).
#   main   SST-2: SFT, PPO, GRPO and SFT then PPO (configs/results/), each on the same 480
#          training examples, per seed; then zero-shot, 4-shot (one shot draw per seed) and every
#          trained model scored on the whole dev set (872 sentences) and, with the SST-2 prompt,
#          on 500 sentences of each out-of-domain set (Financial PhraseBank, TweetEval); then the
#          tables (scripts/results_tables.py).
#
# Environment: OUT [runs/results]  SEEDS ["0 1 2"]  STAGES ["train eval tables"]
#   DATA [../shared/data]; wall times go to OUT/TABLE/wall_times.tsv.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help || $# -eq 0 ]]; then
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0
fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/results}"
SEEDS="${SEEDS:-0 1 2}"
STAGES="${STAGES:-train eval tables}"
DATA="${DATA:-../shared/data}"
OOD=("$DATA/ood/financial_phrasebank_allagree.jsonl" "$DATA/ood/tweeteval_sentiment_test.jsonl")

stage() { [[ " $STAGES " == *" $1 "* ]]; }
timed() {   # timed DIR LABEL COMMAND...: runs COMMAND, adds "LABEL<tab>seconds" to DIR/wall_times.tsv
  local dir="$1" label="$2" start=$SECONDS
  shift 2
  "$@"
  printf '%s\t%s\n' "$label" "$((SECONDS - start))" >> "$dir/wall_times.tsv"
}
run() {     # run DIR KIND CONFIG FOLDER [ARGS...]: a train or sft run, skipped once done
  local dir="$1" kind="$2" config="$3" folder="$4"
  shift 4
  [[ -e "$folder/done" ]] && return 0
  timed "$dir" "$(basename "$folder")" jax-nlu-ppo "$kind" --config "$config" \
      --output-dir "$folder" "$@"
  touch "$folder/done"
}

main_table() {
  local dir="$OUT/main" seed
  mkdir -p "$dir"
  if stage train; then
    for seed in $SEEDS; do
      run "$dir" sft configs/results/sft/sst2.yaml "$dir/sft_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2.yaml "$dir/ppo_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2_grpo.yaml "$dir/grpo_seed$seed" --set seed="$seed"
      run "$dir" sft configs/results/sft/sst2_half.yaml "$dir/sft_half_seed$seed" --set seed="$seed"
      [[ -e "$dir/sft_half_seed$seed/peft/adapter_config.json" ]] || jax-nlu-ppo export \
          "$dir/sft_half_seed$seed" --format peft --output "$dir/sft_half_seed$seed/peft"
      run "$dir" train configs/results/ppo/sst2_after_sft.yaml "$dir/sft_ppo_seed$seed" \
          --set seed="$seed" --init-adapter "$dir/sft_half_seed$seed/peft"
    done
  fi
}

for table in "$@"; do
  case "$table" in
    main) main_table ;;
    *) echo "unknown table $table (tables: main)" >&2; exit 2 ;;
  esac
done
