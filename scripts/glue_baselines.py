"""Zero-shot and k-shot dev scores of a model on every GLUE task with data in a local folder.

    python scripts/glue_baselines.py --glue-dir ../shared/data/glue --limit 200 --shots 0 4 \\
        --output docs/glue_baselines.json

Prints a Markdown table (task x shots: the official metric(s) and the unparsed rate). Tasks
whose train split is not in the folder draw their demonstrations from the LM-BFF 16-shot train
samples; QQP, whose dev split is missing here, is scored on the LM-BFF 16-shot dev sample.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jax_nlu_ppo.nlu import data as data_lib  # noqa: E402
from jax_nlu_ppo.nlu import evaluate as evaluate_lib  # noqa: E402
from jax_nlu_ppo.model import pretrained  # noqa: E402
from jax_nlu_ppo.nlu import tasks as tasks_lib  # noqa: E402

LMBFF = "subsets/lmbff_k-shot_16-42_"
# (task, eval split, preferred shot split); the shot split falls back to the LM-BFF sample.
TASKS = [
    ("cola", "validation"), ("sst2", "validation"), ("mrpc", "validation"),
    ("stsb", "validation"), ("qqp", "validation"), ("mnli", "validation_matched"),
    ("mnli", "validation_mismatched"), ("qnli", "validation"), ("rte", "validation"),
    ("wnli", "validation"),
]


def _first_available(glue_dir: str, task: str, splits: list[str]) -> str | None:
  for split in splits:
    try:
      data_lib.glue_path(glue_dir, task, split)
      return split
    except data_lib.DataError:
      continue
  return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2-135m-instruct")
  parser.add_argument("--glue-dir", default="../shared/data/glue")
  parser.add_argument("--limit", type=int, default=200, help="dev examples per task")
  parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
  parser.add_argument("--seed", type=int, default=0, help="dev shuffle and shot draw seed")
  parser.add_argument("--max-new-tokens", type=int, default=16)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--format", default="chat", choices=tasks_lib.FORMATS)
  parser.add_argument("--tasks", nargs="+", default=None, help="subset of task names")
  parser.add_argument("--output", default=None)
  args = parser.parse_args()

  lm = pretrained.load_pretrained(args.model, batch_size=args.batch_size)
  rows, results = [], []
  for name, split in TASKS:
    if args.tasks and name not in args.tasks:
      continue
    task = tasks_lib.get_task(name)
    eval_split = _first_available(args.glue_dir, name, [split, LMBFF + "dev"])
    shot_split = _first_available(args.glue_dir, name, ["train", LMBFF + "train"])
    if eval_split is None:
      print(f"skip {name}: no labelled dev data in {args.glue_dir}", file=sys.stderr)
      continue
    dev, _ = data_lib.load(data_lib.DataConfig(
        task=name, split=eval_split, source="glue_dir", path=args.glue_dir, limit=args.limit,
        shuffle_seed=args.seed))
    pool = []
    if shot_split is not None and max(args.shots) > 0:
      pool, _ = data_lib.load(data_lib.DataConfig(task=name, split=shot_split,
                                                  source="glue_dir", path=args.glue_dir))
    for k in args.shots:
      if k and not pool:
        continue
      start = time.perf_counter()
      config = evaluate_lib.EvalConfig(shots=k, shot_seed=args.seed, prompt_format=args.format,
                                       max_new_tokens=args.max_new_tokens)
      result = evaluate_lib.evaluate_model(lm, task, list(dev), config, shot_pool=list(pool))
      seconds = time.perf_counter() - start
      scores = {m: result.metrics[m] for m in task.metrics}
      row = {"task": name, "split": eval_split, "shots": k, "shot_split": shot_split if k else None,
             "n": len(result.predictions), "skipped": len(result.skipped), **scores,
             "unparsed_rate": result.metrics["unparsed_rate"], "seconds": round(seconds, 1)}
      rows.append(row)
      results.append(result.to_json())
      print(json.dumps(row), flush=True)

  print("\n| task | split | shots | n | metric | unparsed | seconds |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    metric = ", ".join(f"{m} {r[m]:.3f}" for m in tasks_lib.get_task(r["task"]).metrics)
    print(f"| {r['task']} | {r['split']} | {r['shots']} | {r['n']} | {metric} | "
          f"{r['unparsed_rate']:.3f} | {r['seconds']} |")
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(
        {"model": args.model, "limit": args.limit, "seed": args.seed, "format": args.format,
         "max_new_tokens": args.max_new_tokens, "rows": rows, "results": results}, indent=1))


if __name__ == "__main__":
  main()
