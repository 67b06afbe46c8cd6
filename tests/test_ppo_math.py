"""PPO math against independent NumPy references: plain loops over rows and time, in float64.

Inputs are random float32 arrays with random right-padded masks. The functions are called through
`jax.jit` (which is how the train step uses them), with implicit rank promotion made an error.
"""
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_nlu_ppo.rl import ppo_math as pm

RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(1, 1), (3, 7), (8, 16), (5, 33)]


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def jit(fn, *static):
  return jax.jit(fn, static_argnames=static)


def random_batch(seed, shape, min_len=1):
  """Float32 normals and a right-padded bool mask whose row lengths are in [min_len, T]."""
  rng = np.random.default_rng(seed)
  b, t = shape
  lengths = rng.integers(min_len, t + 1, size=b)
  mask = np.arange(t)[None, :] < lengths[:, None]
  return rng, mask, lengths


def normal(rng, shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


def close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------------------------


def valid_values(x, mask):
  return [float(x[i, t]) for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]


def ref_mean(x, mask):
  vals = valid_values(x, mask)
  return math.fsum(vals) / len(vals)


def ref_var(x, mask, unbiased):
  vals = valid_values(x, mask)
  return statistics.variance(vals) if unbiased else statistics.pvariance(vals)


def ref_gae(rewards, values, lengths, gamma, lam):
  """A_t = sum_l (gamma lam)^l delta_{t+l}, summed directly (no recursion), V past the end = 0."""
  adv = np.zeros(rewards.shape)
  for i, n in enumerate(lengths):
    deltas = []
    for t in range(n):
      next_v = float(values[i, t + 1]) if t + 1 < n else 0.0
      deltas.append(float(rewards[i, t]) + gamma * next_v - float(values[i, t]))
    for t in range(n):
      adv[i, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
  rets = adv + np.where(np.arange(rewards.shape[1])[None, :] < np.asarray(lengths)[:, None],
                        values, 0.0)
  return adv, rets


def ref_kl(lp, lp_ref, estimator):
  d = float(lp) - float(lp_ref)
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * d * d
  return math.exp(-d) - 1.0 + d


def ref_policy_loss(lp, old, adv, mask, eps):
  losses, clipped, kl2, kl3, ratios = [], [], [], [], []
  for i, t in zip(*np.nonzero(mask)):
    log_r = float(lp[i, t]) - float(old[i, t])
    r = math.exp(log_r)
    a = float(adv[i, t])
    l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
    losses.append(max(l1, l2))
    clipped.append(float(l2 > l1))
    kl2.append(0.5 * log_r ** 2)
    kl3.append(r - 1 - log_r)
    ratios.append(r)
  return tuple(float(np.mean(v)) for v in (losses, clipped, kl2, kl3, ratios))


def ref_value_loss(v, old, ret, mask, eps):
  losses, clipped = [], []
  for i, t in zip(*np.nonzero(mask)):
    vt, ot, rt = float(v[i, t]), float(old[i, t]), float(ret[i, t])
    v_clip = min(max(vt, ot - eps), ot + eps)
    l1, l2 = (vt - rt) ** 2, (v_clip - rt) ** 2
    losses.append(max(l1, l2))
    clipped.append(float(l2 > l1))
  return 0.5 * float(np.mean(losses)), float(np.mean(clipped))


def ref_log_softmax(row):
  row = row.astype(np.float64)
  m = row.max()
  return row - (m + math.log(sum(math.exp(z - m) for z in row)))


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_mean_and_var(shape, seed):
  rng, mask, _ = random_batch(seed, shape)
  x = normal(rng, shape, 3.0) + 1.0
  close(jit(pm.masked_mean)(x, mask), ref_mean(x, mask))
  close(jit(pm.masked_mean)(x, mask.astype(np.float32)), ref_mean(x, mask))
  row_means = [ref_mean(x[i:i + 1], mask[i:i + 1]) for i in range(shape[0])]
  close(jit(pm.masked_mean, "axis")(x, mask, axis=1), row_means)
  if mask.sum() > 1:
    for unbiased in (True, False):
      close(jit(pm.masked_var, "unbiased")(x, mask, unbiased=unbiased),
            ref_var(x, mask, unbiased))


def test_masked_mean_ignores_nan_and_inf_on_padding():
  x = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, -np.inf]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  assert float(jit(pm.masked_mean)(x, mask)) == 2.0


def test_sum_count_combines_minibatches_exactly():
  rng, mask, lengths = random_batch(3, (10, 24))
  # Integers (and halves) are summed exactly in float32, so the comparison can be exact.
  x = rng.integers(-50, 50, size=mask.shape).astype(np.float32) / 2
  sum_count = jit(pm.masked_sum_count)
  s1, c1 = sum_count(x[:4], mask[:4])
  s2, c2 = sum_count(x[4:], mask[4:])
  full = float(jit(pm.masked_mean)(x, mask))
  assert float((s1 + s2) / (c1 + c2)) == full
  assert float(c1 + c2) == lengths.sum()
  assert full == pytest.approx(ref_mean(x, mask), abs=1e-6)
  # The reason for carrying (sum, count): with unequal token counts a mean of means is wrong.
  assert float(c1) != float(c2)
  assert abs(float((s1 / c1 + s2 / c2) / 2) - full) > 1e-3


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shape, shift_mean):
  rng, mask, _ = random_batch(4, shape, min_len=2)
  x = normal(rng, shape, 2.0) + 5.0
  mean, var = ref_mean(x, mask), ref_var(x, mask, unbiased=True)
  expected = np.zeros(shape)
  for i, t in zip(*np.nonzero(mask)):
    expected[i, t] = (x[i, t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  got = jit(pm.masked_whiten, "shift_mean")(x, mask, shift_mean=shift_mean)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-5)
  if shift_mean:
    assert float(pm.masked_mean(got, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(pm.masked_var(got, mask)) == pytest.approx(1.0, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# KL and rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
  rng = np.random.default_rng(5)
  lp, lp_ref = normal(rng, (4, 9)) - 2, normal(rng, (4, 9)) - 2
  expected = np.vectorize(lambda a, b: ref_kl(a, b, estimator))(lp, lp_ref)
  close(jit(pm.kl_estimate, "estimator")(lp, lp_ref, estimator=estimator), expected)
  if estimator != "k1":
    assert np.all(np.asarray(pm.kl_estimate(lp, lp_ref, estimator)) >= 0)


def test_kl_k3_is_unbiased_for_the_true_kl():
  logits_p, logits_q = np.array([1.0, 0.0, -1.0, 0.5]), np.array([0.0, 0.3, 0.1, -0.4])
  logp, logq = ref_log_softmax(logits_p), ref_log_softmax(logits_q)
  true_kl = float(np.sum(np.exp(logp) * (logp - logq)))
  for estimator in ("k1", "k3"):
    per_action = np.asarray(pm.kl_estimate(logp, logq, estimator), np.float64)
    assert float(np.sum(np.exp(logp) * per_action)) == pytest.approx(true_kl, rel=1e-5)


def test_unknown_kl_estimator_is_an_error():
  with pytest.raises(ValueError, match="k1"):
    pm.kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards(shape, estimator):
  rng, mask, lengths = random_batch(6, shape)
  lp, lp_ref = normal(rng, shape) - 2, normal(rng, shape) - 2
  scores = normal(rng, shape[:1], 2.0)
  kl_coef = 0.2
  rewards, kl = jit(pm.kl_penalized_rewards, "estimator")(scores, lp, lp_ref, mask, kl_coef,
                                                         estimator=estimator)
  expected_r, expected_kl = np.zeros(shape), np.zeros(shape)
  for i in range(shape[0]):
    for t in range(lengths[i]):
      expected_kl[i, t] = ref_kl(lp[i, t], lp_ref[i, t], estimator)
      expected_r[i, t] = -kl_coef * expected_kl[i, t]
    expected_r[i, lengths[i] - 1] += float(scores[i])
  close(kl, expected_kl)
  close(rewards, expected_r)


def test_score_lands_on_last_valid_token_only():
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  zeros = np.zeros(mask.shape, np.float32)
  rewards, _ = pm.kl_penalized_rewards(np.array([1.0, 2.0, 3.0, 4.0], np.float32), zeros, zeros,
                                       mask, 0.1)
  expected = np.array([[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(np.asarray(rewards), expected)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae(shape, gamma, lam):
  rng, mask, lengths = random_batch(7, shape)
  rewards, values = normal(rng, shape), normal(rng, shape)
  # Padding holds garbage, which must not leak into the result.
  rewards[~mask], values[~mask] = 1e3, -1e3
  adv, rets = jit(pm.gae)(rewards, values, mask, gamma, lam)
  expected_adv, expected_rets = ref_gae(rewards, values, lengths, gamma, lam)
  close(adv, expected_adv)
  close(rets, expected_rets)


def test_gae_depends_on_lambda_and_gamma():
  rng, mask, _ = random_batch(8, (4, 12), min_len=3)
  rewards, values = normal(rng, (4, 12)), normal(rng, (4, 12))
  base = np.asarray(pm.gae(rewards, values, mask, 1.0, 0.95).advantages_bt)
  for gamma, lam in [(1.0, 0.9), (0.9, 0.95)]:
    other = np.asarray(pm.gae(rewards, values, mask, gamma, lam).advantages_bt)
    assert np.max(np.abs(other - base)) > 1e-3


def test_gae_with_terminal_reward_only():
  # gamma = lam = 1: A_t = score - V_t, the Monte-Carlo advantage.
  mask = np.array([[1, 1, 1, 0, 0]], bool)
  rewards = np.array([[0, 0, 2.0, 0, 0]], np.float32)
  values = np.array([[0.5, 1.0, 1.5, 9, 9]], np.float32)
  adv, rets = pm.gae(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[1.5, 1.0, 0.5, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(rets), [[2.0, 2.0, 2.0, 0, 0]], atol=1e-6)


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("normalize_std", [None, True, False])
def test_group_advantages(group_size, kind, normalize_std):
  scores = normal(np.random.default_rng(9), (3 * group_size,), 2.0)
  got = jit(pm.group_advantages, "group_size", "kind", "normalize_std")(
      scores, group_size=group_size, kind=kind, normalize_std=normalize_std)
  divide = (kind == "grpo") if normalize_std is None else normalize_std
  expected = []
  for g in range(0, len(scores), group_size):
    group = [float(s) for s in scores[g:g + group_size]]
    for i, s in enumerate(group):
      others = group[:i] + group[i + 1:]
      a = s - statistics.mean(group) if kind == "grpo" else s - statistics.mean(others)
      expected.append(a / (statistics.stdev(group) + 1e-4) if divide else a)
  close(got, expected)


def test_group_advantages_rejects_a_ragged_batch():
  with pytest.raises(ValueError, match="group_size"):
    pm.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match="grpo"):
    pm.group_advantages(jnp.zeros(6), 3, kind="ppo")


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("clip_eps", [0.1, 0.2])
def test_policy_loss(shape, clip_eps):
  rng, mask, _ = random_batch(10, shape)
  old = normal(rng, shape) - 3
  lp = old + normal(rng, shape, 0.5)  # ratios e^{+-0.5}: many beyond the clip range
  adv = normal(rng, shape)
  out = jit(pm.policy_loss)(lp, old, adv, mask, clip_eps)
  loss, clipfrac, kl2, kl3, ratio = ref_policy_loss(lp, old, adv, mask, clip_eps)
  close(out.loss, loss)
  close(out.clipfrac, clipfrac)
  close(out.approx_kl, kl2)
  close(out.approx_kl_k3, kl3)
  close(out.ratio_mean, ratio)
  assert 0.1 < clipfrac < 0.9


def test_policy_gradient_vanishes_where_clipped():
  rng, mask, _ = random_batch(11, (6, 10))
  old = normal(rng, (6, 10)) - 3
  lp = old + normal(rng, (6, 10), 0.5)
  adv = normal(rng, (6, 10))
  grad = np.asarray(jax.grad(lambda x: pm.policy_loss(x, old, adv, mask, 0.2).loss)(lp))
  n = mask.sum()
  for i in range(6):
    for t in range(10):
      r = math.exp(float(lp[i, t]) - float(old[i, t]))
      a = float(adv[i, t])
      clipped = -a * min(max(r, 0.8), 1.2) > -a * r
      expected = 0.0 if (not mask[i, t] or clipped) else -a * r / n
      assert grad[i, t] == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("clip_eps", [0.2, 0.5])
def test_value_loss(shape, clip_eps):
  rng, mask, _ = random_batch(12, shape)
  old = normal(rng, shape)
  values = old + normal(rng, shape)
  # Half the returns lie beyond v on its side of V_old (the clipped error is then the larger one
  # whenever |v - V_old| > eps), half on the other side (never clipped).
  beyond = rng.random(shape) < 0.5
  returns = (np.where(beyond, values + 0.5 * (values - old), old - (values - old))
             + normal(rng, shape, 0.1))
  out = jit(pm.value_loss)(values, old, returns, mask, clip_eps)
  loss, clipfrac = ref_value_loss(values, old, returns, mask, clip_eps)
  close(out.loss, loss)
  close(out.clipfrac, clipfrac)
  assert 0.05 < clipfrac < 0.95


# ----------------------------------------------------------------------------------------------
# From logits
# ----------------------------------------------------------------------------------------------


def test_token_logprobs_and_entropy():
  rng = np.random.default_rng(13)
  logits = normal(rng, (3, 5, 50), 3.0)
  tokens = rng.integers(0, 50, size=(3, 5))
  logp = jit(pm.token_logprobs)(logits, tokens)
  entropy = jit(pm.entropy_from_logits)(logits)
  expected_logp, expected_h = np.zeros((3, 5)), np.zeros((3, 5))
  for i in range(3):
    for t in range(5):
      row = ref_log_softmax(logits[i, t])
      expected_logp[i, t] = row[tokens[i, t]]
      expected_h[i, t] = -sum(math.exp(v) * v for v in row)
  close(logp, expected_logp)
  close(entropy, expected_h)


def test_logits_in_bfloat16_give_float32():
  logits = jnp.asarray(normal(np.random.default_rng(14), (2, 3, 16)), jnp.bfloat16)
  tokens = jnp.zeros((2, 3), jnp.int32)
  assert pm.token_logprobs(logits, tokens).dtype == jnp.float32
  assert pm.entropy_from_logits(logits).dtype == jnp.float32


def test_entropy_with_masked_vocabulary_is_finite():
  logits = np.array([[[0.0, 0.0, -np.inf, -np.inf]]], np.float32)
  entropy = pm.entropy_from_logits(logits)
  np.testing.assert_allclose(np.asarray(entropy), [[math.log(2)]], rtol=RTOL)
  grad = jax.grad(lambda z: pm.entropy_from_logits(z).sum())(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(grad)[..., :2]))


# ----------------------------------------------------------------------------------------------
# KL controller
# ----------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_matches_numpy_over_a_sequence():
  config = pm.KLControlConfig("adaptive", init_coef=0.2, target=6.0, horizon=100.0)
  kls = [0.0, 1.0, 5.0, 6.0, 6.6, 7.2, 12.0, 100.0, 4.7, 3.0, 0.5, 8.0]
  n_steps = 16
  update = jit(pm.kl_coef_update, "config")
  coef, ref = jnp.float32(config.init_coef), config.init_coef
  for kl in kls:
    err = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
    ref *= 1 + err * n_steps / 100.0
    coef = update(config, coef, kl, n_steps)
    close(coef, ref)
  # The +-0.2 clip: a huge KL raises beta by exactly (1 + 0.2 n / horizon), as does 7.2.
  high = [float(update(config, 1.0, kl, n_steps)) for kl in (7.2, 12.0, 1e6)]
  np.testing.assert_allclose(high, [1 + 0.2 * 16 / 100] * 3, rtol=RTOL)
  low = [float(update(config, 1.0, kl, n_steps)) for kl in (4.8, 0.0)]
  np.testing.assert_allclose(low, [1 - 0.2 * 16 / 100] * 2, rtol=RTOL)


def test_fixed_kl_controller_keeps_the_coefficient():
  config = pm.KLControlConfig("fixed", init_coef=0.05)
  for kl in (0.0, 6.0, 1e6):
    assert float(jit(pm.kl_coef_update, "config")(config, 0.05, kl, 16)) == pytest.approx(0.05)


def test_kl_control_config_validates():
  with pytest.raises(ValueError, match="adaptive"):
    pm.KLControlConfig("pid")
  with pytest.raises(ValueError, match="target"):
    pm.KLControlConfig("adaptive", target=0.0)


def _whitened(v: np.ndarray, over: np.ndarray | None = None) -> np.ndarray:
  """NumPy's (v - mean) / sqrt(unbiased var + 1e-8), the statistics taken `over` (default v)."""
  over = v if over is None else over
  return (v - over.mean()) / np.sqrt(over.var(ddof=1) + 1e-8)


def test_masked_whiten_groups_whitens_each_group_alone():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=(6, 5)).astype(np.float32)
  mask = rng.random((6, 5)) < 0.7
  mask[:, 0] = True
  groups = np.array([0, 1, 0, 2, 1, 0])      # group 3 is empty
  out = np.asarray(pm.masked_whiten_groups(jnp.asarray(x), jnp.asarray(mask),
                                                 jnp.asarray(groups), 4))
  want = np.zeros_like(x)
  for g in range(3):
    m = mask & (groups == g)[:, None]
    want[m] = _whitened(x[m])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert np.all(out[~mask] == 0)


def test_a_group_of_one_token_is_whitened_with_the_whole_batch():
  # A task with a single one-token answer in the batch: no variance of its own.
  x = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.5, 0.7, 0.9]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
  groups = np.array([0, 1, 0])
  out = np.asarray(pm.masked_whiten_groups(jnp.asarray(x), jnp.asarray(mask),
                                           jnp.asarray(groups), 2))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[1, 0], _whitened(x[1, 0], over=x[mask]), rtol=1e-5)
  group0 = mask & (groups == 0)[:, None]
  np.testing.assert_allclose(out[group0], _whitened(x[group0]), rtol=1e-5)
