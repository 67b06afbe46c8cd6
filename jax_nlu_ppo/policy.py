"""Actor and critic on one frozen base: the LoRA-adapted decoder plus a value head.

The policy is split three ways at every jit boundary: `graphdef` (static structure), `base`
(frozen pretrained weights, shared, never differentiated) and `trainable` (adapters and value
head: what the optimiser updates and checkpoints hold). The reference policy for the KL term is
the same graph with a frozen copy of the starting `trainable` (a fresh adapter has B = 0, so that
copy is exactly the base model; after SFT it is the SFT policy).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax_nlu_ppo import lora as lora_lib
from jax_nlu_ppo import model as model_lib

Array = jax.Array


class ValueHeadParam(nnx.Param):
  """Value-head weights: trained beside the adapters, unlike the base's `nnx.Param`s."""


TRAINABLE = nnx.Any(nnx.LoRAParam, ValueHeadParam)


class ValueHead(nnx.Module):
  """V(s_t) = w . dropout(h_t) + c on the final hidden state (TRL's ValueHead)."""

  def __init__(self, hidden_size: int, dropout: float, rngs: nnx.Rngs):
    # Zero init: the critic starts at V = 0 and learns from the first returns.
    self.kernel = ValueHeadParam(jnp.zeros((hidden_size,), jnp.float32),
                                 out_sharding=("embed",), eager_sharding=False)
    self.bias = ValueHeadParam(jnp.zeros((), jnp.float32), out_sharding=(),
                               eager_sharding=False)
    self.dropout = dropout

  def __call__(self, hidden_btd: Array, dropout_key: Array | None = None) -> Array:
    h = hidden_btd.astype(jnp.float32)
    if dropout_key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(dropout_key, 1 - self.dropout, h.shape)
      h = jnp.where(keep, h / (1 - self.dropout), 0)
    return h @ self.kernel[...] + self.bias[...]


class Policy(nnx.Module):

  def __init__(self, llama: model_lib.Llama, value_head: ValueHead):
    self.llama = llama
    self.value_head = value_head


def make_policy(llama: model_lib.Llama, lora: lora_lib.LoraConfig, value_dropout: float,
                seed: int) -> Policy:
  """Adds fresh adapters and a value head to a loaded decoder (in place)."""
  rngs = nnx.Rngs(seed)
  lora_lib.add_lora(llama, lora, rngs)
  return Policy(llama, ValueHead(llama.config.hidden_size, value_dropout, rngs))


def split(policy: Policy):
  """(graphdef, trainable, base)."""
  return nnx.split(policy, TRAINABLE, ...)


@flax.struct.dataclass
class ResponseOutputs:
  """Per response token: the policy's logits over the vocabulary and the critic's value."""
  logits_bnv: Array
  values_bn: Array


def response_outputs(policy: Policy, tokens_bt: Array, mask_bt: Array, prompt_len: int,
                     dropout_key: Array | None = None) -> ResponseOutputs:
  """One forward over prompt + response; logits and values where response tokens are predicted.

  `tokens_bt` is a left-padded prompt of static length `prompt_len` followed by the response.
  Position `prompt_len - 1 + i` predicts response token i, so only those positions go through
  the vocabulary projection: the (batch, prompt, vocab) logits are never built.
  """
  key_model, key_value = (None, None) if dropout_key is None else jax.random.split(dropout_key)
  llama = policy.llama
  hidden_btd, _ = llama(tokens_bt, model_lib.positions_from_mask(mask_bt),
                        model_lib.attention_mask(mask_bt, jnp.arange(tokens_bt.shape[1])),
                        dropout_key=key_model)
  hidden_bnd = hidden_btd[:, prompt_len - 1:-1]
  return ResponseOutputs(llama.logits(hidden_bnd).astype(jnp.float32),
                         policy.value_head(hidden_bnd, key_value))


def with_trainable(graphdef, base, trainable) -> Policy:
  return nnx.merge(graphdef, trainable, base)

