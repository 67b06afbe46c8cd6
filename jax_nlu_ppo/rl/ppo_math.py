"""The RL formulas of PPO for language models: small pure functions on padded (batch, time) arrays.

Every function is traceable and free of hidden state: call it inside the jitted train step (pass
the string arguments, `estimator` and `kind`, and any config as static). `mask_bt` (bool or 0/1
float) marks response tokens; padded positions never reach a statistic, and the functions that
return per-token arrays set them to 0. The valid tokens of a row are assumed contiguous, as in
a right-padded response (valid tokens, then padding); see `gae`.

Semantics follow TRL's legacy `PPOTrainer` (`compute_rewards`, `compute_advantages`, `loss`,
`core.masked_*`), which the public code of arXiv 2410.11020 (RL4GLUE) trains with.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

# Added to the variance before the square root when whitening (TRL `masked_whiten`).
WHITEN_EPS = 1e-8


def _float(x: Array) -> Array:
  """At least float32: bf16 log-probs and values are summed in float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------


def masked_sum_count(x: Array, mask: Array, axis=None) -> tuple[Array, Array]:
  """(sum of x over mask, number of masked-in entries), both float.

  Sums and counts add across minibatches and devices (`psum`), so
  `mean = (s1 + s2) / (c1 + c2)` is the exact full-batch mean; a mean of minibatch means is not
  when the minibatches hold different numbers of tokens.
  """
  x, mask = _float(x), jnp.asarray(mask).astype(bool)
  # `where`, not `x * mask`: padding may hold inf or NaN (e.g. log-probs of pad tokens), and
  # 0 * inf would poison the sum.
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
  count = jnp.sum(mask, axis=axis).astype(total.dtype)
  return total, count


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """sum(x * m) / sum(m) over `axis` (all axes when None); NaN where the mask is empty (as TRL)."""
  total, count = masked_sum_count(x, mask, axis)
  return total / count


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
  """Variance of the masked-in entries; Bessel-corrected by n / (n - 1) when `unbiased` (TRL)."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(_float(x) - mean), mask)
  if unbiased:
    count = masked_sum_count(x, mask)[1]
    var = var * count / (count - 1)
  return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
  """(x - mean) / sqrt(var + 1e-8) over the mask, + mean again when not `shift_mean` (TRL).

  mean and (unbiased) var are over the whole masked batch. Padded positions are set to 0.
  """
  x = _float(x)
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(jnp.asarray(mask).astype(bool), whitened, 0.0)


def masked_whiten_groups(x: Array, mask: Array, groups_b: Array, num_groups: int) -> Array:
  """`masked_whiten` of each group's rows over those rows alone (`groups_b`: each row's group in
  0..num_groups-1), e.g. each task of a mixture on its own scale. An empty group adds nothing; a
  group of one token, which has no variance of its own, is whitened with the whole batch's."""
  mask = jnp.asarray(mask).astype(bool)
  over_batch = masked_whiten(x, mask)
  out = jnp.zeros(x.shape, jnp.float32)
  for g in range(num_groups):
    in_group = mask & (groups_b == g)[:, None]
    # Its own unbiased variance would be 0/0: NaN advantages would skip the whole update.
    alone = masked_whiten(x, in_group)
    out = jnp.where(in_group, jnp.where(in_group.sum() > 1, alone, over_batch), out)
  return out


# ----------------------------------------------------------------------------------------------
# KL to the reference and the KL-penalised reward
# ----------------------------------------------------------------------------------------------


def kl_k1(logp_bt: Array, logp_ref_bt: Array) -> Array:
  """k1 = log pi(a) - log pi_ref(a): unbiased for KL(pi || pi_ref), can be negative.

  Schulman (2020), "Approximating KL Divergence"; TRL's `kl_penalty="kl"`.
  """
  return _float(logp_bt) - _float(logp_ref_bt)


def kl_k2(logp_bt: Array, logp_ref_bt: Array) -> Array:
  """k2 = 0.5 (log pi_ref(a) - log pi(a))^2: biased, low variance, >= 0 (Schulman 2020; TRL mse)."""
  return 0.5 * jnp.square(_float(logp_ref_bt) - _float(logp_bt))


def kl_k3(logp_bt: Array, logp_ref_bt: Array) -> Array:
  """k3 = (r - 1) - log r with r = pi_ref(a) / pi(a): unbiased and >= 0 (Schulman 2020)."""
  log_r = _float(logp_ref_bt) - _float(logp_bt)
  return jnp.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp_bt: Array, logp_ref_bt: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, by name."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
  return KL_ESTIMATORS[estimator](logp_bt, logp_ref_bt)


class KLRewards(NamedTuple):
  rewards_bt: Array  # -kl_coef * kl_t, plus the score on each row's last response token
  kl_bt: Array       # the per-token KL estimate, 0 on padding


def last_token_onehot(mask_bt: Array) -> Array:
  """1.0 at the last masked-in position of each row, 0 elsewhere (all 0 for an empty row)."""
  mask_bt = jnp.asarray(mask_bt).astype(bool)
  t = mask_bt.shape[1]
  last_b = t - 1 - jnp.argmax(mask_bt[:, ::-1], axis=1)
  # An empty row's argmax points at position t-1, which the mask then zeroes.
  return jnp.where(mask_bt, jax.nn.one_hot(last_b, t, dtype=jnp.float32), 0.0)


def kl_penalized_rewards(scores_b: Array, logp_bt: Array, logp_ref_bt: Array, mask_bt: Array,
                         kl_coef: Array | float, estimator: str = "k1") -> KLRewards:
  """r_t = -beta * KL_t + [t = last response token] * score.

  The sequence-level score is paid once, at the end of the response; the KL penalty to the
  reference is paid at every token (Ziegler et al. 2019; Stiennon et al. 2020; TRL legacy
  `PPOTrainer.compute_rewards`).
  """
  chex.assert_rank(scores_b, 1)
  chex.assert_equal_shape([logp_bt, logp_ref_bt, mask_bt])
  chex.assert_equal_shape_prefix([scores_b, mask_bt], 1)
  mask_bt = jnp.asarray(mask_bt).astype(bool)
  kl_bt = jnp.where(mask_bt, kl_estimate(logp_bt, logp_ref_bt, estimator), 0.0)
  score_bt = _float(scores_b)[:, None] * last_token_onehot(mask_bt)
  return KLRewards(rewards_bt=-kl_coef * kl_bt + score_bt, kl_bt=kl_bt)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


class Advantages(NamedTuple):
  advantages_bt: Array  # A_t, 0 on padding (not whitened)
  returns_bt: Array     # A_t + V_t: the value targets


def gae(rewards_bt: Array, values_bt: Array, mask_bt: Array, gamma: float,
        lam: float) -> Advantages:
  """Generalised advantage estimation (Schulman et al. 2016), by a reverse `lax.scan` over time.

  delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.

  Rewards and values on padding count as 0, so past a row's last response token V_{T+1} = 0 and
  A_{T+1} = 0: the episode ends there. Assumes each row's valid tokens are contiguous (a
  right-padded response); then this equals TRL's `compute_advantages` before its whitening.
  A and R are 0 on padding.
  """
  chex.assert_rank(rewards_bt, 2)
  chex.assert_equal_shape([rewards_bt, values_bt, mask_bt])
  mask_bt = jnp.asarray(mask_bt).astype(bool)
  rewards_bt = jnp.where(mask_bt, _float(rewards_bt), 0.0)
  values_bt = jnp.where(mask_bt, _float(values_bt), 0.0)

  def step(carry, x_t):
    next_value_b, next_advantage_b = carry
    reward_b, value_b, mask_b = x_t
    delta_b = reward_b + gamma * next_value_b - value_b
    advantage_b = jnp.where(mask_b, delta_b + gamma * lam * next_advantage_b, 0.0)
    return (value_b, advantage_b), advantage_b

  zeros_b = jnp.zeros(rewards_bt.shape[:1], rewards_bt.dtype)
  _, advantages_tb = jax.lax.scan(step, (zeros_b, zeros_b),
                                  (rewards_bt.T, values_bt.T, mask_bt.T), reverse=True)
  advantages_bt = advantages_tb.T
  return Advantages(advantages_bt=advantages_bt, returns_bt=advantages_bt + values_bt)


def group_advantages(scores_b: Array, group_size: int, kind: str = "grpo",
                     normalize_std: bool | None = None, eps: float = 1e-4) -> Array:
  """Critic-free per-row advantages from the other samples of the same prompt.

  Rows come as consecutive groups of `group_size` samples of one prompt.
    grpo: A_i = (s_i - mean_g s) / (std_g s + eps), std unbiased (Shao et al. 2024, DeepSeekMath;
          as TRL's GRPOTrainer). normalize_std=False drops the division (Liu et al. 2025, Dr. GRPO).
    rloo: A_i = s_i - mean_{j != i} s_j = (G s_i - sum_g s) / (G - 1) (Kool et al. 2019;
          Ahmadian et al. 2024). normalize_std=True also divides by (std_g s + eps).
  `normalize_std=None` takes each method's own choice (grpo: True, rloo: False). Returns (B,);
  callers broadcast over tokens.
  """
  if kind not in ("grpo", "rloo"):
    raise ValueError(f"unknown group baseline {kind!r}; choose 'grpo' or 'rloo'")
  chex.assert_rank(scores_b, 1)
  if group_size < 2 or scores_b.shape[0] % group_size:
    raise ValueError(f"group_size must be >= 2 and divide the batch ({scores_b.shape[0]} rows), "
                     f"got {group_size}")
  if normalize_std is None:
    normalize_std = kind == "grpo"
  scores_gk = _float(scores_b).reshape(-1, group_size)
  mean_g1 = jnp.mean(scores_gk, axis=1, keepdims=True)
  if kind == "grpo":
    advantages_gk = scores_gk - mean_g1
  else:
    advantages_gk = (scores_gk - mean_g1) * (group_size / (group_size - 1))
  if normalize_std:
    advantages_gk = advantages_gk / (jnp.std(scores_gk, axis=1, ddof=1, keepdims=True) + eps)
  return advantages_gk.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
  loss: Array          # the clipped surrogate, to minimise
  clipfrac: Array      # fraction of tokens whose clipped branch was taken (TRL policy/clipfrac)
  approx_kl: Array     # 0.5 mean (log r)^2 (TRL policy/approxkl)
  approx_kl_k3: Array  # mean (r - 1) - log r: the k3 estimate of KL(pi_old || pi)
  ratio_mean: Array    # mean r; TRL skips a batch when it exceeds `ratio_threshold`


def policy_loss(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
                clip_eps: float) -> PolicyLoss:
  """PPO clipped surrogate (Schulman et al. 2017), as TRL's legacy `PPOTrainer.loss`.

  r_t = exp(log pi(a_t) - log pi_old(a_t)),
  loss = mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)) over response tokens.
  """
  chex.assert_equal_shape([logp_bt, old_logp_bt, advantages_bt, mask_bt])
  # Rollout log-probs and advantages are data; no gradient may flow into them.
  # Padding may hold anything: zero it first, since 0 * NaN in a masked-out slot would still
  # poison the gradient.
  old_logp_bt = jax.lax.stop_gradient(jnp.where(mask_bt, _float(old_logp_bt), 0.0))
  advantages_bt = jax.lax.stop_gradient(jnp.where(mask_bt, _float(advantages_bt), 0.0))
  log_ratio_bt = jnp.where(mask_bt, _float(logp_bt) - old_logp_bt, 0.0)
  ratio_bt = jnp.exp(log_ratio_bt)
  losses_bt = -advantages_bt * ratio_bt
  clipped_losses_bt = -advantages_bt * jnp.clip(ratio_bt, 1.0 - clip_eps, 1.0 + clip_eps)
  return PolicyLoss(
      loss=masked_mean(jnp.maximum(losses_bt, clipped_losses_bt), mask_bt),
      clipfrac=masked_mean((clipped_losses_bt > losses_bt).astype(jnp.float32), mask_bt),
      approx_kl=0.5 * masked_mean(jnp.square(log_ratio_bt), mask_bt),
      approx_kl_k3=masked_mean(jnp.expm1(log_ratio_bt) - log_ratio_bt, mask_bt),
      ratio_mean=masked_mean(ratio_bt, mask_bt),
  )


class ValueLoss(NamedTuple):
  loss: Array      # 0.5 mean max((v - R)^2, (v_clip - R)^2)
  clipfrac: Array  # fraction of tokens whose clipped error was the larger (TRL val/clipfrac)


def value_loss(values_bt: Array, old_values_bt: Array, returns_bt: Array, mask_bt: Array,
               clip_eps: float) -> ValueLoss:
  """Clipped value loss (OpenAI baselines ppo2; TRL's legacy `PPOTrainer.loss`).

  v_clip = V_old + clip(v - V_old, -eps, eps),
  loss = 0.5 mean_t max((v_t - R_t)^2, (v_clip_t - R_t)^2) over response tokens.
  """
  chex.assert_equal_shape([values_bt, old_values_bt, returns_bt, mask_bt])
  old_values_bt = jax.lax.stop_gradient(jnp.where(mask_bt, _float(old_values_bt), 0.0))
  returns_bt = jax.lax.stop_gradient(jnp.where(mask_bt, _float(returns_bt), 0.0))
  values_bt = _float(values_bt)
  clipped_values_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip_eps, clip_eps)
  losses_bt = jnp.square(values_bt - returns_bt)
  clipped_losses_bt = jnp.square(clipped_values_bt - returns_bt)
  return ValueLoss(
      loss=0.5 * masked_mean(jnp.maximum(losses_bt, clipped_losses_bt), mask_bt),
      clipfrac=masked_mean((clipped_losses_bt > losses_bt).astype(jnp.float32), mask_bt),
  )


# ----------------------------------------------------------------------------------------------
# From logits
# ----------------------------------------------------------------------------------------------


def token_logprobs(logits_btv: Array, tokens_bt: Array) -> Array:
  """log softmax(z)[a] = z_a - logsumexp(z), in float32, without a (B, T, V) log-softmax copy."""
  chex.assert_equal_shape_prefix([logits_btv, tokens_bt], 2)
  logits_btv = _float(logits_btv)
  picked_bt = jnp.take_along_axis(logits_btv, tokens_bt[..., None], axis=-1)[..., 0]
  return picked_bt - jax.nn.logsumexp(logits_btv, axis=-1)


def entropy_from_logits(logits_btv: Array) -> Array:
  """H = -sum_v p_v log p_v with log p = z - logsumexp(z), in float32; (B, T)."""
  logits_btv = _float(logits_btv)
  logp_btv = logits_btv - jax.nn.logsumexp(logits_btv, axis=-1, keepdims=True)
  p_btv = jnp.exp(logp_btv)
  # Tokens with p = 0 (logit -inf, e.g. masked vocabulary) add 0, not 0 * -inf = NaN; the `where`
  # sits on log p so that the gradient stays NaN-free too.
  return -jnp.sum(p_btv * jnp.where(p_btv > 0, logp_btv, 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------
# KL coefficient control
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KLControlConfig:
  """How the KL coefficient beta evolves; defaults are those of arXiv 2410.11020's public code."""
  kind: str = "adaptive"   # "adaptive" (Ziegler et al. 2019) or "fixed"
  init_coef: float = 0.2
  target: float = 6.0      # adaptive only: the KL (nats per response) beta steers towards
  horizon: float = 10000.0  # adaptive only: samples over which beta may change by ~e^{0.2}

  def __post_init__(self):
    if self.kind not in ("adaptive", "fixed"):
      raise ValueError(f"KL control kind must be 'adaptive' or 'fixed', got {self.kind!r}")
    if self.init_coef < 0:
      raise ValueError(f"KL init_coef must be >= 0, got {self.init_coef}")
    if self.kind == "adaptive" and not (self.target > 0 and self.horizon > 0):
      raise ValueError(f"adaptive KL control needs target > 0 and horizon > 0, got "
                       f"target={self.target}, horizon={self.horizon}")


def adaptive_kl_update(kl_coef: Array | float, current_kl: Array | float, n_steps: Array | int,
                       target: float, horizon: float) -> Array:
  """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon).

  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; TRL's
  `AdaptiveKLController.update`, where n is the number of samples in the step.
  """
  error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)


def fixed_kl_update(kl_coef: Array | float, current_kl: Array | float,
                    n_steps: Array | int) -> Array:
  """beta <- beta: the fixed controller (TRL `FixedKLController`)."""
  del current_kl, n_steps
  return jnp.asarray(kl_coef, jnp.float32)


def kl_coef_update(config: KLControlConfig, kl_coef: Array | float, current_kl: Array | float,
                   n_steps: Array | int) -> Array:
  """The next beta under `config` (static under jit: it is a frozen, hashable dataclass)."""
  if config.kind == "fixed":
    return fixed_kl_update(kl_coef, current_kl, n_steps)
  return adaptive_kl_update(kl_coef, current_kl, n_steps, config.target, config.horizon)
