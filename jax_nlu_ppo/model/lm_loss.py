"""Token negative log-likelihood, the loss of SFT and the measure of perplexity.

    nll_t = logsumexp(z_t) - z_t[y_t]

taken where a mask says the target counts, and carried as a (sum, count) pair: summing pairs
over micro-batches, batches or hosts and dividing once keeps the mean exactly the one over all
counted tokens, however they were split.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jax_nlu_ppo.rl import ppo_math

Array = jax.Array


@flax.struct.dataclass
class NLLSum:
  """Summed NLL of the counted tokens and how many there were (per row, or in all)."""
  nll: Array
  tokens: Array

  def __add__(self, other: NLLSum) -> NLLSum:
    return NLLSum(self.nll + other.nll, self.tokens + other.tokens)

  def mean(self) -> Array:
    """NLL per counted token; 0 (not NaN) where nothing was counted."""
    return self.nll / jnp.maximum(self.tokens, 1)


def token_nll(logits_btv: Array, targets_bt: Array, mask_bt: Array) -> Array:
  """-log softmax(z_t)[y_t] in float32 where `mask_bt`, else 0; (B, T).

  One logsumexp over the vocabulary and one gathered logit per token (`ppo_math.token_logprobs`):
  no (B, T, V) log-softmax is built. Masked-out positions are zeroed with a select, so whatever
  their logits hold never reaches the sum or its gradient.
  """
  return jnp.where(mask_bt.astype(bool), -ppo_math.token_logprobs(logits_btv, targets_bt), 0.0)


def nll_sum(logits_btv: Array, targets_bt: Array, mask_bt: Array, axis=None) -> NLLSum:
  """(sum of `token_nll`, count of counted tokens) over `axis` (all axes when None)."""
  nll = token_nll(logits_btv, targets_bt, mask_bt).sum(axis=axis)
  return NLLSum(nll, mask_bt.astype(jnp.int32).sum(axis=axis))


def next_token_nll(logits_btv: Array, tokens_bt: Array, mask_bt: Array, axis=None) -> NLLSum:
  """Causal LM loss: position t predicts token t + 1, counted when both are real tokens.

  With either padding side the first real token of a row is never predicted (it has no
  context), as in transformers' `labels=input_ids` loss.
  """
  mask_bt = mask_bt.astype(bool)
  return nll_sum(logits_btv[:, :-1], tokens_bt[:, 1:], mask_bt[:, :-1] & mask_bt[:, 1:], axis)
