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

from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.model import prompts as prompts_lib

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
  """The adapted decoder and value head; `critic`, when set, is the critic's own adapter set.

  Without `critic` one forward gives log-probs and values (TRL's shared-trunk critic, whose
  value loss also shapes the actor's adapters). With it, values come from a second forward
  through the same frozen base with the critic's adapters, so the two objectives never share
  trainable weights.
  """

  def __init__(self, llama: model_lib.Llama, value_head: ValueHead,
               critic: lora_lib.AdapterSet | None = None):
    self.llama = llama
    self.value_head = value_head
    self.critic = nnx.data(critic)


def make_policy(llama: model_lib.Llama, lora: lora_lib.LoraConfig, value_dropout: float,
                seed: int, critic_lora: bool = False) -> Policy:
  """Adds fresh adapters and a value head (and optionally critic adapters) to a loaded decoder."""
  rngs = nnx.Rngs(seed)
  critic = lora_lib.AdapterSet(llama, lora, rngs) if critic_lora else None
  lora_lib.add_lora(llama, lora, rngs)
  return Policy(llama, ValueHead(llama.config.hidden_size, value_dropout, rngs), critic)


def split(policy: Policy):
  """(graphdef, trainable, base)."""
  return nnx.split(policy, TRAINABLE, ...)


def policy_split(llama_graphdef, llama_params, lora: lora_lib.LoraConfig, *,
                 value_dropout: float, seed: int, critic_lora: bool = False,
                 remat: str = "none", initial_trainable=None):
  """(graphdef, trainable, base) of a trainer's policy on a loaded decoder: fresh adapters and
  value head (or `initial_trainable`'s values), layers rematerialised as `remat` says in the
  backward pass. The loaded decoder itself is not modified."""
  llama = nnx.merge(llama_graphdef, llama_params)
  llama.remat_policy = model_lib.REMAT_POLICIES[remat]
  graphdef, trainable, base = split(make_policy(llama, lora, value_dropout, seed, critic_lora))
  if initial_trainable is not None:
    nnx.replace_by_pure_dict(trainable, nnx.to_pure_dict(initial_trainable))
  return graphdef, trainable, base


@flax.struct.dataclass
class ResponseOutputs:
  """Per response token: the policy's logits over the vocabulary and the critic's value."""
  logits_brv: Array
  values_br: Array


def response_outputs(policy: Policy, sequences: prompts_lib.Prompts, prompt_len: int,
                     dropout_key: Array | None = None, values: bool = True) -> ResponseOutputs:
  """One forward over prompt + response; logits and values where response tokens are predicted.

  `sequences` are left-padded prompts of static length `prompt_len` followed by their responses,
  in the prompts' layout (a shared start not with adapter dropout and a `dropout_key`).
  Position `prompt_len - 1 + i` predicts response token i, so only those positions go through
  the vocabulary projection: the (batch, prompt, vocab) logits are never built. `values=False`
  (critic-free advantages) skips the critic.
  """
  keys = [None] * 4 if dropout_key is None else list(jax.random.split(dropout_key, 4))
  llama = policy.llama

  def response_hidden(key):
    if not lora_lib.applies_dropout(llama):
      key = None    # the same forward; and a shared start is allowed
    hidden_btd = prompts_lib.hidden_states(llama, sequences, key)
    return hidden_btd[:, prompt_len - 1 - sequences.layout.shared:-1]

  hidden_brd = response_hidden(keys[0])
  logits_brv = llama.logits(hidden_brd).astype(jnp.float32)
  if not values:
    return ResponseOutputs(logits_brv, jnp.zeros(logits_brv.shape[:2], jnp.float32))
  if policy.critic is not None:
    with lora_lib.swapped(llama, policy.critic):
      hidden_brd = response_hidden(keys[2])
  return ResponseOutputs(logits_brv, policy.value_head(hidden_brd, keys[1]))


def with_trainable(graphdef, base, trainable) -> Policy:
  return nnx.merge(graphdef, trainable, base)

