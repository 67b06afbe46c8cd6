"""The tables (and a figure) of docs/results.md from the folder `scripts/reproduce.sh` fills:

    python scripts/results_table.py runs/reproduce [--plot docs/results.png]

Per task and method, the task's official metric on the same dev examples (mean and, with
several seeds, the spread min..max), the unparsed rate, and the dev perplexity. Zero-/4-shot
come from `eval` results; SFT and PPO from each run's last evaluation (`eval/` metrics of its
metrics.jsonl); multi-task PPO from `eval` of its run on each task. Wall times come from the
`wall_times.tsv` the script keeps (one line per command it ran).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jax_nlu_ppo.nlu import metrics, tasks
from jax_nlu_ppo.rl import run_loop  # noqa: E402

METHODS = ("zero-shot", "4-shot", "SFT", "PPO", "PPO multi-task")
WALL_TIMES = "wall_times.tsv"
ORDER = ("sst2", "rte", "mrpc")     # the table's rows: docs/results.md's order, then the rest


def _last_eval(run: pathlib.Path) -> dict | None:
  lines = [json.loads(x) for x in (run / run_loop.METRICS_FILE).read_text().splitlines()
           if x.strip()]
  scored = [run_loop.eval_scores(line) for line in lines if run_loop.eval_scores(line)]
  return scored[-1] if scored else None


def _json(path: pathlib.Path) -> dict | None:
  return json.loads(path.read_text()) if path.is_file() else None


def scores(out: pathlib.Path) -> dict[str, dict[str, list[dict]]]:
  """{task: {method: [one result per seed, each with the metric and `unparsed_rate`]}}."""
  found = {}
  task_dirs = [p for p in out.iterdir() if p.is_dir() and p.name != "multitask"]
  for task_dir in sorted(task_dirs, key=lambda p: (ORDER.index(p.name) if p.name in ORDER
                                                   else len(ORDER), p.name)):
    task = tasks.get_task(task_dir.name)
    cells = {
        "zero-shot": [_json(task_dir / "eval_0shot.json")],
        "4-shot": [_json(task_dir / "eval_4shot.json")],
        "SFT": [_last_eval(p) for p in sorted(task_dir.glob("sft_seed*"))],
        "PPO": [_last_eval(p) for p in sorted(task_dir.glob("ppo_seed*"))],
        "PPO multi-task": [_json(p / f"eval_{task.name}.json")
                           for p in sorted((out / "multitask").glob("ppo_seed*"))],
    }
    found[task.name] = {m: [r for r in results if r] for m, results in cells.items()}
  return found


def _metric(task_name: str) -> str:
  """The task's official metric, the one the table and chart show."""
  return tasks.get_task(task_name).metrics[0]


def _values(results: list[dict], metric: str) -> list[float]:
  return [r[metric] for r in results if metric in r]


def _cell(results: list[dict], metric: str) -> str:
  values = _values(results, metric)
  if not values:
    return "not run"
  mean = sum(values) / len(values)
  spread = f" ({min(values):.3f}..{max(values):.3f})" if len(values) > 1 else ""
  unparsed = sum(r.get("unparsed_rate", 0) for r in results) / len(values)
  return f"{mean:.3f}{spread} [{unparsed:.0%}]"


def constant_answer(task_name: str, cells: dict[str, list[dict]]) -> float | None:
  """The best score one label given to every dev example gets (the gold labels of the zero-shot
  evaluation's predictions; `cells` is the task's entry of `scores`): what a policy that learned
  only the label prior reaches."""
  result = next(iter(cells["zero-shot"]), None)
  if not result or not result.get("predictions"):
    return None
  task = tasks.get_task(task_name)
  if task.is_regression:
    return None
  golds = [p["label"] for p in result["predictions"]]
  score = metrics.METRICS[_metric(task_name)]
  return max(score([label] * len(golds), golds) for label in range(len(task.label_words)))


def wall_times(out: pathlib.Path) -> dict[str, float]:
  """{command label: seconds}, the last time each label was run."""
  path = out / WALL_TIMES
  if not path.is_file():
    return {}
  return {label: float(seconds) for label, seconds in
          (line.split("\t")[:2] for line in path.read_text().splitlines() if line.strip())}


def table(out: pathlib.Path, found: dict, constants: dict[str, float | None]) -> str:
  """The markdown tables; `found` is `scores(out)`, `constants` each task's `constant_answer`."""
  lines = ["| task (metric) | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
  ppl_lines = ["| task | base | SFT | PPO |", "|---|---|---|---|"]
  for name, cells in found.items():
    metric = _metric(name)
    lines.append(f"| {name} ({metric}) | "
                 + " | ".join(_cell(cells[m], metric) for m in METHODS) + " |")
    task_dir = out / name
    ppl = {"base": [_json(task_dir / "perplexity_base.json")],
           "SFT": [_json(p) for p in sorted(task_dir.glob("perplexity_sft_seed*.json"))],
           "PPO": [_json(p) for p in sorted(task_dir.glob("perplexity_ppo_seed*.json"))]}
    ppl_lines.append(f"| {name} | " + " | ".join(
        " / ".join(f"{r['perplexity']:.2f}" for r in ppl[k] if r) for k in ppl) + " |")
  if any(value is not None for value in constants.values()):
    lines += ["", "Best constant answer: " + ", ".join(
        f"{name} {value:.3f}" for name, value in constants.items() if value is not None)]
  out_lines = lines + ["", "Dev perplexity (the task's dev sentences; seeds separated by /):",
                       ""] + ppl_lines
  times = wall_times(out)
  if times:
    out_lines += ["", "Wall time of each command (seconds):", "", "| command | seconds |",
                  "|---|---|"] + [f"| {label} | {seconds:.0f} |" for label, seconds in times.items()]
  return "\n".join(out_lines)


def plot(found: dict, constants: dict[str, float | None], path: pathlib.Path) -> None:
  """One group of bars per task, one bar per method (the mean over seeds, whiskers min..max),
  each task's best constant answer dashed across its group."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(1.9 + 1.9 * len(found), 3.4))
  width = 0.8 / len(METHODS)
  labelled = set()      # one legend entry per method, from the first task that has it
  for j, method in enumerate(METHODS):
    for i, (name, cells) in enumerate(found.items()):
      values = _values(cells[method], _metric(name))
      if not values:
        continue
      mean = sum(values) / len(values)
      x = i - 0.4 + width * (j + 0.5)
      ax.bar(x, mean, width, color=f"C{j}", label=None if method in labelled else method,
             yerr=[[mean - min(values)], [max(values) - mean]] if len(values) > 1 else None,
             capsize=2)
      ax.text(x, mean + 0.01, f"{mean:.2f}", ha="center", va="bottom", fontsize=6)
      labelled.add(method)
  for i, name in enumerate(found):
    if constants[name] is not None:
      ax.hlines(constants[name], i - 0.42, i + 0.42, colors="black", linestyles="dashed",
                linewidth=1, label=None if "constant" in labelled else "best constant answer")
      labelled.add("constant")
  ax.set_xticks(range(len(found)))
  ax.set_xticklabels([f"{name}\n({_metric(name)})" for name in found])
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("dev score")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out", nargs="?", default="runs/reproduce", help="reproduce.sh's OUT folder")
  parser.add_argument("--plot", help="also draw the scores as bars into this PNG")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  if not out.is_dir():
    sys.exit(f"{out}: no such folder (scripts/reproduce.sh writes it)")
  found = scores(out)
  constants = {name: constant_answer(name, cells) for name, cells in found.items()}
  print(table(out, found, constants))
  if args.plot:
    plot(found, constants, pathlib.Path(args.plot))
    print(f"wrote {args.plot}")
