"""A short PPO run on real data: dev accuracy before and after, training reward, seconds per phase.

    python scripts/ppo_learning.py                       # configs/demo/sst2_cpu.yaml
    python scripts/ppo_learning.py --set steps=40 rollout.batch_size=32 --output run.json

Prints one line per iteration, then a table: the dev metric before/after (greedy decoding,
lenient parsing, unparsed answers counted as wrong), the mean training reward of the first and
last iterations, and the median seconds of each phase (the first iteration, which compiles, is
reported apart). `--plot FILE.png` draws reward and accuracy per iteration.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jax_nlu_ppo.rl import run_loop  # noqa: E402
from jax_nlu_ppo.config import load_config  # noqa: E402
from jax_nlu_ppo.rl.trainer import PPOTrainer, format_metrics  # noqa: E402

PHASES = ("time/rollout", "time/reward", "time/experience", "time/update", "time/step")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "configs/demo/sst2_cpu.yaml"))
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="dotted config overrides, e.g. ppo.ppo_epochs=4")
  parser.add_argument("--window", type=int, default=5,
                      help="iterations averaged for the first/last training reward")
  parser.add_argument("--output", help="write the figures (and per-step metrics) as JSON")
  parser.add_argument("--plot", help="write a PNG of reward and accuracy per iteration")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.set)
  if config.eval_data is None:
    parser.error("the config needs an eval_data section (the dev split to score)")
  start = time.perf_counter()
  trainer = PPOTrainer(config)
  load_s = time.perf_counter() - start
  print(f"loaded {config.model.name} and {len(trainer.train_examples)} training examples "
        f"in {load_s:.1f}s; {trainer.total_steps} iterations of {config.rollout.batch_size} "
        f"prompts", flush=True)

  # The trainer scores eval_data before the first step and after the last (`eval/` metrics).
  lines = trainer.train(on_step=lambda m: print(format_metrics(m), flush=True))
  history = lines[1:]
  before, after = run_loop.eval_scores(lines[0]), run_loop.eval_scores(lines[-1])

  w = min(args.window, len(history))
  rewards = [m["env/reward_mean"] for m in history]
  steady = history[1:] or history
  figures = {
      "config": args.config, "overrides": args.set, "iterations": len(history),
      "prompts_per_iteration": config.rollout.batch_size,
      "dev_before": before, "dev_after": after,
      "train_reward_first": statistics.mean(rewards[:w]),
      "train_reward_last": statistics.mean(rewards[-w:]),
      "seconds_median": {p: statistics.median(m[p] for m in steady) for p in PHASES},
      "seconds_first_iteration": {p: history[0][p] for p in PHASES},
      "history": history,
  }
  metric = next(k for k in before if k not in ("unparsed_rate", "count"))
  print("\n| figure | value |\n|---|---|")
  print(f"| dev {metric} before -> after | {before[metric]:.3f} -> {after[metric]:.3f} |")
  print(f"| dev unparsed before -> after | {before['unparsed_rate']:.3f} -> "
        f"{after['unparsed_rate']:.3f} |")
  print(f"| train reward, first {w} -> last {w} iterations | "
        f"{figures['train_reward_first']:+.3f} -> {figures['train_reward_last']:+.3f} |")
  for p in PHASES:
    print(f"| {p} (median; first iteration incl. compile) | "
          f"{figures['seconds_median'][p]:.2f}s ({figures['seconds_first_iteration'][p]:.2f}s) |")
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(figures, indent=1))
  if args.plot:
    plot(history, before, after, metric, args.plot)
  return figures


def plot(history, before, after, metric, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [m["iteration"] for m in history]
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
  ax[0].plot(steps, [m["env/reward_mean"] for m in history], label="reward")
  ax[0].set_xlabel("iteration"), ax[0].set_title("mean training reward")
  ax[1].plot(steps, [m["env/accuracy"] for m in history], label="train accuracy")
  ax[1].axhline(before[metric], ls="--", c="gray", label=f"dev {metric} before")
  ax[1].axhline(after[metric], ls="-", c="green", label=f"dev {metric} after")
  ax[1].set_xlabel("iteration"), ax[1].legend(), ax[1].set_title("accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
