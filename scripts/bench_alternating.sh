#!/usr/bin/env bash
# `jax-nlu-ppo bench --no-torch` on two commits in alternating runs, so that both meet the same
# spells of a shared machine: scripts/bench_alternating.sh BEFORE AFTER [PAIRS] [OUT_DIR].
# Each commit runs from its own git worktree (under OUT_DIR) with this checkout's environment.
set -euo pipefail
before=${1:?usage: $0 BEFORE AFTER [PAIRS] [OUT_DIR]}
after=${2:?usage: $0 BEFORE AFTER [PAIRS] [OUT_DIR]}
pairs=${3:-2}
out=${4:-runs/bench_alternating}
python=${PYTHON:-python}
mkdir -p "$out" && out=$(cd "$out" && pwd)
for side in before after; do
  rev=${!side}
  [ -d "$out/tree_$side" ] || git worktree add --detach "$out/tree_$side" "$rev" >/dev/null
done
for i in $(seq 1 "$pairs"); do
  # Odd pairs run before first, even pairs after first: neither side always follows the other.
  order="before after"; [ $((i % 2)) = 0 ] && order="after before"
  for side in $order; do
    PYTHONPATH="$out/tree_$side" "$python" -m jax_nlu_ppo bench --no-torch --compile-cache off \
      --output "$out/${side}_$i.json" > "$out/${side}_$i.log" 2>&1
    echo "$side $i: $(grep '^| iteration' "$out/${side}_$i.log")"
  done
done
