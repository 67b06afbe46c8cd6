"""docs/results.md's tables for two SST-2 questions, read from finished run folders:

    python scripts/sst2_tables.py label-noise [OUT]          (default: runs/label_noise)
    python scripts/sst2_tables.py reward-model [OUT] [GOLD]  (default: runs/reward_model,
                                                               runs/label_noise/noise_0)

Each run is scored on the whole SST-2 dev set (RUN/dev_full.json, `scripts/full_dev_eval.sh`).
A cell is the mean over seeds, the seeds' min..max, and a 95% interval from a bootstrap over the
872 dev sentences (the same resampled sentences for every seed and cell, so differences are
paired). The interval says how much the choice of dev sentences moves the number, not how much
another seed would: that is what min..max shows, from only the seeds run.
"""
import json
import pathlib
import sys

import numpy as np

from jax_nlu_ppo.nlu import metrics

def _correct(run: pathlib.Path) -> tuple[dict[int, bool], float] | None:
  """({dev idx: answered correctly}, unparsed rate) of a finished run, or None."""
  path = run / "dev_full.json"
  if not (run / "done").exists() or not path.exists():
    return None
  result = json.loads(path.read_text())
  return ({p["idx"]: p["prediction"] == p["label"] for p in result["predictions"]},
          result["unparsed_rate"])


class Sentences:
  """The dev sentences every cell of a table is scored on, in one order."""

  def __init__(self, idx: list[int]):
    self.idx = sorted(idx)

  def matrix(self, runs: list[dict[int, bool]]) -> np.ndarray:
    """[seeds, sentences] of 0/1; every run must have scored every sentence."""
    for run in runs:
      if sorted(run) != self.idx:
        raise ValueError("the runs were not scored on the same dev sentences")
    return np.asarray([[run[i] for i in self.idx] for run in runs], np.float64)

  def interval(self, correct: np.ndarray) -> tuple[float, float]:
    """95% interval of the seeds' mean accuracy (or of a paired difference: `correct` may hold
    differences of two cells' 0/1 rows), from the same resampled sentences for every cell."""
    return metrics.example_mean_interval(correct)


def cell(sentences: Sentences, runs: list[dict[int, bool]]) -> str:
  if not runs:
    return "-"
  m = sentences.matrix(runs)
  accs = m.mean(axis=1)
  low, high = sentences.interval(m)
  spread = f" ({accs.min():.3f}..{accs.max():.3f})" if len(runs) > 1 else ""
  return f"{accs.mean():.3f}{spread} [{low:.3f}, {high:.3f}]"


def paired(sentences: Sentences, a: list[dict[int, bool]], b: list[dict[int, bool]]) -> np.ndarray:
  """[seeds, sentences] of a's 0/1 minus b's, seeds paired by order (as many as both have)."""
  n = min(len(a), len(b))
  return sentences.matrix(a[:n]) - sentences.matrix(b[:n])


def difference_text(sentences: Sentences, d: np.ndarray | None) -> str:
  """The mean of a `paired` difference [95% paired interval]."""
  if d is None or not len(d):
    return "-"
  low, high = sentences.interval(d)
  return f"{d.mean():+.3f} [{low:+.3f}, {high:+.3f}]"


def finished(folder: pathlib.Path, pattern: str) -> tuple[list[dict[int, bool]], list[float]]:
  found = [r for r in (_correct(run) for run in sorted(folder.glob(pattern))) if r]
  return [c for c, _ in found], [u for _, u in found]


def _unparsed(rates: list[float]) -> str:
  return f"{100 * max(rates):.0f}%" if rates else "-"


def label_noise(out: pathlib.Path) -> str:
  cells = {}
  for noise_dir in sorted(out.glob("noise_*"), key=lambda p: float(p.name[6:])):
    for method in ("sft", "ppo"):
      cells[noise_dir.name[6:], method] = finished(noise_dir, f"{method}_seed*")
  found = [c for runs, _ in cells.values() for c in runs]
  if not found:
    return "no finished runs with dev_full.json"
  sentences = Sentences(list(found[0]))
  noises = sorted({n for n, _ in cells}, key=float)
  lines = ["| label noise | SFT | PPO | PPO - SFT | SFT change from noise 0 | PPO change from "
           "noise 0 | PPO change - SFT change | seeds | unparsed (max) SFT / PPO |",
           "|---|---|---|---|---|---|---|---|---|"]
  for noise in noises:
    sft, sft_unparsed = cells.get((noise, "sft"), ([], []))
    ppo, ppo_unparsed = cells.get((noise, "ppo"), ([], []))
    clean_sft, clean_ppo = cells[noises[0], "sft"][0], cells[noises[0], "ppo"][0]
    change = ["-", "-", "-"]
    if noise != noises[0] and all((sft, ppo, clean_sft, clean_ppo)):
      d_sft, d_ppo = paired(sentences, sft, clean_sft), paired(sentences, ppo, clean_ppo)
      n = min(len(d_sft), len(d_ppo))
      change = [difference_text(sentences, d) for d in (d_sft, d_ppo, d_ppo[:n] - d_sft[:n])]
    ppo_sft = paired(sentences, ppo, sft) if sft and ppo else None
    lines.append(f"| {noise} | {cell(sentences, sft)} | {cell(sentences, ppo)} | "
                 f"{difference_text(sentences, ppo_sft)} | {' | '.join(change)} | "
                 f"{len(sft)} / {len(ppo)} | {_unparsed(sft_unparsed)} / "
                 f"{_unparsed(ppo_unparsed)} |")
  return "\n".join(lines)


def reward_model(out: pathlib.Path, gold: pathlib.Path) -> str:
  models = [json.loads(p.read_text()) for p in sorted(out.glob("rm_seed*/eval/step_*.json"))
            if (p.parent.parent / "done").exists()]
  rows = [("gold label", "480, every prompt's", finished(gold, "ppo_seed*")),
          ("reward model", "480, the reward model's (PPO's prompts: none)",
           finished(out, "ppo_rm_seed*")),
          ("reward model + answer format", "the same", finished(out, "ppo_rm_format_seed*"))]
  found = [c for _, _, (runs, _) in rows for c in runs]
  if not found:
    return "no finished runs with dev_full.json"
  sentences = Sentences(list(found[0]))
  lines = []
  if models:
    sentences_rm = Sentences([p["idx"] for p in models[0]["predictions"]])
    rm_runs = [{p["idx"]: p["prediction"] == p["label"] for p in m["predictions"]}
               for m in models]
    aucs = [m["auc"] for m in models]
    lines += [f"Reward models ({len(models)} seeds) as classifiers on the dev set: accuracy "
              f"{cell(sentences_rm, rm_runs)}, AUC {np.mean(aucs):.3f} "
              f"({min(aucs):.3f}..{max(aucs):.3f})", ""]
  gold_runs = rows[0][2][0]
  lines += ["| PPO reward | labels used | PPO dev accuracy (872) | minus gold-label PPO | "
            "unparsed (max) | seeds |", "|---|---|---|---|---|---|"]
  for name, labels, (runs, unparsed) in rows:
    versus = ("" if runs is gold_runs or not runs or not gold_runs else
              difference_text(sentences, paired(sentences, runs, gold_runs)))
    lines.append(f"| {name} | {labels} | {cell(sentences, runs)} | {versus} | "
                 f"{_unparsed(unparsed)} | {len(runs)} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in ("label-noise", "reward-model"):
    print(__doc__)
    return 2
  if argv[1] == "label-noise":
    print(label_noise(pathlib.Path(argv[2] if len(argv) > 2 else "runs/label_noise")))
  else:
    print(reward_model(pathlib.Path(argv[2] if len(argv) > 2 else "runs/reward_model"),
                       pathlib.Path(argv[3] if len(argv) > 3 else "runs/label_noise/noise_0")))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
