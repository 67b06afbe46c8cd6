"""docs/results.md's tables over seeds, read from the results files `jax-nlu-ppo eval` writes
for several models (scripts/results.sh):

    python scripts/seed_tables.py main [OUT] [--plot PNG]    (default OUT: runs/results)

`main` reads OUT/main/eval_dev.json (the SST-2 dev set) and OUT/main/eval_ood.json (the
out-of-domain sets) and prints the main table and the transfer table. A model is a method and a
seed: a run folder `<method>_seed<S>`, or the base model (zero-shot; k-shot with shot seed S).
A cell is the mean over seeds, its 95% Student-t interval over seeds (how far other seeds could
move it; none for one seed) and the seeds' min..max. A difference between two methods is paired
over the examples (each example's score averaged over each method's seeds, then differenced),
with a 95% bootstrap interval over the examples: it says how much the choice of examples moves
the difference, not how much other seeds would.
"""
import argparse
import json
import pathlib
import re
import sys

import numpy as np

from jax_nlu_ppo.nlu import metrics

METHODS = {"zero-shot": "zero-shot", "4-shot": "4-shot", "sft": "SFT", "ppo": "PPO",
           "grpo": "GRPO", "sft_ppo": "SFT then PPO"}
SET_NAMES = {"sst2 validation": "SST-2 dev",
             "sst2 financial_phrasebank_allagree.jsonl": "Financial PhraseBank",
             "sst2 tweeteval_sentiment_test.jsonl": "TweetEval"}


def method_and_seed(entry: dict) -> tuple[str, int]:
  """("ppo", 1) for a run folder ppo_seed1; ("zero-shot", 0) or ("4-shot", S) for a base."""
  found = re.fullmatch(r"(.+)_seed(\d+)", pathlib.PurePath(entry["model"]).name)
  if found:
    return found[1], int(found[2])
  shots = entry["cell"]["shots"]
  return ("zero-shot", 0) if shots == 0 else (f"{shots}-shot", entry["cell"]["shot_seed"])


class Cells:
  """Per (method, set): the seeds' 0/1 correctness on the set's examples, in one order."""

  def __init__(self, entries: list[dict]):
    self.correct: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    self.unparsed: dict[tuple[str, str], list[float]] = {}
    self.order: dict[str, list[int]] = {}
    for e in entries:
      method, seed = method_and_seed(e)
      right = {p["idx"]: float(p["prediction"] == p["label"]) for p in e["predictions"]}
      order = self.order.setdefault(e["set"], sorted(right))
      if sorted(right) != order:
        raise ValueError(f"{e['model']} on {e['set']}: scored other examples than the rest")
      self.correct.setdefault((method, e["set"]), {})[seed] = np.array([right[i] for i in order])
      self.unparsed.setdefault((method, e["set"]), []).append(e["unparsed_rate"])

  def seeds(self, method: str, set_name: str) -> np.ndarray | None:
    """[seeds, examples] of 0/1, or None when the method has no model on the set."""
    runs = self.correct.get((method, set_name))
    return None if not runs else np.stack([runs[s] for s in sorted(runs)])

  def cell(self, method: str, set_name: str) -> str:
    m = self.seeds(method, set_name)
    if m is None:
      return "-"
    accs = m.mean(axis=1)
    text = f"{accs.mean():.3f}"
    interval = metrics.seed_interval(accs)
    if interval:
      text += " [{:.3f}, {:.3f}] ({:.3f}..{:.3f})".format(*interval, accs.min(), accs.max())
    return text + f" n={len(accs)}"

  def difference(self, a: str, b: str, set_name: str) -> str:
    ma, mb = self.seeds(a, set_name), self.seeds(b, set_name)
    if ma is None or mb is None:
      return "-"
    d = ma.mean(axis=0) - mb.mean(axis=0)
    return "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *metrics.example_mean_interval(d))

  def methods(self) -> list[str]:
    found = {m for m, _ in self.correct}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def _read(path: pathlib.Path) -> list[dict]:
  return json.loads(path.read_text())["evaluations"] if path.exists() else []


def main_tables(out: pathlib.Path) -> tuple[str, Cells, list[str]]:
  entries = _read(out / "main" / "eval_dev.json") + _read(out / "main" / "eval_ood.json")
  if not entries:
    return f"no evaluations in {out / 'main'}", None, []
  cells = Cells(entries)
  sets = [s for s in SET_NAMES if s in cells.order] + sorted(set(cells.order) - set(SET_NAMES))
  dev = "sst2 validation"
  lines = [f"SST-2 dev accuracy ({len(cells.order.get(dev, []))} sentences): mean [95% interval "
           "over seeds] (min..max) n=seeds; differences paired over the sentences [95% "
           "bootstrap interval]", "",
           "| method | SST-2 dev | minus SFT | minus zero-shot | unparsed (max) |",
           "|---|---|---|---|---|"]
  for method in cells.methods():
    unparsed = cells.unparsed.get((method, dev))
    lines.append(f"| {METHODS.get(method, method)} | {cells.cell(method, dev)} | "
                 f"{cells.difference(method, 'sft', dev) if method != 'sft' else '-'} | "
                 f"{cells.difference(method, 'zero-shot', dev) if method != 'zero-shot' else '-'}"
                 f" | {f'{100 * max(unparsed):.0f}%' if unparsed else '-'} |")
  ood = [s for s in sets if s != dev]
  if ood:
    lines += ["", "Transfer, the SST-2 prompt on other sentiment data: accuracy, and the gain "
              "over zero-shot and over SFT (paired):", ""]
    header = ["method"] + [f"{SET_NAMES.get(s, s)} ({len(cells.order[s])})" for s in ood]
    header += [f"{SET_NAMES.get(s, s)} minus {b}" for s in ood for b in ("zero-shot", "SFT")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in cells.methods():
      row = [METHODS.get(method, method)] + [cells.cell(method, s) for s in ood]
      row += [cells.difference(method, b, s) if method != b else "-"
              for s in ood for b in ("zero-shot", "sft")]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines), cells, sets


def plot(cells: Cells, sets: list[str], path: str) -> None:
  """Accuracy per method and set: bars at the seeds' mean, the seeds as dots."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = cells.methods()
  width = 0.8 / len(sets)
  fig, ax = plt.subplots(figsize=(1.4 * len(methods) + 2, 3.6))
  for j, s in enumerate(sets):
    xs, means = [], []
    for i, method in enumerate(methods):
      m = cells.seeds(method, s)
      if m is None:
        continue
      x = i + (j - (len(sets) - 1) / 2) * width
      accs = m.mean(axis=1)
      xs.append(x)
      means.append(accs.mean())
      ax.plot([x] * len(accs), accs, "k.", ms=3)
    ax.bar(xs, means, width, label=SET_NAMES.get(s, s))
  ax.set_xticks(range(len(methods)), [METHODS.get(m, m) for m in methods])
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("table", choices=("main",))
  parser.add_argument("out", nargs="?", default="runs/results")
  parser.add_argument("--plot", default=None, help="draw the table's figure here (PNG)")
  args = parser.parse_args(argv[1:])
  text, cells, sets = main_tables(pathlib.Path(args.out))
  print(text)
  if args.plot and cells is not None:
    plot(cells, sets, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
