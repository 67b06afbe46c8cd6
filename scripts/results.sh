#!/usr/bin/env bash
# Usage: scripts/results.sh TABLE...     (tables: main ablations budget tasks multitask)
#
# Reruns a table of docs/results.md by name on the embedded 135M model (configs/results/),
# skipping every cell already done (a run folder with a `done` file, an evaluation already in
# its results file), then prints the table (scripts/seed_tables.py) into OUT/TABLE/tables.md.
#   main       SST-2: SFT, PPO, GRPO and SFT then PPO, each on the same 480 training examples,
#              seed by seed; zero-shot, 4-shot (a shot draw per seed) and every trained model
#              scored on the whole dev set (872 sentences) and, with the SST-2 prompt, on 500
#              sentences of each out-of-domain set (Financial PhraseBank, TweetEval).
#   ablations  the main PPO run with KL coefficient 0, 0.2, the adaptive controller, clip range
#              0.1 and 0.4 (main: KL 0.05, clip 0.2; its runs are reused, or trained into
#              OUT/main where missing), seeds ABLATION_SEEDS:
#              dev accuracy, dev perplexity of the SST-2 sentences, final KL and entropy.
#   budget     SFT, PPO, and SFT's first 160 examples then PPO, each to 1920 examples, the dev
#              set scored every 160 (BUDGET_SEEDS).
#   tasks      TASKS (QNLI, QQP, MNLI): zero-shot, SFT and PPO on 960 examples (TASK_SEEDS), scored on
#              500 dev pairs (QQP: 500 held-out training pairs, it has no dev set here); the
#              NLI models also with the RTE prompt on 500 pairs of SICK and of ConjNLI.
#   multitask  PPO over SST-2, RTE and MRPC, advantages whitened over the batch or per task
#              (TASK_SEEDS), scored on each task's dev set.
#
# Environment: OUT [runs/results]  SEEDS ["0 1 2"]  ABLATION_SEEDS ["0 1"]  BUDGET_SEEDS ["0"]
#   TASK_SEEDS ["0"]  TASKS ["qnli qqp mnli"]  STAGES ["train eval tables"]
#   DATA [../shared/data]; wall times go to OUT/TABLE/wall_times.tsv, and the commit of each
#   call to OUT/TABLE/commits.tsv.
source "$(dirname "$0")/lib.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help || $# -eq 0 ]]; then usage "$0"; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/results}"
SEEDS="${SEEDS:-0 1 2}"
ABLATION_SEEDS="${ABLATION_SEEDS:-0 1}"
BUDGET_SEEDS="${BUDGET_SEEDS:-0}"
TASK_SEEDS="${TASK_SEEDS:-0}"
TASKS="${TASKS:-qnli qqp mnli}"
BASE=smollm2-135m-instruct
STAGES="${STAGES:-train eval tables}"
DATA="${DATA:-../shared/data}"
OOD=("$DATA/ood/financial_phrasebank_allagree.jsonl" "$DATA/ood/tweeteval_sentiment_test.jsonl")

stage() { [[ " $STAGES " == *" $1 "* ]]; }
finished() {  # finished FOLDER: the run saved its last step (a run stopped by a signal has not)
  local steps
  steps="$(sed -n 's/^steps: *\([0-9]*\)$/\1/p' "$1/config.yaml" 2>/dev/null)"
  [[ -n "$steps" && -d "$1/checkpoints/$steps" ]]
}
run() {     # run DIR KIND CONFIG FOLDER [ARGS...]: a train or sft run, skipped once done
  local dir="$1" kind="$2" config="$3" folder="$4"
  shift 4
  [[ -e "$folder/done" ]] && return 0
  timed "$dir/wall_times.tsv" "$(basename "$folder")" -- jax-nlu-ppo "$kind" --config "$config" \
      --output-dir "$folder" "$@"
  if finished "$folder"; then touch "$folder/done"; fi
}
evaluate() { # evaluate DIR RESULTS LABEL [ARGS...]: jax-nlu-ppo eval into DIR/RESULTS.json,
             # the cells already there kept
  local dir="$1" results="$2" label="$3"
  shift 3
  timed "$dir/wall_times.tsv" "$label" -- jax-nlu-ppo eval --shuffle-seed 0 \
      --output "$dir/$results.json" --skip-done --table "$dir/$results.md" "$@"
}

sft_then_ppo() {  # sft_then_ppo DIR SFT_CONFIG SFT_NAME PPO_CONFIG SEED: the SFT part into
                  # DIR/SFT_NAME_seedS, exported, then PPO from its adapter into DIR/sft_ppo_seedS
  local dir="$1" sft="$dir/$3_seed$5"
  run "$dir" sft "configs/results/$2" "$sft" --set seed="$5"
  [[ -e "$sft/peft/adapter_config.json" ]] || jax-nlu-ppo export "$sft" --format peft \
      --output "$sft/peft"
  run "$dir" train "configs/results/$4" "$dir/sft_ppo_seed$5" --set seed="$5" \
      --init-adapter "$sft/peft"
}

main_table() {
  local dir="$OUT/main" seed base="$BASE"
  mkdir -p "$dir"
  for seed in $SEEDS; do   # seed by seed, so that a partial table has every method
    if stage train; then
      run "$dir" sft configs/results/sft/sst2.yaml "$dir/sft_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2.yaml "$dir/ppo_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2_grpo.yaml "$dir/grpo_seed$seed" --set seed="$seed"
      sft_then_ppo "$dir" sft/sst2_half.yaml sft_half ppo/sst2_after_sft.yaml "$seed"
    fi
    if stage eval; then
      local models=(--model "$base") method
      for method in sft ppo grpo sft_ppo; do
        if [[ -e "$dir/${method}_seed$seed/done" ]]; then
          models+=(--model "$dir/${method}_seed$seed")
        fi
      done
      evaluate "$dir" eval_dev "dev seed $seed" "${models[@]}" --task sst2 --data "$DATA/glue" \
          --split validation
      evaluate "$dir" eval_dev "dev 4-shot seed $seed" --model "$base" --task sst2 \
          --data "$DATA/glue" --split validation --shots 4 --shot-seed "$seed"
      evaluate "$dir" eval_ood "ood seed $seed" "${models[@]}" --task sst2 --data "${OOD[0]}" \
          --data "${OOD[1]}" --limit 500
      evaluate "$dir" eval_ood "ood 4-shot seed $seed" --model "$base" --task sst2 \
          --data "${OOD[0]}" --data "${OOD[1]}" --limit 500 --shots 4 --shot-seed "$seed" \
          --shot-data "$DATA/glue"
    fi
  done
  tables main
}

tables() {  # tables TABLE: print it into OUT/TABLE/tables.md, its figure OUT/TABLE/TABLE.png
  if stage tables; then
    python scripts/seed_tables.py "$1" "$OUT" --plot "$OUT/$1/$1.png" | tee "$OUT/$1/tables.md"
  fi
}
perplexity() {  # perplexity DIR MODEL OUTPUT: dev perplexity of the SST-2 sentences
  [[ -e "$3" ]] && return 0
  timed "$1/wall_times.tsv" "perplexity $(basename "$(dirname "$3")")" -- \
      jax-nlu-ppo perplexity --model "$2" --task sst2 --data "$DATA/glue" --split validation \
      --output "$3"
}

ablations_table() {
  local dir="$OUT/ablations" seed name models
  mkdir -p "$dir"
  local names=(kl0 kl0.2 kl_adaptive clip0.1 clip0.4)
  for seed in $ABLATION_SEEDS; do
    if stage train; then
      # The KL 0.05 / clip 0.2 row, the main table's PPO run, first: every row is compared to it.
      mkdir -p "$OUT/main"
      run "$OUT/main" train configs/results/ppo/sst2.yaml "$OUT/main/ppo_seed$seed" \
          --set seed="$seed"
      for name in "${names[@]}"; do
        run "$dir" train "configs/results/ppo/sst2_$name.yaml" "$dir/${name}_seed$seed" \
            --set seed="$seed"
      done
    fi
    if stage eval; then
      models=()
      for name in "${names[@]}"; do
        if [[ -e "$dir/${name}_seed$seed/done" ]]; then models+=(--model "$dir/${name}_seed$seed"); fi
      done
      if [[ -e "$OUT/main/ppo_seed$seed/done" ]]; then models+=(--model "$OUT/main/ppo_seed$seed"); fi
      if [[ ${#models[@]} -gt 0 ]]; then
        evaluate "$dir" eval_dev "dev seed $seed" "${models[@]}" --task sst2 \
            --data "$DATA/glue" --split validation
      fi
      perplexity "$dir" "$BASE" "$dir/perplexity_base.json"
      for name in "${names[@]}" main_ppo; do
        local run_dir="$dir/${name}_seed$seed"
        [[ $name == main_ppo ]] && run_dir="$OUT/main/ppo_seed$seed"
        if [[ -e "$run_dir/done" ]]; then
          perplexity "$dir" "$run_dir" "$dir/perplexity_${name}_seed$seed.json"
        fi
      done
    fi
  done
  tables ablations
}

budget_table() {
  local dir="$OUT/budget" seed
  mkdir -p "$dir"
  for seed in $BUDGET_SEEDS; do
    if stage train; then   # the dev evaluations happen inside the runs (eval_every)
      run "$dir" sft configs/results/sft/sst2_budget.yaml "$dir/sft_seed$seed" --set seed="$seed"
      run "$dir" train configs/results/ppo/sst2_budget.yaml "$dir/ppo_seed$seed" --set seed="$seed"
      sft_then_ppo "$dir" sft/sst2_first160.yaml sft_first160 ppo/sst2_budget_after_sft.yaml \
          "$seed"
    fi
  done
  tables budget
}

task_eval_args() {  # the data a task is scored on: 500 dev pairs, QQP's held out from training
  case "$1" in
    qqp) echo "--data $DATA/glue --split train --offset 8999 --limit 500" ;;
    mnli) echo "--data $DATA/glue --split validation_matched --limit 500" ;;
    *) echo "--data $DATA/glue --split validation --limit 500" ;;
  esac
}

tasks_table() {
  local dir="$OUT/tasks" seed task method models
  mkdir -p "$dir"
  for task in $TASKS; do
    for seed in $TASK_SEEDS; do
      if stage train; then
        run "$dir" sft "configs/results/sft/$task.yaml" "$dir/${task}_sft_seed$seed" --set seed="$seed"
        run "$dir" train "configs/results/ppo/$task.yaml" "$dir/${task}_ppo_seed$seed" --set seed="$seed"
      fi
      if stage eval; then
        models=(--model "$BASE")
        for method in sft ppo; do
          if [[ -e "$dir/${task}_${method}_seed$seed/done" ]]; then
            models+=(--model "$dir/${task}_${method}_seed$seed")
          fi
        done
        # shellcheck disable=SC2046  # task_eval_args gives several arguments
        evaluate "$dir" eval_dev "$task seed $seed" "${models[@]}" --task "$task" \
            $(task_eval_args "$task")
        if [[ $task != qqp ]]; then   # an NLI model on other NLI data, with the RTE prompt
          evaluate "$dir" eval_ood "$task ood seed $seed" "${models[@]}" --task rte \
              --data "$DATA/ood/sick_test.jsonl" --data "$DATA/ood/conjnli_dev.jsonl" --limit 500
        fi
      fi
    done
  done
  tables tasks
}

multitask_table() {
  local dir="$OUT/multitask" seed name models
  mkdir -p "$dir"
  for seed in $TASK_SEEDS; do
    models=()
    for name in multitask multitask_per_task; do
      if stage train; then
        run "$dir" train "configs/results/ppo/$name.yaml" "$dir/${name}_seed$seed" --set seed="$seed"
      fi
      if [[ -e "$dir/${name}_seed$seed/done" ]]; then models+=(--model "$dir/${name}_seed$seed"); fi
    done
    if stage eval && [[ ${#models[@]} -gt 0 ]]; then
      evaluate "$dir" eval_dev "dev seed $seed" "${models[@]}" --task sst2 --task rte \
          --task mrpc --data "$DATA/glue" --split validation
    fi
  done
  tables multitask
}

for table in "$@"; do
  # Which code made the table's cells: one line per call, the commit and the date.
  mkdir -p "$OUT/$table"
  printf '%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo none)" \
      "$STAGES" >> "$OUT/$table/commits.tsv"
  case "$table" in
    main) main_table ;;
    ablations) ablations_table ;;
    budget) budget_table ;;
    tasks) tasks_table ;;
    multitask) multitask_table ;;
    *) echo "unknown table $table (tables: main ablations budget tasks multitask)" >&2; exit 2 ;;
  esac
done
