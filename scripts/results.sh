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
finished() {  # finished FOLDER: the run saved its last step (a run stopped by a signal has not)
  python - "$1" <<'PY'
import pathlib, sys, yaml
run = pathlib.Path(sys.argv[1])
steps = yaml.safe_load((run / "config.yaml").read_text())["steps"] if (run / "config.yaml").exists() else None
sys.exit(0 if steps and (run / "checkpoints" / str(steps)).is_dir() else 1)
PY
}
run() {     # run DIR KIND CONFIG FOLDER [ARGS...]: a train or sft run, skipped once done
  local dir="$1" kind="$2" config="$3" folder="$4"
  shift 4
  [[ -e "$folder/done" ]] && return 0
  timed "$dir" "$(basename "$folder")" jax-nlu-ppo "$kind" --config "$config" \
      --output-dir "$folder" "$@"
  if finished "$folder"; then touch "$folder/done"; fi
}
evaluate() { # evaluate DIR RESULTS LABEL [ARGS...]: jax-nlu-ppo eval into DIR/RESULTS.json,
             # the cells already there kept
  local dir="$1" results="$2" label="$3" start=$SECONDS
  shift 3
  jax-nlu-ppo eval --task sst2 --shuffle-seed 0 --output "$dir/$results.json" --skip-done \
      --table "$dir/$results.md" "$@"
  printf '%s\t%s\n' "$label" "$((SECONDS - start))" >> "$dir/wall_times.tsv"
}

main_table() {
  local dir="$OUT/main" seed base=smollm2-135m-instruct
  mkdir -p "$dir"
  for seed in $SEEDS; do   # seed by seed, so that a partial table has every method
    if stage train; then
      run "$dir" sft configs/results/sft/sst2.yaml "$dir/sft_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2.yaml "$dir/ppo_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2_grpo.yaml "$dir/grpo_seed$seed" --set seed="$seed"
      run "$dir" sft configs/results/sft/sst2_half.yaml "$dir/sft_half_seed$seed" --set seed="$seed"
      [[ -e "$dir/sft_half_seed$seed/peft/adapter_config.json" ]] || jax-nlu-ppo export \
          "$dir/sft_half_seed$seed" --format peft --output "$dir/sft_half_seed$seed/peft"
      run "$dir" train configs/results/ppo/sst2_after_sft.yaml "$dir/sft_ppo_seed$seed" \
          --set seed="$seed" --init-adapter "$dir/sft_half_seed$seed/peft"
    fi
    if stage eval; then
      local models=(--model "$base") method
      for method in sft ppo grpo sft_ppo; do
        if [[ -e "$dir/${method}_seed$seed/done" ]]; then
          models+=(--model "$dir/${method}_seed$seed")
        fi
      done
      evaluate "$dir" eval_dev "dev seed $seed" "${models[@]}" --data "$DATA/glue" --split validation
      evaluate "$dir" eval_dev "dev 4-shot seed $seed" --model "$base" --data "$DATA/glue" --split validation \
          --shots 4 --shot-seed "$seed"
      evaluate "$dir" eval_ood "ood seed $seed" "${models[@]}" --data "${OOD[0]}" --data "${OOD[1]}" --limit 500
      evaluate "$dir" eval_ood "ood 4-shot seed $seed" --model "$base" --data "${OOD[0]}" --data "${OOD[1]}" \
          --limit 500 --shots 4 --shot-seed "$seed" --shot-data "$DATA/glue"
    fi
  done
  if stage tables; then
    python scripts/seed_tables.py main "$OUT" --plot "$dir/main.png" | tee "$dir/tables.md"
  fi
}

for table in "$@"; do
  case "$table" in
    main) main_table ;;
    *) echo "unknown table $table (tables: main)" >&2; exit 2 ;;
  esac
done
