"""Temperature / top-k / top-p against a NumPy reference, and sampling frequencies."""
import jax
import numpy as np
import pytest

from jax_nlu_ppo.model import sampling


def reference_logprobs(logits, temperature, top_k, top_p):
  out = []
  for row in logits.astype(np.float64):
    z = row / temperature
    keep = np.ones_like(z, bool)
    if top_k:
      keep &= z >= np.sort(z)[::-1][top_k - 1]
    order = np.argsort(-z)
    p = np.exp(z[order] - z.max())
    p /= p.sum()
    # top-p runs after top-k, on the renormalised top-k distribution.
    p_k = np.where(keep[order], p, 0)
    p_k /= p_k.sum()
    cum = 0.0
    kept_p = np.zeros_like(keep)
    for idx, prob in zip(order, p_k):
      if cum < top_p and keep[idx]:
        kept_p[idx] = True
      cum += prob
    keep &= kept_p
    masked = np.where(keep, z, -np.inf)
    out.append(masked - np.logaddexp.reduce(masked[keep]))
  return np.array(out)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 7, 0.6)])
def test_logprobs_match_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  config = sampling.SamplingConfig(temperature, top_k, top_p)
  ours = np.asarray(jax.jit(sampling.sampling_logprobs, static_argnums=1)(logits, config))
  ref = reference_logprobs(logits, temperature, top_k, top_p)
  assert (np.isinf(ours) == np.isinf(ref)).all()
  finite = np.isfinite(ref)
  np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_sample_frequencies_follow_the_distribution():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = np.log(np.tile(probs, (20000, 1))).astype(np.float32)
  config = sampling.SamplingConfig(temperature=1.0)
  tokens, logp = sampling.sample(logits, jax.random.key(0), config)
  freq = np.bincount(np.asarray(tokens), minlength=4) / 20000
  np.testing.assert_allclose(freq, probs, atol=0.015)
  np.testing.assert_allclose(np.asarray(logp), np.log(probs)[np.asarray(tokens)], rtol=1e-5)


def test_greedy_is_argmax():
  logits = np.random.default_rng(1).normal(size=(8, 30)).astype(np.float32)
  tokens, _ = sampling.sample(logits, jax.random.key(0), sampling.SamplingConfig(0.0))
  np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k")])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingConfig(**kwargs)


def test_first_argmax_is_numpys_argmax_with_ties_and_infinities():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 4, (64, 40)).astype(np.float32)      # many ties
  x[0, :] = -np.inf
  x[1, 5:] = -np.inf
  x[2, 7] = np.inf
  np.testing.assert_array_equal(np.asarray(jax.jit(sampling.first_argmax)(x)), x.argmax(-1))


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5), (0.0, 0)])
def test_sample_draws_the_tokens_jax_categorical_draws(temperature, top_k):
  """The Gumbel-max draw written out gives jax.random.categorical's tokens from the same key."""
  logits = np.random.default_rng(3).normal(size=(16, 300)).astype(np.float32) * 3
  config = sampling.SamplingConfig(temperature, top_k)
  draw = jax.jit(sampling.sample, static_argnums=2)
  for seed in range(10):
    key = jax.random.key(seed)
    tokens, logp = draw(logits, key, config)
    logprobs = sampling.sampling_logprobs(logits, config)
    expected = (logits.argmax(-1) if temperature == 0
                else jax.random.categorical(key, logprobs, axis=-1))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))
    # (eager and jitted log-softmax may round differently)
    np.testing.assert_allclose(
        np.asarray(logp), np.take_along_axis(np.asarray(logprobs), np.asarray(expected)[:, None],
                                             -1)[:, 0], rtol=1e-6, atol=1e-6)
