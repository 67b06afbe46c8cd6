"""The PPO step as pure functions: rollout, experience, advantages and the minibatch update.

Each takes the frozen `graphdef` and `base` and returns new arrays; the trainer jits each once.
Sequences are [left-padded prompt of static length P | response of static length R]; the
response mask marks generated tokens up to and including EOS.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.model import sampling as sampling_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import ppo_math

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO hyper-parameters; defaults follow the paper's public code (TRL legacy PPOTrainer)."""
  gamma: float = 1.0
  lam: float = 0.95
  cliprange: float = 0.2
  cliprange_value: float = 0.2
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  kl: ppo_math.KLControlConfig = ppo_math.KLControlConfig()
  kl_estimator: str = "k1"
  whiten_advantages: bool = True       # GAE only: group advantages are already normalised
  # A mixture of tasks: whiten each task's advantages over its own rows instead of the batch's,
  # so that one task's reward scale or share of the batch does not set the others'.
  whiten_per_task: bool = False
  ppo_epochs: int = 4
  minibatch_size: int = 8              # samples per optimiser step
  # Each minibatch runs as this many micro-batches whose gradients are summed, weighted by
  # their share of the minibatch's response tokens: the same step, in less memory.
  gradient_accumulation_steps: int = 1
  ratio_threshold: float = 10.0
  # "gae" uses the critic; "grpo" / "rloo" are critic-free group baselines over `group_size`
  # samples of each prompt, with the KL to the reference as a loss term instead of a reward:
  # the k3 estimate there (k1's gradient vanishes in expectation), which is also what
  # `objective/kl` reports and the KL controller sees.
  advantage: str = "gae"
  group_size: int = 1

  def __post_init__(self):
    if self.advantage not in ("gae", "grpo", "rloo"):
      raise ValueError(f"ppo.advantage must be 'gae', 'grpo' or 'rloo', got {self.advantage!r}")
    if self.advantage != "gae" and self.group_size < 2:
      raise ValueError(f"ppo.advantage={self.advantage!r} needs ppo.group_size >= 2")
    if self.gradient_accumulation_steps < 1 or (
        self.minibatch_size % self.gradient_accumulation_steps):
      raise ValueError(f"ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps}) "
                       f"must divide ppo.minibatch_size ({self.minibatch_size})")
    if self.whiten_per_task and not (self.whiten_advantages and self.uses_critic):
      raise ValueError("ppo.whiten_per_task whitens GAE advantages: it needs ppo.advantage=gae "
                       "and ppo.whiten_advantages=true")
    if self.kl_estimator not in ("k1", "k2", "k3"):
      raise ValueError(f"ppo.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")

  @property
  def uses_critic(self) -> bool:
    return self.advantage == "gae"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"          # "adamw" or "adafactor" (the paper's)
  learning_rate: float = 1e-4
  schedule: str = "constant"   # "constant", "linear" or "cosine" decay after warm-up
  warmup_steps: int = 0
  decay_steps: int = 1000
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0

  def __post_init__(self):
    if self.name not in ("adamw", "adafactor"):
      raise ValueError(f"optimizer.name must be 'adamw' or 'adafactor', got {self.name!r}")
    if self.schedule not in ("constant", "linear", "cosine"):
      raise ValueError(f"optimizer.schedule must be constant, linear or cosine, "
                       f"got {self.schedule!r}")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  lr = config.learning_rate
  if config.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif config.schedule == "linear":
    schedule = optax.linear_schedule(lr, 0.0, max(config.decay_steps, 1))
  else:
    schedule = optax.cosine_decay_schedule(lr, max(config.decay_steps, 1))
  if config.warmup_steps:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, config.warmup_steps), schedule], [config.warmup_steps])
  if config.name == "adafactor":
    # As transformers' Adafactor(scale_parameter=False, relative_step=False, lr=...) in the
    # paper's code: factored second moments, no momentum, update clipping at 1.
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=False, clipping_threshold=1.0,
                          weight_decay_rate=config.weight_decay or None)
  else:
    opt = optax.adamw(schedule, weight_decay=config.weight_decay)
  if config.max_grad_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), opt)
  return opt


@flax.struct.dataclass
class PPOState:
  """Everything the update changes: a checkpoint holds this (plus data position)."""
  step: Array
  trainable: Any          # nnx.State of adapters + value head
  opt_state: Any
  kl_coef: Array


@flax.struct.dataclass
class Batch:
  """One row per sample; what the update needs, all fixed before the first epoch."""
  sequences: prompts_lib.Prompts    # prompt + response, in the prompts' layout
  response_br: Array
  response_mask_br: Array
  old_logp_br: Array
  ref_logp_br: Array
  old_values_br: Array
  advantages_br: Array
  returns_br: Array


def _scaled(logits_brv: Array, temperature: float) -> Array:
  # The policy being optimised is the distribution rollouts sample from.
  return logits_brv / temperature if temperature > 0 else logits_brv


def rollout(graphdef, base, trainable, prompts: prompts_lib.Prompts, key, limit, *,
            max_new_tokens: int, sampling: sampling_lib.SamplingConfig,
            eos_ids: tuple[int, ...], pad_id: int) -> sampling_lib.Generation:
  """Samples responses from the current policy (adapters on, dropout off).

  With the shared-trunk critic, the value head reads each decode step's hidden state, so the
  rollout's log-probs and values are already pi_old and V_old (see `experience`).
  """
  policy = policy_lib.with_trainable(graphdef, base, trainable)
  value_fn = policy.value_head if policy.critic is None else None
  return sampling_lib.generate(policy.llama, prompts, key, max_new_tokens=max_new_tokens,
                               sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, limit=limit,
                               value_fn=value_fn)


def reuses_rollout(sampling: sampling_lib.SamplingConfig, critic_lora: bool) -> bool:
  """Whether a rollout's log-probs and values are exactly what `experience` would recompute.

  They are when the sampling distribution is the optimised one (temperature only: top-k/top-p
  truncate it) and the critic shares the actor's forward.
  """
  return (sampling.temperature > 0 and sampling.top_k == 0 and sampling.top_p == 1
          and not critic_lora)


def experience(graphdef, base, trainable, reference, sequences: prompts_lib.Prompts,
               gen: sampling_lib.Generation, *, temperature: float, values: bool = True,
               reuse_rollout: bool = False) -> tuple[Array, Array, Array]:
  """(log pi_old, V_old, log pi_ref) of each response token, without dropout.

  With `reuse_rollout` pi_old and V_old come from the rollout and only the reference forward
  runs: half the work of recomputing both (the KV-cached decode and the full forward agree to
  float rounding).
  """
  prompt_len = sequences.ids_bt.shape[1] - gen.tokens_br.shape[1]
  ref = policy_lib.response_outputs(policy_lib.with_trainable(graphdef, base, reference),
                                    sequences, prompt_len, values=False)
  ref_logp_br = ppo_math.token_logprobs(_scaled(ref.logits_brv, temperature), gen.tokens_br)
  if reuse_rollout:
    return gen.logprobs_br, gen.values_br, ref_logp_br
  out = policy_lib.response_outputs(policy_lib.with_trainable(graphdef, base, trainable),
                                    sequences, prompt_len, values=values)
  logp_br = ppo_math.token_logprobs(_scaled(out.logits_brv, temperature), gen.tokens_br)
  return logp_br, out.values_br, ref_logp_br


def advantages(scores_b, old_logp_br, ref_logp_br, old_values_br, response_mask_br, kl_coef, *,
               config: PPOConfig, tasks_b=None, num_tasks: int = 1
               ) -> tuple[Array, Array, Array]:
  """(advantages, returns, per-token KL): GAE on KL-penalised rewards, or group baselines.
  With `config.whiten_per_task`, `tasks_b` (each row's task in 0..num_tasks-1) groups the
  whitening."""
  mask_br = response_mask_br.astype(bool)
  if config.uses_critic:
    rewards = ppo_math.kl_penalized_rewards(scores_b, old_logp_br, ref_logp_br, mask_br,
                                            kl_coef, config.kl_estimator)
    adv = ppo_math.gae(rewards.rewards_bt, old_values_br, mask_br, config.gamma, config.lam)
    advantages_br, returns_br, kl_br = adv.advantages_bt, adv.returns_bt, rewards.kl_bt
  else:
    group_b = ppo_math.group_advantages(scores_b, config.group_size, config.advantage)
    advantages_br = jnp.where(mask_br, group_b[:, None], 0.0)
    returns_br = jnp.zeros_like(advantages_br)
    kl_br = jnp.where(mask_br, ppo_math.kl_k3(old_logp_br, ref_logp_br), 0.0)
  if config.whiten_advantages and config.uses_critic:
    # Not for group advantages: a token-weighted shift would move long answers' advantages
    # and could flip the sign of answers that beat their group.
    if config.whiten_per_task:
      advantages_br = ppo_math.masked_whiten_groups(advantages_br, mask_br, tasks_b, num_tasks)
    else:
      advantages_br = jnp.where(mask_br, ppo_math.masked_whiten(advantages_br, mask_br), 0.0)
  return advantages_br, returns_br, kl_br


def experience_batch(graphdef, base, trainable, reference, prompts: prompts_lib.Prompts,
                     gen: sampling_lib.Generation, scores_b, tasks_b, kl_coef, *,
                     temperature: float, values: bool, reuse_rollout: bool,
                     config: PPOConfig, num_tasks: int = 1) -> tuple[Batch, Array]:
  """A rollout and its rewards (and each row's task index) made into the update's `Batch`
  (`experience`, then `advantages`); also returns the per-token KL the controller reads."""
  sequences = prompts.extended(gen.tokens_br, gen.mask_br)
  old_logp, old_values, ref_logp = experience(graphdef, base, trainable, reference, sequences,
                                              gen, temperature=temperature, values=values,
                                              reuse_rollout=reuse_rollout)
  adv, returns, kl_br = advantages(scores_b, old_logp, ref_logp, old_values, gen.mask_br,
                                   kl_coef, config=config, tasks_b=tasks_b, num_tasks=num_tasks)
  return Batch(sequences, gen.tokens_br, gen.mask_br, old_logp, ref_logp, old_values, adv,
               returns), kl_br


def loss_fn(trainable, graphdef, base, batch: Batch, dropout_key, kl_coef, *, config: PPOConfig,
            temperature: float):
  """pg + vf_coef * vf - ent_coef * H (+ kl_coef * KL for critic-free advantages).

  Every term and metric is a mean over the batch's response tokens.
  """
  prompt_len = batch.sequences.ids_bt.shape[1] - batch.response_br.shape[1]
  policy = policy_lib.with_trainable(graphdef, base, trainable)
  out = policy_lib.response_outputs(policy, batch.sequences, prompt_len, dropout_key,
                                    values=config.uses_critic)
  logits_brv = _scaled(out.logits_brv, temperature)
  mask_br = batch.response_mask_br.astype(bool)
  logp_br = ppo_math.token_logprobs(logits_brv, batch.response_br)
  pg = ppo_math.policy_loss(logp_br, batch.old_logp_br, batch.advantages_br, mask_br,
                            config.cliprange)
  # Without an entropy bonus the entropy is only reported: no backward pass through it.
  entropy_logits_brv = logits_brv if config.ent_coef else jax.lax.stop_gradient(logits_brv)
  entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(entropy_logits_brv), mask_br)
  loss = pg.loss - config.ent_coef * entropy
  metrics = {"policy/approxkl": pg.approx_kl, "policy/clipfrac": pg.clipfrac,
             "policy/ratio": pg.ratio_mean, "loss/policy": pg.loss, "objective/entropy": entropy}
  if config.uses_critic:
    vf = ppo_math.value_loss(out.values_br, batch.old_values_br, batch.returns_br, mask_br,
                             config.cliprange_value)
    loss = loss + config.vf_coef * vf.loss
    metrics |= {"loss/value": vf.loss, "val/clipfrac": vf.clipfrac,
                "val/vpred": ppo_math.masked_mean(out.values_br, mask_br)}
  else:
    kl = ppo_math.masked_mean(ppo_math.kl_k3(logp_br, batch.ref_logp_br), mask_br)
    loss = loss + kl_coef * kl
    metrics["loss/kl"] = kl
  metrics["loss/total"] = loss
  return loss, (metrics, pg.ratio_mean)


def update_minibatch(state: PPOState, graphdef, base, batch: Batch, dropout_key, *,
                     tx: optax.GradientTransformation, config: PPOConfig,
                     temperature: float) -> tuple[PPOState, dict[str, Array]]:
  """One optimiser step on one minibatch; a non-finite loss or exploding ratio skips it.

  A skipped step leaves parameters and optimiser state exactly as they were and is counted in
  `ppo/skipped`, so one bad batch can neither corrupt the adapters nor pass unnoticed. The
  metrics are `loss_fn`'s token means, `ppo/tokens` (their weight in `mean_metrics`) and the
  step's own `ppo/grad_norm` and `ppo/skipped`.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  value_and_grad = functools.partial(grad_fn, state.trainable, graphdef, base,
                                     kl_coef=state.kl_coef, config=config,
                                     temperature=temperature)
  steps = config.gradient_accumulation_steps
  if steps == 1:
    (loss, (metrics, ratio)), grads = value_and_grad(batch, dropout_key)
  else:
    # Every loss term is a mean over response tokens, so weighting each micro-batch by its
    # share of the tokens makes the sum exactly the whole minibatch's mean and gradient.
    micro = jax.tree.map(lambda x: x.reshape(steps, x.shape[0] // steps, *x.shape[1:]), batch)
    total = jnp.maximum(batch.response_mask_br.sum(), 1).astype(jnp.float32)

    def accumulate(acc, xs):
      micro_batch, key = xs
      out = value_and_grad(micro_batch, key)
      weight = micro_batch.response_mask_br.sum() / total
      return jax.tree.map(lambda a, x: a + weight * x, acc, out), None

    zeros = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(value_and_grad, jax.tree.map(lambda x: x[0], micro),
                                        dropout_key))
    keys = None if dropout_key is None else jax.random.split(dropout_key, steps)
    ((loss, (metrics, ratio)), grads), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (ratio <= config.ratio_threshold)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = PPOState(step=state.step + ok.astype(jnp.int32),
                       trainable=keep(trainable, state.trainable),
                       opt_state=keep(opt_state, state.opt_state), kl_coef=state.kl_coef)
  metrics = metrics | {"ppo/grad_norm": grad_norm, "ppo/skipped": 1.0 - ok.astype(jnp.float32),
                       "ppo/tokens": batch.response_mask_br.sum().astype(jnp.float32)}
  return new_state, metrics


# Metrics of the optimiser step itself; every other update metric is a mean over tokens.
STEP_METRICS = ("ppo/grad_norm", "ppo/skipped")


def mean_metrics(updates: list[dict[str, float]]) -> dict[str, float]:
  """One epoch's (or iteration's) update metrics from each step's: token means weighted by the
  step's response tokens, so that they are the means over all the tokens updated on; the
  step metrics' plain mean over steps."""
  tokens = np.asarray([m["ppo/tokens"] for m in updates], np.float64)
  out = {}
  for name in updates[0]:
    values = np.asarray([m[name] for m in updates], np.float64)
    if name == "ppo/tokens":
      out[name] = float(values.sum())
    elif name in STEP_METRICS:
      out[name] = float(values.mean())
    else:
      # A step without response tokens has NaN means and no weight.
      out[name] = float(np.sum(np.where(tokens > 0, values * tokens, 0.0))
                        / max(tokens.sum(), 1.0))
  return out
