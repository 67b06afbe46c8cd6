"""Autoregressive generation as one pure function: prefill, then a `lax.while_loop` over the KV cache.

Prompts are left-padded so that every row's next token goes to the same cache slot; RoPE
positions and the attention mask take the padding into account per row.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax_nlu_ppo.model import decoder
from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.model import prompts as prompts_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@flax.struct.dataclass
class Generation:
  """What a rollout produced; `n` is max_new_tokens."""
  tokens_br: Array    # generated ids; `pad_id` after a row has finished
  mask_br: Array      # True for generated tokens, up to and including the first EOS
  logprobs_br: Array  # log-prob of each token under the distribution it was sampled from
  values_br: Array    # `value_fn` of the hidden state each token was sampled from (or zeros)


def sampling_logprobs(logits_bv: Array, sampling: SamplingConfig) -> Array:
  """Log-probs of the distribution `sample` draws from: temperature, then top-k, then top-p."""
  logits_bv = logits_bv.astype(jnp.float32)
  if sampling.temperature == 0:
    return jax.nn.log_softmax(logits_bv, axis=-1)
  logits_bv = logits_bv / sampling.temperature
  if sampling.top_k > 0:
    kth_b1 = jax.lax.top_k(logits_bv, sampling.top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  if sampling.top_p < 1:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
    # is still below top_p.
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    cutoff_b1 = jnp.min(jnp.where(mass_before_bv < sampling.top_p, sorted_bv, jnp.inf),
                        axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
  return jax.nn.log_softmax(logits_bv, axis=-1)


def first_argmax(x_bv: Array) -> Array:
  """`jnp.argmax` over the last axis (the first maximum), as a max and a min: two reductions
  that XLA's CPU backend vectorises, faster together than its argmax reduction there
  (docs/performance-notes.md)."""
  v = x_bv.shape[-1]
  max_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
  index_b = jnp.min(jnp.where(x_bv == max_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(index_b, v - 1)     # a row of NaNs has no maximum


def sample(logits_bv: Array, key: Array, sampling: SamplingConfig) -> tuple[Array, Array]:
  """(token_b, logprob_b) drawn from `logits_bv`; greedy when temperature is 0.

  Sampling is `jax.random.categorical`'s Gumbel-max draw written out (the same tokens from the
  same key), with `first_argmax`, which XLA's CPU backend runs faster than categorical's argmax
  (docs/performance-notes.md).
  """
  logprobs_bv = sampling_logprobs(logits_bv, sampling)
  if sampling.temperature == 0:
    token_b = first_argmax(logits_bv)
  else:
    token_b = first_argmax(logprobs_bv + jax.random.gumbel(key, logprobs_bv.shape,
                                                           logprobs_bv.dtype))
  return token_b, jnp.take_along_axis(logprobs_bv, token_b[:, None], axis=-1)[:, 0]


def generate(model: decoder.Llama, prompts: prompts_lib.Prompts, key: Array, *,
             max_new_tokens: int, sampling: SamplingConfig, eos_ids: tuple[int, ...],
             pad_id: int, limit: Array | int | None = None, cache_dtype=None,
             value_fn: Callable[[Array], Array] | None = None) -> Generation:
  """Samples up to `max_new_tokens` per row; a row stops at its first EOS, the loop when all have.

  `prompts` are left-padded (mask 0 on padding); the prefill leaves out the columns their
  layout allows (`prompts.prefill`). Everything here is traceable: call it under `jax.jit`
  with `max_new_tokens`, `sampling`, `eos_ids` and `pad_id` static. `limit` (traced) stops
  earlier without a new compile: a run that draws its length per batch (the paper's 12..31)
  keeps one output shape, `max_new_tokens`.
  `value_fn` maps the (batch, hidden) state each token is sampled from to one number per row
  (a critic's value), so a rollout yields log-probs and values without a second forward.
  """
  model = _for_generation(model)
  prompt_mask_bt = prompts.mask_bt
  limit = max_new_tokens if limit is None else jnp.minimum(limit, max_new_tokens)
  b, t = prompts.ids_bt.shape
  hidden_btd, cache = prompts_lib.prefill(model, prompts, t + max_new_tokens,
                                          cache_dtype=cache_dtype)
  key_valid_bs = decoder.cache_slots_valid(prompt_mask_bt, t + max_new_tokens)
  value_fn = value_fn or (lambda hidden_bd: jnp.zeros(hidden_bd.shape[:1], jnp.float32))
  hidden_bd = hidden_btd[:, -1]
  eos_e = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def emit(i, hidden_bd, done_b, tokens_br, mask_br, logprobs_br, values_br, key):
    """Draws token i of every row still going (`i` below `limit`) from `hidden_bd`."""
    key, step_key = jax.random.split(key)
    token_b, logprob_b = sample(model.logits(hidden_bd[:, None])[:, 0], step_key, sampling)
    live_b = ~done_b & (i < limit)
    token_b = jnp.where(live_b, token_b, pad_id).astype(jnp.int32)
    tokens_br = tokens_br.at[:, i].set(token_b)
    mask_br = mask_br.at[:, i].set(live_b)
    logprobs_br = logprobs_br.at[:, i].set(jnp.where(live_b, logprob_b, 0.0))
    values_br = values_br.at[:, i].set(jnp.where(live_b, value_fn(hidden_bd), 0.0))
    done_b = done_b | jnp.isin(token_b, eos_e)
    return token_b, done_b, tokens_br, mask_br, logprobs_br, values_br, key

  # The loop draws a token and runs it through the model for the next one; the last token
  # is drawn after it, since nothing reads the model's output for it (a sixteenth of the
  # decode's forward passes at 16 new tokens).
  def cond(carry):
    i, _, _, _, done_b, *_ = carry
    return (i + 1 < limit) & ~jnp.all(done_b)

  def body(carry):
    i, cache, hidden_bd, position_b, done_b, *outputs = carry
    token_b, done_b, *outputs = emit(i, hidden_bd, done_b, *outputs)
    slot = t + i
    mask_b1s = decoder.attention_mask(key_valid_bs, slot[None])
    hidden_b1d, cache = model(token_b[:, None], position_b[:, None], mask_b1s, cache, slot)
    return (i + 1, cache, hidden_b1d[:, 0], position_b + 1, done_b, *outputs)

  zeros_br = jnp.zeros((b, max_new_tokens), jnp.float32)
  next_position_b = decoder.positions_from_mask(prompt_mask_bt)[:, -1] + 1
  init = (jnp.int32(0), cache, hidden_bd, next_position_b, jnp.zeros((b,), bool),
          jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b, max_new_tokens), bool),
          zeros_br, zeros_br, key)
  i, _, hidden_bd, _, done_b, *outputs = jax.lax.while_loop(cond, body, init)
  # After an early stop (every row done, or a limit of 0) this draws for no row.
  _, _, *outputs, _ = emit(i, hidden_bd, done_b, *outputs)
  return Generation(*outputs)


def _for_generation(model: decoder.Llama) -> decoder.Llama:
  """`model` (sharing its arrays) with its kernels for calls nothing differentiates."""
  copy = nnx.merge(*nnx.split(model))
  copy.kernels = kernels_lib.for_generation(model.kernels)
  return copy
