"""GLUE metrics against independent references: scikit-learn / scipy and NumPy formulas."""
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jax_nlu_ppo.nlu import metrics


def _random_classes(rng, n, k, unparsed_p=0.0):
  golds = rng.integers(0, k, size=n)
  preds = np.where(rng.random(n) < 0.7, golds, rng.integers(0, k, size=n))
  preds = [None if rng.random() < unparsed_p else int(p) for p in preds]
  return preds, golds.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn_when_all_parsed(seed):
  rng = np.random.default_rng(seed)
  preds, golds = _random_classes(rng, 300, 2)
  got = metrics.compute_metrics(["accuracy", "f1", "matthews_correlation"], preds, golds)
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(golds, preds), abs=1e-12)
  assert got["f1"] == pytest.approx(skm.f1_score(golds, preds, average="binary"), abs=1e-12)
  assert got["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(golds, preds),
                                                      abs=1e-12)
  assert got["unparsed_rate"] == 0.0 and got["count"] == 300


def _mcc_from_counts(c):
  """Gorodkin's K-class MCC from a confusion matrix c[gold, pred] (a NumPy reference)."""
  s, correct = c.sum(), np.trace(c)
  t, p = c.sum(axis=1), c.sum(axis=0)
  denominator = math.sqrt((s**2 - p @ p) * (s**2 - t @ t))
  return 0.0 if denominator == 0 else (correct * s - t @ p) / denominator


@pytest.mark.parametrize("seed", range(5))
def test_unparsed_counts_as_wrong(seed):
  rng = np.random.default_rng(seed)
  preds, golds = _random_classes(rng, 400, 2, unparsed_p=0.15)
  got = metrics.compute_metrics(["accuracy", "f1", "matthews_correlation"], preds, golds)
  p = np.array([-1 if x is None else x for x in preds])
  g = np.array(golds)
  assert got["accuracy"] == pytest.approx(np.mean(p == g))
  tp = np.sum((p == 1) & (g == 1))
  fp = np.sum((p == 1) & (g != 1))
  fn = np.sum((p != 1) & (g == 1))
  assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  counts = np.zeros((3, 3))  # gold 0, 1 and (never) unparsed; predicted 0, 1, unparsed
  for x, y in zip(p, g):
    counts[y, x] += 1  # x == -1 lands in the last column
  assert got["matthews_correlation"] == pytest.approx(_mcc_from_counts(counts))
  assert got["unparsed_rate"] == pytest.approx(np.mean(p == -1))
  # Counting unparsed rows as wrong scores below accuracy over the parsed rows alone.
  assert got["accuracy"] < np.mean(p[p != -1] == g[p != -1])


def test_three_class_accuracy_and_mcc():
  rng = np.random.default_rng(7)
  preds, golds = _random_classes(rng, 500, 3)
  got = metrics.compute_metrics(["accuracy", "matthews_correlation"], preds, golds)
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(golds, preds))
  assert got["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(golds, preds))


@pytest.mark.parametrize("seed", range(5))
def test_regression_matches_scipy_over_parsed_rows(seed):
  rng = np.random.default_rng(seed)
  golds = rng.uniform(0, 5, size=200)
  values = golds + rng.normal(0, 1, size=200)
  parsed = rng.random(200) > 0.1
  preds = [float(v) if ok else None for v, ok in zip(values, parsed)]
  got = metrics.compute_metrics(["pearson", "spearman"], preds, golds.tolist())
  assert got["pearson"] == pytest.approx(stats.pearsonr(values[parsed], golds[parsed])[0])
  assert got["spearman"] == pytest.approx(stats.spearmanr(values[parsed], golds[parsed])[0])
  assert got["unparsed_rate"] == pytest.approx(1 - parsed.mean())


def test_regression_degenerate_is_nan():
  assert math.isnan(metrics.pearson([None, None, 1.0], [1.0, 2.0, 3.0]))
  assert math.isnan(metrics.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))


def test_errors():
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.compute_metrics(["bleu"], [1], [1])
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.compute_metrics(["accuracy"], [1, 0], [1])
  with pytest.raises(ValueError, match="no examples"):
    metrics.compute_metrics(["accuracy"], [], [])


def test_confusion_matrix_has_unparsed_column():
  preds = [0, 1, None, 2, 2, None, 0]
  golds = [0, 1, 1, 2, 0, 2, 0]
  cm = metrics.confusion_matrix(preds, golds, ("entailment", "neutral", "contradiction"))
  expected = np.array([[2, 0, 1, 0],
                       [0, 1, 0, 1],
                       [0, 0, 1, 1]])
  np.testing.assert_array_equal(cm.counts_kc, expected)
  assert cm.column_names[-1] == "unparsed"
  assert cm.counts_kc.sum() == len(golds)
  assert "unparsed" in str(cm) and "contradiction" in str(cm)
  with pytest.raises(ValueError, match="gold labels must lie in 0..1"):
    metrics.confusion_matrix([0], [2], ("no", "yes"))


@pytest.mark.parametrize("seed", range(3))
def test_macro_f1_matches_numpy_formula(seed):
  rng = np.random.default_rng(seed)
  preds, golds = _random_classes(rng, 300, 4, unparsed_p=0.1)
  got = metrics.compute_metrics(["macro_f1"], preds, golds)
  p = np.array([-1 if x is None else x for x in preds])
  g = np.array(golds)
  per_class = []
  for c in np.unique(g):
    tp, fp, fn = np.sum((p == c) & (g == c)), np.sum((p == c) & (g != c)), np.sum((p != c) & (g == c))
    per_class.append(2 * tp / (2 * tp + fp + fn))
  assert got["macro_f1"] == pytest.approx(np.mean(per_class))


def test_bootstrap_intervals_against_independent_formulas():
  rng = np.random.default_rng(1)
  golds = rng.integers(0, 2, 872).tolist()
  preds = [g if rng.random() < 0.8 else (None if rng.random() < 0.3 else 1 - g) for g in golds]
  got = metrics.bootstrap_intervals(["accuracy", "f1"], preds, golds, draws=1000)
  # Accuracy: the normal approximation of the binomial, p +- 1.96 sqrt(p (1 - p) / n).
  p = metrics.accuracy(preds, golds)
  half = 1.96 * np.sqrt(p * (1 - p) / len(golds))
  np.testing.assert_allclose(got["accuracy"], (p - half, p + half), atol=0.004)
  # F1: scipy's own percentile bootstrap (its own resamples) of the NumPy formula 2tp / (2tp +
  # fp + fn), unparsed answers counting as not positive.
  gold_i = np.asarray(golds)
  positive_i = np.asarray([p == 1 for p in preds])

  def f1(rows, axis=-1):
    g, q = gold_i[rows] == 1, positive_i[rows]
    tp, fp, fn = (g & q).sum(axis), (~g & q).sum(axis), (g & ~q).sum(axis)
    return 2 * tp / (2 * tp + fp + fn)
  ref = stats.bootstrap((np.arange(len(golds)),), f1, n_resamples=2000, method="percentile",
                        random_state=0, vectorized=True).confidence_interval
  np.testing.assert_allclose(got["f1"], (ref.low, ref.high), atol=0.006)
  assert got["accuracy"] == metrics.bootstrap_intervals(["accuracy"], preds, golds,
                                                        draws=1000)["accuracy"]   # seeded


def test_a_metric_undefined_on_every_resample_has_no_interval():
  # Constant predictions: Pearson's r is undefined on every resample, and no NaN interval is made
  # (it would be written as NaN, which is not JSON).
  golds = [0.5, 1.0, 2.5, 4.0, 3.0, 1.5]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = metrics.bootstrap_intervals(["pearson", "spearman"], [2.0] * 6, golds, draws=50)
  assert got == {}


def test_example_mean_interval_is_the_bootstrap_of_per_example_seed_means():
  rng = np.random.default_rng(3)
  correct_sn = (rng.random((3, 200)) < 0.7).astype(float)
  lo, hi = metrics.example_mean_interval(correct_sn, draws=4000, seed=1)
  # NumPy by hand: resample examples, average the seeds' mean per example.
  per_example = correct_sn.mean(axis=0)
  rows = np.random.default_rng(1).integers(0, 200, size=(4000, 200))
  want = np.percentile(per_example[rows].mean(axis=1), [2.5, 97.5])
  np.testing.assert_allclose([lo, hi], want)
  assert lo < correct_sn.mean() < hi
  # A paired difference of identical scores has no spread; a constant shift is its own interval.
  assert metrics.example_mean_interval(correct_sn - correct_sn) == (0.0, 0.0)
  np.testing.assert_allclose(metrics.example_mean_interval(np.full(50, 0.25)), (0.25, 0.25))


def test_seed_interval_is_students_t():
  values = [0.80, 0.84, 0.86]
  lo, hi = metrics.seed_interval(values)
  # t(0.975, 2 df) = 4.3027 (tables), s = 0.030551, n = 3.
  half = 4.302653 * 0.0305505 / np.sqrt(3)
  np.testing.assert_allclose([lo, hi], [np.mean(values) - half, np.mean(values) + half],
                             rtol=1e-5)
  assert metrics.seed_interval([0.8]) is None
  # Clipped to the metric's range where the t-interval reaches past it.
  lo, hi = metrics.seed_interval([0.87, 0.96, 0.99])
  assert hi > 1.0
  assert metrics.seed_interval([0.87, 0.96, 0.99], bounds=(0.0, 1.0)) == (lo, 1.0)
  assert metrics.seed_interval([0.0, 0.3], bounds=(0.0, 1.0))[0] == 0.0
