"""docs/results.md's tables over seeds, read from the results files `jax-nlu-ppo eval` writes
for several models and from the run folders (scripts/results.sh lays them out):

    python scripts/seed_tables.py TABLE [OUT] [--plot PNG]    (default OUT: runs/results)

TABLE is one of:
  main       OUT/main/eval_dev.json (the SST-2 dev set) and eval_ood.json (out-of-domain sets):
             the main table and the transfer table.
  ablations  OUT/ablations: dev accuracy, dev perplexity against the base's, final KL and
             entropy (the mean of the last 5 iterations' objective/kl and objective/entropy).
  budget     OUT/budget: the runs' own dev evaluations (eval/step_<N>.json) against training
             examples seen, each against the same method at 480, PPO against SFT and SFT then
             PPO against PPO.
  tasks      OUT/tasks: each task's score against the best constant answer's, and how often
             the most common answer is given.
  multitask  OUT/multitask: each task's score against the best constant answer's, how often the
             most common answer is given, and whitening per task against over the batch.

A model is a method and a seed: a run folder `<method>_seed<S>`, or the base model (zero-shot;
k-shot with shot seed S). A cell is the mean over seeds, its 95% Student-t interval over seeds
(how far other seeds could move it; none for one seed; an accuracy's clipped to [0, 1]) and the
seeds' min..max. A difference between two methods is paired over the examples (each example's
score averaged over each method's seeds, then differenced), with a 95% bootstrap interval over
the examples: it says how much the choice of examples moves the difference, not how much other
seeds would.
"""
import argparse
import json
import pathlib
import re
import sys

import numpy as np
import yaml

from jax_nlu_ppo.nlu import metrics

METHODS = {"zero-shot": "zero-shot", "4-shot": "4-shot", "sft": "SFT", "ppo": "PPO",
           "grpo": "GRPO", "sft_ppo": "SFT then PPO"}
SET_NAMES = {"sst2 validation": "SST-2 dev",
             "sst2 financial_phrasebank_allagree.jsonl": "Financial PhraseBank",
             "sst2 tweeteval_sentiment_test.jsonl": "TweetEval"}
WHITENING = {"multitask": "advantages whitened over the batch",
             "multitask_per_task": "whitened per task"}


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
      scored = sorted(p["idx"] for p in e["predictions"])
      if self.order.setdefault(e["set"], scored) != scored:
        raise ValueError(f"{e['model']} on {e['set']}: scored other examples than the rest")
      self.correct.setdefault((method, e["set"]), {})[seed] = _correct(e)
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
    interval = metrics.seed_interval(accs, bounds=(0.0, 1.0))
    if interval:
      text += " [{:.3f}, {:.3f}] ({:.3f}..{:.3f})".format(*interval, accs.min(), accs.max())
    return text + f" n={len(accs)}"

  def sentence_interval(self, method: str, set_name: str) -> str:
    """95% bootstrap interval of the seeds' mean over the examples."""
    m = self.seeds(method, set_name)
    return "-" if m is None else "[{:.3f}, {:.3f}]".format(*metrics.example_mean_interval(m))

  def difference(self, a: str, b: str, set_name: str) -> str:
    ma, mb = self.seeds(a, set_name), self.seeds(b, set_name)
    return "-" if ma is None or mb is None else paired_difference(ma, mb)

  def methods(self) -> list[str]:
    found = {m for m, _ in self.correct}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def paired_difference(a_se: np.ndarray, b_se: np.ndarray) -> str:
  """Mean difference of two [seeds, examples] 0/1 arrays over the same examples: each example's
  seed mean differenced, with its 95% bootstrap interval over the examples."""
  d = a_se.mean(axis=0) - b_se.mean(axis=0)
  return "{:+.3f} [{:+.3f}, {:+.3f}]".format(d.mean(), *metrics.example_mean_interval(d))


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
           "over seeds] (min..max) n=seeds, and the 95% bootstrap interval of the mean over the "
           "sentences; differences paired over the sentences [95% bootstrap interval]", "",
           "| method | SST-2 dev | over the sentences | minus SFT | minus PPO | minus zero-shot "
           "| unparsed (max) |", "|---|---|---|---|---|---|---|"]
  for method in cells.methods():
    unparsed = cells.unparsed.get((method, dev))
    versus = [cells.difference(method, other, dev) if method != other else "-"
              for other in ("sft", "ppo", "zero-shot")]
    lines.append(f"| {METHODS.get(method, method)} | {cells.cell(method, dev)} | "
                 f"{cells.sentence_interval(method, dev)} | {' | '.join(versus)} | "
                 f"{f'{100 * max(unparsed):.0f}%' if unparsed else '-'} |")
  constants = {e["set"]: _constant(e) for e in entries}
  lines += ["", "The most common label given to every example scores " + ", ".join(
      f"{constants[s]:.3f} on {SET_NAMES.get(s, s)}" for s in sets) + "."]
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


FINAL_STEPS = 5
ABLATIONS = {"ppo": "KL 0.05, clip 0.2 (main)", "kl0": "KL 0", "kl0.2": "KL 0.2",
             "kl_adaptive": "KL adaptive (0.2, target 6)", "clip0.1": "clip 0.1",
             "clip0.4": "clip 0.4"}


def _lines(run: pathlib.Path) -> list[dict]:
  path = run / "metrics.jsonl"
  return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _final(run: pathlib.Path, key: str) -> float | None:
  values = [line[key] for line in _lines(run) if key in line]
  return float(np.mean(values[-FINAL_STEPS:])) if values else None


def _spread(values: list[float], digits: int = 3) -> str:
  if not values:
    return "-"
  text = f"{np.mean(values):.{digits}f}"
  return text + (f" ({min(values):.{digits}f}..{max(values):.{digits}f})" if len(values) > 1
                 else "")


def _perplexities(out: pathlib.Path, name: str) -> dict[int, float]:
  """{seed: dev perplexity of the SST-2 sentences} of an ablation setting's runs (the base's
  under the name "base", seed 0)."""
  stem = {"ppo": "main_ppo_seed*", "base": "base"}.get(name, f"{name}_seed*")
  return {int(p.stem.partition("_seed")[2] or 0): json.loads(p.read_text())["perplexity"]
          for p in sorted((out / "ablations").glob(f"perplexity_{stem}.json"))}


def ablations_table(out: pathlib.Path) -> str:
  entries = _read(out / "ablations" / "eval_dev.json")
  if not entries:
    return f"no evaluations in {out / 'ablations'}"
  cells = Cells(entries)
  dev = "sst2 validation"
  base = _perplexities(out, "base").get(0)
  base_text = f"{base:.2f}" if base else "not measured"
  lines = [f"SST-2 dev accuracy ({len(cells.order[dev])} sentences): mean [95% interval over "
           "seeds] (min..max) n=seeds; the difference from the main setting paired over the "
           "sentences [95% bootstrap interval]; dev perplexity of the SST-2 sentences, mean "
           f"(min..max) over seeds (base {base_text}); the final KL to the reference per answer "
           f"(nats) and entropy per answer token, means of the last {FINAL_STEPS} iterations",
           "", "| setting | accuracy | minus main | perplexity (change) | final KL | "
           "final entropy |", "|---|---|---|---|---|---|"]
  for name in [n for n in ABLATIONS if (n, dev) in cells.correct]:
    runs = {e["model"] for e in entries if method_and_seed(e)[0] == name}
    ppl = list(_perplexities(out, name).values())
    change = f" ({100 * (np.mean(ppl) / base - 1):+.1f}%)" if ppl and base else ""
    kl = [v for v in (_final(pathlib.Path(r), "objective/kl") for r in sorted(runs)) if v is not None]
    ent = [v for v in (_final(pathlib.Path(r), "objective/entropy") for r in sorted(runs))
           if v is not None]
    versus = cells.difference(name, "ppo", dev) if name != "ppo" else "-"
    lines.append(f"| {ABLATIONS[name]} | {cells.cell(name, dev)} | {versus} | "
                 f"{_spread(ppl, 2)}{change} | {_spread(kl, 2)} | {_spread(ent, 2)} |")
  return "\n".join(lines)


MAIN_EXAMPLES = 480   # the main table's training budget, the budget curve's reference point


def budget_cells(out: pathlib.Path) -> dict[int, Cells]:
  """{training examples: the runs' own dev evaluations after that many}, from each run's
  `eval/step_<N>.json` (N steps of its config's examples a step)."""
  entries: dict[int, list[dict]] = {}
  for run in sorted((out / "budget").glob("*_seed*")):
    config = yaml.safe_load((run / "config.yaml").read_text()) if (
        run / "config.yaml").exists() else {}
    # Training examples a step reads: PPO's prompts (rollout.batch_size), SFT's batch_size.
    per_step = (config.get("rollout") or {}).get("batch_size") or config.get("batch_size")
    # A run started from an SFT adapter (SFT then PPO) reads from row data.offset on, after the
    # rows its SFT part read: those count too.
    before = (config.get("data") or {}).get("offset", 0) if (
        config.get("model") or {}).get("adapter") else 0
    for path in sorted((run / "eval").glob("step_*.json")) if per_step else []:
      result = json.loads(path.read_text())
      examples = before + int(path.stem.removeprefix("step_")) * per_step
      entries.setdefault(examples, []).append({"model": str(run), "set": result["task"], **result})
  return {n: Cells(found) for n, found in sorted(entries.items())}


def budget_table(out: pathlib.Path) -> str:
  points = budget_cells(out)
  if not points:
    return f"no evaluations in {out / 'budget'}"
  set_name = next(iter(next(iter(points.values())).order))
  methods = [m for m in METHODS if any((m, set_name) in c.correct for c in points.values())]
  reference = points.get(MAIN_EXAMPLES)
  header = ["examples"] + [f"{METHODS[m]}{part}" for m in methods for part in (
      "", " over the sentences", f" minus at {MAIN_EXAMPLES}")]
  pairs = [(a, b) for a, b in (("ppo", "sft"), ("sft_ppo", "ppo")) if {a, b} <= set(methods)]
  header += [f"{METHODS[a]} minus {METHODS[b]}" for a, b in pairs]
  lines = [f"Dev accuracy ({set_name}) against training examples: mean [95% interval over seeds] "
           "(min..max) n=seeds, the 95% bootstrap interval over the sentences, and differences "
           "paired over the sentences [95% bootstrap interval]", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for n, cells in points.items():
    row = [str(n)]
    for m in methods:
      now = cells.seeds(m, set_name)
      then = reference.seeds(m, set_name) if reference is not None and n != MAIN_EXAMPLES else None
      row += [cells.cell(m, set_name), cells.sentence_interval(m, set_name),
              "-" if now is None or then is None else paired_difference(now, then)]
    row += [cells.difference(a, b, set_name) for a, b in pairs]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _constant(entry: dict) -> float:
  """The score of the most common gold label given to every example (accuracy)."""
  return _constant_correct(entry).mean()


def _constant_correct(entry: dict) -> np.ndarray:
  """Per example in idx order, 0/1: is the gold label the most common one (the best constant
  answer's correctness; ties go to the smaller label)."""
  predictions = sorted(entry["predictions"], key=lambda p: p["idx"])
  golds = [p["label"] for p in predictions]
  best = max(sorted(set(golds), key=str), key=golds.count)
  return np.array([float(g == best) for g in golds])


def _top_answer(entry: dict) -> str:
  """The most common answer, by its label name where the results file has them, and its share."""
  answers = [p["prediction"] for p in entry["predictions"]]
  top = max(sorted(set(answers), key=str), key=answers.count)
  names = entry.get("confusion_matrix", {}).get("labels")
  name = "unparsed" if top is None else names[top] if names and isinstance(top, int) else top
  return f"{name} ({answers.count(top) / len(answers):.0%})"


def _task_entries(out: pathlib.Path) -> list[dict]:
  """The tasks table's evaluations grouped by set, each (model, set) once: the base model is
  scored on the out-of-domain sets once per NLI task, with the same answers."""
  entries, seen = [], set()
  for e in _read(out / "tasks" / "eval_dev.json") + _read(out / "tasks" / "eval_ood.json"):
    if (e["model"], e["set"]) not in seen:
      seen.add((e["model"], e["set"]))
      entries.append(e)
  return _by_set(entries)


def _by_set(entries: list[dict]) -> list[dict]:
  """The entries grouped by set, sets in the order they first appear."""
  sets = list(dict.fromkeys(e["set"] for e in entries))
  return sorted(entries, key=lambda e: sets.index(e["set"]))


def _against_constant(entries: list[dict]) -> list[str]:
  """A row per (set, model): its accuracy, the best constant answer's and their difference
  paired over the examples, its most common answer and share, its unparsed rate."""
  lines = ["Accuracy [95% bootstrap interval over the examples]; its difference from the best "
           "constant answer's, paired over the examples [95% bootstrap interval]; the most "
           "common answer and its share", "",
           "| set | model | accuracy | best constant | minus best constant | most common answer "
           "| unparsed |", "|---|---|---|---|---|---|---|"]
  for e in entries:
    correct, constant = _correct(e), _constant_correct(e)
    shown = "{:.3f} [{:.3f}, {:.3f}]".format(correct.mean(),
                                             *metrics.example_mean_interval(correct))
    lines.append(f"| {e['set']} ({len(correct)}) | {pathlib.PurePath(e['model']).name} | "
                 f"{shown} | {constant.mean():.3f} | "
                 f"{paired_difference(correct[None], constant[None])} | "
                 f"{_top_answer(e)} | {e['unparsed_rate']:.3f} |")
  return lines


def tasks_table(out: pathlib.Path) -> str:
  entries = _task_entries(out)
  if not entries:
    return f"no evaluations in {out / 'tasks'}"
  lines = _against_constant(entries)
  cells = Cells(entries)
  pairs = [(s, m) for m, s in cells.correct
           if m.endswith("_ppo") and (m[:-4] + "_sft", s) in cells.correct]
  if pairs:
    lines += ["", "PPO minus SFT, paired over the examples [95% bootstrap interval]: " + "; ".join(
        f"{m[:-4]} on {s}: {cells.difference(m, m[:-4] + '_sft', s)}" for s, m in pairs) + "."]
  return "\n".join(lines)


def _correct(entry: dict) -> np.ndarray:
  """Per example in idx order, 0/1: is the model's answer the gold label."""
  return np.array([float(p["prediction"] == p["label"])
                   for p in sorted(entry["predictions"], key=lambda p: p["idx"])])


def plot_tasks(out: pathlib.Path, path: str) -> None:
  """The tasks table's figure: a colour per method, the training task written on the bar."""
  def name(e: dict) -> tuple[str, str]:
    task, _, method = method_and_seed(e)[0].rpartition("_")
    return METHODS.get(method, method), task
  _plot_against_constant(_task_entries(out), name, path)


def _plot_against_constant(entries: list[dict], name, path: str) -> None:
  """Accuracy per set and model with its bootstrap interval over the examples, a colour per
  legend name and text on the bar (`name(entry)` gives both); the best constant answer's as a
  dashed line over each set's bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sets = list(dict.fromkeys(e["set"] for e in entries))
  colours = {}
  fig, ax = plt.subplots(figsize=(1.8 * len(sets) + 2, 3.8))
  for i, s in enumerate(sets):
    on_set = [e for e in entries if e["set"] == s]
    width = 0.8 / len(on_set)
    for j, e in enumerate(on_set):
      legend, text = name(e)
      correct = _correct(e)
      low, high = metrics.example_mean_interval(correct)
      x = i + (j - (len(on_set) - 1) / 2) * width
      first = legend not in colours
      colours.setdefault(legend, f"C{len(colours)}")
      ax.bar(x, correct.mean(), width, color=colours[legend], label=legend if first else None,
             yerr=[[correct.mean() - low], [high - correct.mean()]], capsize=2)
      if text:
        ax.text(x, 0.02, text, rotation=90, ha="center", va="bottom", fontsize=7, color="white")
    ax.hlines(_constant(on_set[0]), i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
              label="best constant answer" if i == 0 else None)
  ax.set_xticks(range(len(sets)), [s.replace(".jsonl", "") for s in sets], fontsize=7)
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.12)
  ax.legend(fontsize=7, loc="upper left", ncol=4)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def multitask_table(out: pathlib.Path) -> str:
  entries = _by_set(_read(out / "multitask" / "eval_dev.json"))
  if not entries:
    return f"no evaluations in {out / 'multitask'}"
  lines = _against_constant(entries)
  cells = Cells(entries)
  sets = [s for s in cells.order if ("multitask", s) in cells.correct
          and ("multitask_per_task", s) in cells.correct]
  if sets:
    lines += ["", "Whitened per task minus over the batch, paired over the examples [95% "
              "bootstrap interval]: " + "; ".join(
                  f"{s}: {cells.difference('multitask_per_task', 'multitask', s)}"
                  for s in sets) + "."]
  return "\n".join(lines)


def plot_multitask(out: pathlib.Path, path: str) -> None:
  """The multi-task table's figure: a colour per whitening."""
  def name(e: dict) -> tuple[str, str]:
    method = method_and_seed(e)[0]
    return WHITENING.get(method, method), ""
  _plot_against_constant(_by_set(_read(out / "multitask" / "eval_dev.json")), name, path)


def plot_budget(points: dict[int, Cells], path: str) -> None:
  """Dev accuracy against training examples: the seeds' mean, their min..max as a band, and
  the bootstrap interval over the sentences as error bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  set_name = next(iter(next(iter(points.values())).order))
  for method in [m for m in METHODS if any((m, set_name) in c.correct for c in points.values())]:
    curve = {n: c.seeds(method, set_name) for n, c in points.items()
             if c.seeds(method, set_name) is not None}
    xs = sorted(curve)
    accs = [curve[n].mean(axis=1) for n in xs]
    means = np.array([a.mean() for a in accs])
    bars = np.array([metrics.example_mean_interval(curve[n]) for n in xs]).T
    line = ax.errorbar(xs, means, yerr=[means - bars[0], bars[1] - means], marker="o", ms=3,
                       capsize=2, lw=1.2, label=METHODS[method])
    if any(len(a) > 1 for a in accs):
      ax.fill_between(xs, [a.min() for a in accs], [a.max() for a in accs], alpha=0.2,
                      color=line[0].get_color())
  ax.axhline(0.88, color="gray", ls=":", lw=1, label="0.88")
  ax.set_xlabel("training examples")
  ax.set_ylabel("SST-2 dev accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_ablations(out: pathlib.Path, path: str) -> None:
  """Each ablation run's dev accuracy against its dev perplexity's change from the base model:
  the task gained against the language modelling given up, a marker per seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cells = Cells(_read(out / "ablations" / "eval_dev.json"))
  dev, base = "sst2 validation", _perplexities(out, "base")[0]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for marker, name in zip("osD^v<", [n for n in ABLATIONS if (n, dev) in cells.correct]):
    ppl = _perplexities(out, name)
    seeds = [s for s in sorted(cells.correct[name, dev]) if s in ppl]
    ax.plot([100 * (ppl[s] / base - 1) for s in seeds],
            [cells.correct[name, dev][s].mean() for s in seeds], marker, ls="none",
            label=ABLATIONS[name])
  ax.axvline(0, color="gray", ls=":", lw=1, label="base perplexity")
  ax.set_xlabel("dev perplexity change from the base (%)")
  ax.set_ylabel("SST-2 dev accuracy")
  ax.legend(fontsize=7, loc="best")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


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
  ax.set_ylim(0, 1.12)
  ax.legend(fontsize=8, loc="upper left", ncol=len(sets))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("table", choices=("main", "ablations", "budget", "tasks", "multitask"))
  parser.add_argument("out", nargs="?", default="runs/results")
  parser.add_argument("--plot", default=None, help="draw the table's figure here (PNG; every "
                      "table)")
  args = parser.parse_args(argv[1:])
  out = pathlib.Path(args.out)
  if args.table == "main":
    text, cells, sets = main_tables(out)
    if args.plot and cells is not None:
      plot(cells, sets, args.plot)
  else:
    text = {"ablations": ablations_table, "budget": budget_table, "tasks": tasks_table,
            "multitask": multitask_table}[args.table](out)
    if args.plot and args.table == "budget" and (points := budget_cells(out)):
      plot_budget(points, args.plot)
    if args.plot and args.table == "ablations" and _perplexities(out, "base"):
      plot_ablations(out, args.plot)
    if args.plot and args.table == "tasks" and _task_entries(out):
      plot_tasks(out, args.plot)
    if args.plot and args.table == "multitask" and _read(out / "multitask" / "eval_dev.json"):
      plot_multitask(out, args.plot)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
