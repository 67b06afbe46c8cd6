"""A short SFT run on real data: dev accuracy and perplexity before and after, answer loss, seconds.

    python scripts/sft_learning.py                        # configs/sft/sst2_cpu.yaml
    python scripts/sft_learning.py --set steps=10 batch_size=8 --output run.json

Prints one line per step, then a table: the dev metric before/after (greedy decoding, lenient
parsing, unparsed answers counted as wrong), the training answer loss of the first and last
steps, the perplexity of the base and the SFT model on the dev inputs (how far SFT moved the
model from plain language), and the seconds per step, with the time spent compiling apart.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jax_nlu_ppo.nlu import data as data_lib  # noqa: E402
from jax_nlu_ppo.nlu import perplexity as perplexity_lib  # noqa: E402
from jax_nlu_ppo.nlu import tasks as tasks_lib  # noqa: E402
from jax_nlu_ppo.rl import run_loop  # noqa: E402
from jax_nlu_ppo.config import load_config  # noqa: E402
from jax_nlu_ppo.rl.sft import SFTConfig, SFTTrainer, format_metrics  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "configs/sft/sst2_cpu.yaml"))
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="dotted config overrides, e.g. optimizer.learning_rate=1e-4")
  parser.add_argument("--window", type=int, default=5,
                      help="steps averaged for the first/last training answer loss")
  parser.add_argument("--output", help="write the figures (and per-step metrics) as JSON")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.set, cls=SFTConfig)
  if config.eval_data is None:
    parser.error("the config needs an eval_data section (the dev split to score)")
  compile_s = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **_: compile_s.append(seconds) if event == COMPILE_EVENT else None)
  print(f"devices: {jax.devices()}", flush=True)

  eval_examples = list(data_lib.load(config.eval_data)[0])
  task = tasks_lib.get_task(config.eval_data.task)
  # Perplexity on the dev inputs (for pair tasks, the first input of each pair).
  eval_texts = perplexity_lib.column_texts(eval_examples, task.input_columns[0],
                                           f"{task.name} {config.eval_data.split}")
  start = time.perf_counter()
  trainer = SFTTrainer(config)
  load_s = time.perf_counter() - start
  print(f"loaded {config.model.name} and {len(trainer.train_examples)} training examples "
        f"in {load_s:.1f}s; {trainer.total_steps} steps of {config.batch_size} examples",
        flush=True)

  def dev_perplexity(when):
    ppl = perplexity_lib.perplexity(trainer.policy_model(), eval_texts)
    print(f"dev perplexity {when}: {ppl.perplexity:.3f}", flush=True)
    return ppl.to_json()

  # Fresh adapters (B = 0) leave the model exactly the base: "before" is the base model.
  ppl_before = dev_perplexity("before")
  compile_before_train = sum(compile_s)
  start = time.perf_counter()
  # The trainer scores eval_data before the first step and after the last (`eval/` metrics).
  lines = trainer.train(on_step=lambda m: print(format_metrics(m), flush=True))
  train_s = time.perf_counter() - start
  train_compile_s = sum(compile_s) - compile_before_train
  history = lines[1:]
  before, after = run_loop.eval_scores(lines[0]), run_loop.eval_scores(lines[-1])
  ppl_after = dev_perplexity("after")

  w = min(args.window, len(history))
  losses = [m["sft/loss"] for m in history]
  steady = history[1:] or history
  figures = {
      "config": args.config, "overrides": args.set, "steps": len(history),
      "examples_per_step": config.batch_size, "dev_examples": len(eval_examples),
      "dev_before": before, "dev_after": after,
      "perplexity_base": ppl_before, "perplexity_sft": ppl_after,
      "answer_loss_first": statistics.mean(losses[:w]),
      "answer_loss_last": statistics.mean(losses[-w:]),
      "seconds_step_median": statistics.median(m["time/step"] for m in steady),
      "seconds_first_step": history[0]["time/step"],
      "tokens_per_s_median": statistics.median(m["tokens/per_s"] for m in steady),
      "seconds_load": load_s, "seconds_train_with_evaluations": train_s,
      "seconds_compile_train": train_compile_s, "seconds_compile_total": sum(compile_s),
      "skipped_examples": len(trainer.skipped),
      "history": history,
  }
  metric = next(k for k in before if k not in ("unparsed_rate", "count"))
  print("\n| figure | value |\n|---|---|")
  print(f"| dev {metric} before -> after ({len(eval_examples)} examples) | "
        f"{before[metric]:.3f} -> {after[metric]:.3f} |")
  print(f"| dev unparsed before -> after | {before['unparsed_rate']:.3f} -> "
        f"{after['unparsed_rate']:.3f} |")
  print(f"| train answer loss, first {w} -> last {w} steps | "
        f"{figures['answer_loss_first']:.3f} -> {figures['answer_loss_last']:.3f} |")
  print(f"| dev perplexity, base -> SFT ({ppl_before['tokens']} tokens) | "
        f"{ppl_before['perplexity']:.3f} -> {ppl_after['perplexity']:.3f} |")
  print(f"| seconds per step (median; first step incl. compile) | "
        f"{figures['seconds_step_median']:.2f}s ({figures['seconds_first_step']:.2f}s) |")
  print(f"| tokens per second (median) | {figures['tokens_per_s_median']:.0f} |")
  print(f"| training with its two evaluations: wall / of which compiling | {train_s:.1f}s / "
        f"{train_compile_s:.1f}s |")
  print(f"| compiling in all (training, generation, perplexity) | {sum(compile_s):.1f}s |")
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(figures, indent=1))
  return figures


if __name__ == "__main__":
  main()
