"""The official GLUE metrics, by scikit-learn and scipy, with unparsed answers kept explicit.

A prediction of None means the model's answer could not be parsed. The choice made here:

* classification: an unparsed prediction is mapped to `UNPARSED = -1`, a value no gold label
  takes, so it is always wrong. For accuracy that is a miss; for binary F1 (positive label 1) it
  is "not predicted positive" (a false negative when the gold is 1); Matthews correlation is the
  multi-class form over the gold labels plus the unparsed column, which reduces to the usual
  binary/K-class value when nothing is unparsed.
* regression (STS-B): Pearson and Spearman over the parsed rows only, since no number stands for
  a missing one; `unparsed_rate` (always reported) says how many rows that leaves out.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

UNPARSED = -1

Pred = int | float | None


def _as_classes(preds: Sequence[Pred]) -> np.ndarray:
  return np.asarray([UNPARSED if p is None else int(p) for p in preds], dtype=np.int64)


def accuracy(preds: Sequence[Pred], golds: Sequence[int]) -> float:
  return float(skm.accuracy_score(np.asarray(golds, dtype=np.int64), _as_classes(preds)))


def f1(preds: Sequence[Pred], golds: Sequence[int]) -> float:
  """Binary F1 of the positive label 1; unparsed counts as not predicting 1."""
  # labels=[1] with micro averaging is binary F1 of label 1, and (unlike average="binary")
  # accepts the extra unparsed class in the predictions.
  return float(skm.f1_score(np.asarray(golds, dtype=np.int64), _as_classes(preds), labels=[1],
                            average="micro", zero_division=0.0))


def macro_f1(preds: Sequence[Pred], golds: Sequence[int]) -> float:
  """F1 averaged over the gold labels (custom multi-class tasks); unparsed is never right."""
  golds_n = np.asarray(golds, dtype=np.int64)
  return float(skm.f1_score(golds_n, _as_classes(preds), labels=np.unique(golds_n),
                            average="macro", zero_division=0.0))


def matthews_correlation(preds: Sequence[Pred], golds: Sequence[int]) -> float:
  return float(skm.matthews_corrcoef(np.asarray(golds, dtype=np.int64), _as_classes(preds)))


def _parsed_pairs(preds: Sequence[Pred], golds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  keep = [i for i, p in enumerate(preds) if p is not None]
  return (np.asarray([float(preds[i]) for i in keep], dtype=np.float64),
          np.asarray([float(golds[i]) for i in keep], dtype=np.float64))


def _correlation(fn: Callable, preds: Sequence[Pred], golds: Sequence[float]) -> float:
  x, y = _parsed_pairs(preds, golds)
  # Undefined (NaN) for fewer than two parsed rows or a constant column, as scipy defines it.
  if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return math.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stats.ConstantInputWarning)
    return float(fn(x, y).statistic)


def pearson(preds: Sequence[Pred], golds: Sequence[float]) -> float:
  return _correlation(stats.pearsonr, preds, golds)


def spearman(preds: Sequence[Pred], golds: Sequence[float]) -> float:
  return _correlation(stats.spearmanr, preds, golds)


METRICS: dict[str, Callable[[Sequence[Pred], Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(metric_names: Sequence[str], preds: Sequence[Pred],
                    golds: Sequence[int | float]) -> dict[str, float]:
  """The named metrics plus `unparsed_rate` and `count`.

  `preds[i]` is a label, a number, or None (unparsed); `golds[i]` its gold label.
  """
  unknown = [m for m in metric_names if m not in METRICS]
  if unknown:
    raise ValueError(f"compute_metrics: unknown metric(s) {unknown}; known: {sorted(METRICS)}")
  if len(preds) != len(golds):
    raise ValueError(f"compute_metrics: {len(preds)} predictions but {len(golds)} gold labels")
  if not golds:
    raise ValueError("compute_metrics: no examples to score")
  results = {name: METRICS[name](preds, golds) for name in metric_names}
  results["unparsed_rate"] = sum(p is None for p in preds) / len(preds)
  results["count"] = float(len(preds))
  return results


def bootstrap_intervals(metric_names: Sequence[str], preds: Sequence[Pred],
                        golds: Sequence[int | float], *, draws: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
  """Percentile bootstrap intervals of the named metrics over the examples: `draws` resamples
  of the rows with replacement (seeded), the metric on each, the central `level` of them.

  The interval covers the sampling of the evaluation set, not the training seed's spread. A
  metric undefined on every resample (a correlation of constant predictions) gets none.
  """
  rng = np.random.default_rng(seed)
  samples_dn = rng.integers(0, len(preds), size=(draws, len(preds)))
  tail = (1 - level) / 2 * 100
  out = {}
  for name in metric_names:
    if name == "accuracy":         # vectorised: the same resamples, one pass
      correct = np.asarray([p is not None and p == g for p, g in zip(preds, golds)], float)
      values = correct[samples_dn].mean(axis=1)
    else:
      with warnings.catch_warnings():   # a resample without a class warns; its value stays
        warnings.simplefilter("ignore")
        values = np.array([METRICS[name]([preds[i] for i in rows], [golds[i] for i in rows])
                           for rows in samples_dn])
    if np.isnan(values).all():
      continue
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    out[name] = (float(lo), float(hi))
  return out


def example_mean_interval(scores_sn: np.ndarray, *, draws: int = 10_000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of a mean of per-example scores over the examples.

  `scores_sn` is [seeds, examples] (or [examples]): 0/1 correctness of several seeds' models on
  the same examples, averaged over seeds per example, or the difference of two models' scores
  example by example (a paired comparison). The resamples depend only on (examples, seed), so
  every cell of a table resamples the same examples. Like `bootstrap_intervals`, it covers the
  choice of evaluation examples, not another training seed.
  """
  per_example = np.atleast_2d(np.asarray(scores_sn, np.float64)).mean(axis=0)
  rows_dn = np.random.default_rng(seed).integers(0, len(per_example),
                                                 size=(draws, len(per_example)))
  tail = (1 - level) / 2 * 100
  lo, hi = np.percentile(per_example[rows_dn].mean(axis=1), [tail, 100 - tail])
  return float(lo), float(hi)


def seed_interval(values: Sequence[float], level: float = 0.95,
                  bounds: tuple[float, float] | None = None) -> tuple[float, float] | None:
  """Student-t interval of the mean of a few seeds' results (None for fewer than two): how far
  another draw of seeds could move the mean. `bounds`, the metric's range (an accuracy's
  (0, 1)), clips it: with two or three seeds the interval can reach past what a mean can be."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return None
  half = (stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1)
          / np.sqrt(len(values)))
  low, high = values.mean() - half, values.mean() + half
  if bounds is not None:
    low, high = max(low, bounds[0]), min(high, bounds[1])
  return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class ConfusionMatrix:
  """counts_kc[gold, predicted]: rows are gold labels, columns the labels then "unparsed"."""
  counts_kc: np.ndarray
  label_names: tuple[str, ...]

  @property
  def column_names(self) -> tuple[str, ...]:
    return self.label_names + ("unparsed",)

  def __str__(self) -> str:
    width = max(len(n) for n in self.column_names + ("gold \\ pred",))
    lines = [" ".join(n.rjust(width) for n in ("gold \\ pred",) + self.column_names)]
    for name, row in zip(self.label_names, self.counts_kc):
      lines.append(" ".join([name.rjust(width)] + [str(int(c)).rjust(width) for c in row]))
    return "\n".join(lines)


def confusion_matrix(preds: Sequence[Pred], golds: Sequence[int],
                     label_names: Sequence[str]) -> ConfusionMatrix:
  """Counts of (gold, predicted) with a last column for unparsed predictions."""
  num_labels = len(label_names)
  golds_n = np.asarray(golds, dtype=np.int64)
  if golds_n.size and (golds_n.min() < 0 or golds_n.max() >= num_labels):
    raise ValueError(f"confusion_matrix: gold labels must lie in 0..{num_labels - 1} "
                     f"({list(label_names)}), got {sorted(set(golds_n.tolist()))}")
  labels = list(range(num_labels)) + [UNPARSED]
  counts = skm.confusion_matrix(golds_n, _as_classes(preds), labels=labels)
  return ConfusionMatrix(counts_kc=counts[:num_labels], label_names=tuple(label_names))
