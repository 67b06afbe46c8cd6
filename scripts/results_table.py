"""The table of docs/results.md from the folder `scripts/reproduce.sh` fills:

    python scripts/results_table.py runs/reproduce

Per task and method, the task's official metric on the same dev examples (mean and, with
several seeds, the spread min..max), the unparsed rate, and the dev perplexity. Zero-/4-shot
come from `eval` results; SFT and PPO from each run's last evaluation (`eval/` metrics of its
metrics.jsonl); multi-task PPO from `eval` of its run on each task.
"""
from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jax_nlu_ppo import run_loop, tasks  # noqa: E402

METHODS = ("zero-shot", "4-shot", "SFT", "PPO", "PPO multi-task")


def _last_eval(run: pathlib.Path) -> dict | None:
  lines = [json.loads(x) for x in (run / run_loop.METRICS_FILE).read_text().splitlines()
           if x.strip()]
  scored = [run_loop.eval_scores(line) for line in lines if run_loop.eval_scores(line)]
  return scored[-1] if scored else None


def _json(path: pathlib.Path) -> dict | None:
  return json.loads(path.read_text()) if path.is_file() else None


def _cell(results: list[dict], metric: str) -> str:
  values = [r[metric] for r in results if r and metric in r]
  if not values:
    return ""
  mean = sum(values) / len(values)
  spread = f" ({min(values):.3f}..{max(values):.3f})" if len(values) > 1 else ""
  unparsed = sum(r.get("unparsed_rate", 0) for r in results if r) / len(values)
  return f"{mean:.3f}{spread} [{unparsed:.0%}]"


def table(out: pathlib.Path) -> str:
  lines = ["| task (metric) | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
  ppl_lines = ["| task | base | SFT | PPO |", "|---|---|---|---|"]
  for task_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "multitask"):
    task = tasks.get_task(task_dir.name)
    metric = task.metrics[0]
    cells = {
        "zero-shot": [_json(task_dir / "eval_0shot.json")],
        "4-shot": [_json(task_dir / "eval_4shot.json")],
        "SFT": [_last_eval(p) for p in sorted(task_dir.glob("sft_seed*"))],
        "PPO": [_last_eval(p) for p in sorted(task_dir.glob("ppo_seed*"))],
        "PPO multi-task": [_json(p / f"eval_{task.name}.json")
                           for p in sorted((out / "multitask").glob("ppo_seed*"))],
    }
    lines.append(f"| {task.name} ({metric}) | "
                 + " | ".join(_cell(cells[m], metric) for m in METHODS) + " |")
    ppl = {"base": [_json(task_dir / "perplexity_base.json")],
           "SFT": [_json(p) for p in sorted(task_dir.glob("perplexity_sft_seed*.json"))],
           "PPO": [_json(p) for p in sorted(task_dir.glob("perplexity_ppo_seed*.json"))]}
    ppl_lines.append(f"| {task.name} | " + " | ".join(
        " / ".join(f"{r['perplexity']:.2f}" for r in ppl[k] if r) for k in ppl) + " |")
  return "\n".join(lines + ["", "Dev perplexity (the task's dev sentences; seeds separated by /):",
                            ""] + ppl_lines)


if __name__ == "__main__":
  print(table(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reproduce")))
