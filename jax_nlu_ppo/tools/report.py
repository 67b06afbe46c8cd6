"""Plots and a Markdown summary of training runs, read from their run folders' metrics.jsonl:

    jax-nlu-ppo report runs/ppo_sst2 runs/sft_sst2 --output reports/sst2

writes `metrics.png` (one small panel per metric, every run that logs it overlaid, so PPO and SFT
compare on one figure) and `report.md` (per run: steps, first and last values; then the final
values side by side; an `eval/` score with the 95% bootstrap interval of its evaluation, from the
run's `eval/step_<N>.json`). With `group_seeds` (`--group-seeds`), runs whose configs differ only in
`seed` are one curve: their mean at the steps they all logged, in a band from the lowest to the
highest seed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from typing import Any, Sequence

import numpy as np
import yaml

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import storage
from jax_nlu_ppo.rl import run_loop

log = logging.getLogger(__name__)

# What the PPO step (trainer.py, ppo.py), the SFT step (sft.py) and the reward model's step
# (reward_model.py) log that tells how training went, in panel order; a run shows the ones it has.
METRICS = ("env/reward_mean", "env/accuracy", "env/unparsed_rate", "objective/kl",
           "objective/kl_coef", "objective/entropy", "loss/value", "policy/clipfrac",
           "val/clipfrac", "sft/loss", "rm/loss", "rm/accuracy", "rm/margin")
# Steps averaged for a run's "first" and "last" values: one step alone is noisy.
WINDOW = 5
PLOT_FILE, REPORT_FILE = "metrics.png", "report.md"


class ReportError(ValueError):
  """A run folder that cannot be reported (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run folder's metrics lines (by step), its config (empty without config.yaml) and its
  label in plots and tables; or, with `seeds`, a group of runs that differ only in their seed
  (its path, lines and config are the first seed's)."""
  path: storage.Path
  label: str
  lines: list[dict[str, Any]]
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  seeds: tuple[Run, ...] = ()
  # {step: {"eval/<metric>": (low, high)}}: each evaluation's 95% bootstrap interval.
  intervals: dict[int, dict[str, tuple[float, float]]] = dataclasses.field(default_factory=dict)

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the lines that hold a number for `key`; for a group, the mean over
    its seeds at the steps every seed logged."""
    if self.seeds:
      steps, values_sn = self._across_seeds(key)
      return steps, values_sn.mean(axis=0)
    points = [(line["iteration"], float(line[key])) for line in self.lines
              if isinstance(line.get(key), (int, float)) and not isinstance(line[key], bool)]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, np.int64), np.asarray(values, np.float64)

  def band(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, lowest, highest) over a group's seeds; None for a single run."""
    if not self.seeds:
      return None
    steps, values_sn = self._across_seeds(key)
    return steps, values_sn.min(axis=0), values_sn.max(axis=0)

  def _across_seeds(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    series = [run.series(key) for run in self.seeds]
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
    values_sn = np.asarray([[dict(zip(s.tolist(), v))[step] for step in steps]
                            for s, v in series], np.float64).reshape(len(series), len(steps))
    return np.asarray(steps, np.int64), values_sn

  def metrics(self) -> list[str]:
    """The step metrics it logs, then its `eval/` scores (the run's own metric names)."""
    evals = sorted({key for line in self.lines for key in line
                    if key.startswith(checkpoint_lib.EVAL_PREFIX)})
    return [key for key in (*METRICS, *evals) if self.series(key)[1].size]


def read_run(path: storage.PathLike) -> Run:
  """A run folder's metrics.jsonl (a malformed line is skipped with a warning naming it) and its
  label: the folder name, with the task and kind of run when config.yaml is there."""
  folder = storage.path(path)
  if not folder.is_dir():
    raise ReportError(f"{folder}: no such run folder")
  metrics_path = folder / run_loop.METRICS_FILE
  if not metrics_path.is_file():
    raise ReportError(f"{folder}: no {run_loop.METRICS_FILE} (is it the output_dir of train, sft "
                      "or reward-model?)")
  lines = []
  for number, text in enumerate(metrics_path.read_text().splitlines(), start=1):
    if not text.strip():
      continue
    try:
      line = json.loads(text)
      if not isinstance(line, dict) or not isinstance(line.get("iteration"), int):
        raise ValueError("not an object with an integer 'iteration'")
    except ValueError as e:
      log.warning("%s line %d: skipped, not a metrics line (%s)", metrics_path, number, e)
      continue
    lines.append(line)
  if not lines:
    raise ReportError(f"{metrics_path}: no metrics lines (has the run done a step?)")
  config = _config(folder)
  return Run(folder, _label(folder.name, config), lines, config,
             intervals=_eval_intervals(folder))


def _eval_intervals(folder: storage.Path) -> dict[int, dict[str, tuple[float, float]]]:
  """{step: {"eval/<metric>": (low, high)}} from the run's evaluation files, where they hold
  intervals (files that cannot be read are left out: the report is still useful)."""
  out = {}
  if not (folder / run_loop.EVAL_DIR).is_dir():
    return out
  for path in storage.files_under(folder / run_loop.EVAL_DIR):
    found = re.fullmatch(r"step_(\d+)\.json", path.name)
    if not found:
      continue
    try:
      bounds = json.loads(path.read_text()).get("intervals_95", {})
    except (ValueError, AttributeError):
      log.warning("%s: not an evaluation's results; its intervals are left out", path)
      continue
    out[int(found[1])] = {f"{checkpoint_lib.EVAL_PREFIX}{name}": (float(lo), float(hi))
                          for name, (lo, hi) in bounds.items()}
  return out


def _config(folder: storage.Path) -> dict[str, Any]:
  config_path = folder / run_loop.CONFIG_FILE
  if not config_path.is_file():
    return {}
  try:
    return yaml.safe_load(config_path.read_text()) or {}
  except yaml.YAMLError:
    log.warning("%s: not valid YAML; labelling the run by its folder", config_path)
    return {}


def _label(name: str, config: dict[str, Any]) -> str:
  if not config:
    return name
  kind = run_loop.run_kind(config)
  tasks = [c.get("task") for c in config.get("mixture") or []] or [
      (config.get("data") or {}).get("task")]
  return f"{name} ({kind}, {'+'.join(str(t) for t in tasks if t)})"


# Config keys that do not make two runs different experiments.
NOT_SETTINGS = ("seed", "output_dir")


def group_seeds(runs: Sequence[Run]) -> list[Run]:
  """Runs whose configs are the same but for the seed (and the folder) as one group each, in
  the order of their first run; a run alone, or without config.yaml, stays as it is."""
  groups: dict[str, list[Run]] = {}
  for i, run in enumerate(runs):
    settings = {k: v for k, v in run.config.items() if k not in NOT_SETTINGS}
    key = json.dumps(settings, sort_keys=True, default=str) if run.config else f"run {i}"
    groups.setdefault(key, []).append(run)
  out = []
  for members in groups.values():
    if len(members) == 1:
      out += members
      continue
    first = members[0]
    name = re.sub(r"[_-]?seed\d+", "", first.path.name) or first.path.name
    seeds = ", ".join(str(run.config.get("seed")) for run in members)
    out.append(Run(first.path, f"{_label(name, first.config)}, seeds {seeds}", first.lines,
                   first.config, tuple(members)))
  return out


def first_last(run: Run, key: str, window: int = WINDOW) -> tuple[float, float]:
  """Means of `key` over the run's first and last `window` logged steps; for an `eval/` score,
  its first and last evaluations (each already an average over the eval set)."""
  values = run.series(key)[1]
  if key.startswith(checkpoint_lib.EVAL_PREFIX):
    return float(values[0]), float(values[-1])
  return float(values[:window].mean()), float(values[-window:].mean())


def plot(runs: Sequence[Run], path: storage.Path) -> None:
  """One panel per metric some run logs, each run that logs it a line in it."""
  import matplotlib
  matplotlib.use("Agg")      # files only: no display on a training host
  from matplotlib import pyplot as plt
  from matplotlib import ticker

  keys = _keys(runs)
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for i, run in enumerate(runs):
      steps, values = run.series(key)
      if values.size:
        # Colour by run index, so a run keeps its colour in every panel.
        # Markers keep short runs (a single step is no line) visible.
        ax.plot(steps, values, color=f"C{i}", label=run.label, linewidth=1.2,
                marker="o" if len(steps) <= 30 else None, markersize=3)
        band = run.band(key)
        if band is not None:
          ax.fill_between(*band, color=f"C{i}", alpha=0.2, linewidth=0)
        bounds = [(step, value, run.intervals[int(step)][key])
                  for step, value in zip(steps, values)
                  if key in run.intervals.get(int(step), {})]
        if bounds:
          xs, ys, bs = zip(*bounds)
          ax.errorbar(xs, ys, yerr=[[y - b[0] for y, b in zip(ys, bs)],
                                    [b[1] - y for y, b in zip(ys, bs)]],
                      fmt="none", ecolor=f"C{i}", capsize=2, linewidth=0.8)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes.flat[len(keys):]:
    ax.set_visible(False)
  fig.tight_layout()
  with path.open("wb") as f:     # a file object: matplotlib cannot name a gs:// path
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def _keys(runs: Sequence[Run]) -> list[str]:
  """Every metric some run logs, in panel order."""
  keys: list[str] = []
  for run in runs:
    keys += [key for key in run.metrics() if key not in keys]
  ordered = [key for key in METRICS if key in keys]
  return ordered + [key for key in keys if key not in ordered]


def markdown(runs: Sequence[Run], image: str) -> str:
  """report.md: the figure, each run's first/last values, then every run's last values."""
  out = ["# Training report", "", f"![metrics]({image})", ""]
  for run in runs:
    steps = [line["iteration"] for line in run.lines]
    where = (f"`{run.path}`" if not run.seeds else
             f"the mean of {', '.join(f'`{r.path}`' for r in run.seeds)}")
    out += [f"## {run.label}", "", f"{where}: {len(run.lines)} step{'s' if len(run.lines) != 1 else ''} "
            f"(step {min(steps)} to {max(steps)}); first and last are means over "
            f"{WINDOW} steps (eval/ scores: the first and last evaluation).", "", "| metric | first | last |", "|---|---|---|"]
    for key in run.metrics():
      first, last = first_last(run, key)
      out.append(f"| {key} | {first:.4g}{_interval(run, key, 0)} | "
                 f"{last:.4g}{_interval(run, key, -1)} |")
    out.append("")
  out += ["## Final values", "", f"Mean of each run's last {WINDOW} steps; eval/ scores: its "
          "last evaluation [95% bootstrap interval over its examples]. A group of seeds: the "
          "mean over its seeds (lowest..highest).", "",
          "| metric | " + " | ".join(run.label for run in runs) + " |",
          "|---|" + "---|" * len(runs)]
  for key in _keys(runs):
    cells = [_final(run, key) if key in run.metrics() else "" for run in runs]
    if any(cells):
      out.append(f"| {key} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def _interval(run: Run, key: str, which: int) -> str:
  """" [low, high]" of the first (0) or last (-1) evaluation of an eval/ score, where known."""
  steps = run.series(key)[0]
  bounds = run.intervals.get(int(steps[which]), {}).get(key) if steps.size else None
  return " [{:.3f}, {:.3f}]".format(*bounds) if bounds else ""


def _final(run: Run, key: str) -> str:
  text = f"{first_last(run, key)[1]:.4g}{_interval(run, key, -1)}"
  if run.seeds:
    finals = [first_last(seed, key)[1] for seed in run.seeds if key in seed.metrics()]
    text += f" ({min(finals):.4g}..{max(finals):.4g})"
  return text


def write_report(run_paths: Sequence[storage.PathLike], output: storage.PathLike,
                 group_by_seed: bool = False) -> storage.Path:
  """Reads every run (all are checked before anything is written), writes metrics.png and
  report.md into `output` and returns report.md's path. `group_by_seed`: see `group_seeds`."""
  runs = [read_run(path) for path in run_paths]
  if group_by_seed:
    runs = group_seeds(runs)
  if not any(run.metrics() for run in runs):
    raise ReportError(f"{', '.join(str(run.path) for run in runs)}: none of the metrics "
                      f"{', '.join(METRICS)} is logged")
  labels = [run.label for run in runs]
  if len(set(labels)) < len(labels):     # same folder names under different parents
    runs = [dataclasses.replace(run, label=f"{run.path} {run.label[len(run.path.name):]}".strip())
            for run in runs]
  out_dir = storage.path(output)
  storage.mkdir(out_dir)
  plot(runs, out_dir / PLOT_FILE)
  report = out_dir / REPORT_FILE
  storage.write_text(report, markdown(runs, PLOT_FILE))
  return report
