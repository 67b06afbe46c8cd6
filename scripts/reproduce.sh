#!/usr/bin/env bash
# Usage: scripts/reproduce.sh [TASK ...]        (default: sst2 rte mrpc multitask)
#
# Reruns the table of docs/results.md: for each task, zero-shot and 4-shot evaluation, SFT and
# PPO (same number of training examples), the perplexity of the base, SFT and PPO models on the
# task's dev sentences, a report comparing the runs; then multi-task PPO over the three tasks.
# On a CPU it takes the embedded 135M model's configs (configs/demo/, configs/sft/*_cpu.yaml);
# on a TPU or GPU (JAX's default backend) the paper's LLaMA-2-7B-chat configs
# (configs/scale/llama2_7b_*/, configs/sft/llama2_7b_sst2.yaml).
#
# Environment: OUT [runs/reproduce]  SEEDS ["0"]  GLUE [../shared/data/glue]
#   DEV_LIMIT [200] dev examples scored (the configs' eval_data.limit)
# TASK `multitask` is multi-task PPO over sst2, rte and mrpc (CPU configs only).
source "$(dirname "$0")/lib.sh"
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage "$0"; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/reproduce}"
SEEDS="${SEEDS:-0}"
GLUE="${GLUE:-../shared/data/glue}"
DEV_LIMIT="${DEV_LIMIT:-200}"
TASKS=("$@")
if [[ ${#TASKS[@]} -eq 0 ]]; then TASKS=(sst2 rte mrpc multitask); fi
multitask=0
single=()
for task in "${TASKS[@]}"; do
  if [[ "$task" == multitask ]]; then multitask=1; else single+=("$task"); fi
done
mkdir -p "$OUT"
WALL_TIMES="$OUT/wall_times.tsv"
backend="$(python -c 'import jax; print(jax.default_backend())')"

ppo_config() {
  if [[ "$backend" == cpu ]]; then echo "configs/demo/$1_cpu.yaml"
  elif [[ "$backend" == tpu ]]; then echo "configs/scale/llama2_7b_tpu_v5e8/$1.yaml"
  else echo "configs/scale/llama2_7b_gpu_80gb/$1.yaml"; fi
}
sft_config() {
  if [[ "$backend" == cpu ]]; then echo "configs/sft/$1_cpu.yaml"
  else echo "configs/sft/llama2_7b_sst2.yaml --set data.task=$1 eval_data.task=$1"; fi
}
model() {   # the base model the task's configs train
  python -c "from jax_nlu_ppo import config; print(config.load_config('$(ppo_config "$1")').model.name)"
}
score() {   # score LABEL MODEL TASK OUTPUT [EVAL_ARGS...]: the task's dev examples every method
  # is scored on (the configs' eval_data: shuffled with seed 0, the first DEV_LIMIT)
  local label="$1" model="$2" task="$3" output="$4"
  shift 4
  timed "$WALL_TIMES" "$label" -- jax-nlu-ppo eval --model "$model" --task "$task" \
      --data "$GLUE" --split validation --shuffle-seed 0 --limit "$DEV_LIMIT" \
      --output "$output" "$@"
}
perplexity() {   # perplexity LABEL MODEL TASK OUTPUT: on the task's dev sentences
  timed "$WALL_TIMES" "$1" -- jax-nlu-ppo perplexity --model "$2" --task "$3" --data "$GLUE" \
      --split validation --output "$4"
}

for task in "${single[@]}"; do
  dir="$OUT/$task"
  mkdir -p "$dir"
  base="$(model "$task")"
  echo "== $task (backend $backend, base $base)"
  for shots in 0 4; do
    [[ -f "$dir/eval_${shots}shot.json" ]] || score "$task ${shots}-shot" "$base" "$task" \
        "$dir/eval_${shots}shot.json" --shots "$shots"
  done
  [[ -f "$dir/perplexity_base.json" ]] || perplexity "$task perplexity base" "$base" "$task" \
      "$dir/perplexity_base.json"
  for seed in $SEEDS; do
    # shellcheck disable=SC2046  # sft_config may add --set overrides
    timed "$WALL_TIMES" "$task SFT seed $seed" -- jax-nlu-ppo sft --config $(sft_config "$task") \
        --set seed="$seed" --output-dir "$dir/sft_seed$seed"
    timed "$WALL_TIMES" "$task PPO seed $seed" -- jax-nlu-ppo train \
        --config "$(ppo_config "$task")" --set seed="$seed" --output-dir "$dir/ppo_seed$seed"
    for method in sft ppo; do
      perplexity "$task perplexity $method seed $seed" "$dir/${method}_seed$seed" "$task" \
          "$dir/perplexity_${method}_seed$seed.json"
    done
  done
  # Every seed run so far, so that a later `SEEDS=1` adds to the report instead of replacing it.
  jax-nlu-ppo report "$dir"/ppo_seed* "$dir"/sft_seed* --output "$dir/report"
done

if [[ "$multitask" == 1 && "$backend" == cpu ]]; then
  dir="$OUT/multitask"
  for seed in $SEEDS; do
    # Scored on every task's dev examples after training instead of RTE's during it.
    timed "$WALL_TIMES" "multitask PPO seed $seed" -- jax-nlu-ppo train \
        --config configs/demo/multitask_cpu.yaml --set seed="$seed" eval_data=null \
        --output-dir "$dir/ppo_seed$seed"
    for task in sst2 rte mrpc; do
      score "multitask PPO seed $seed eval $task" "$dir/ppo_seed$seed" "$task" \
          "$dir/ppo_seed$seed/eval_$task.json"
    done
  done
elif [[ "$multitask" == 1 ]]; then
  echo "== multitask: no multi-task config for backend $backend yet (configs/demo/multitask_cpu.yaml is the CPU one)"
fi
python scripts/results_table.py "$OUT"
