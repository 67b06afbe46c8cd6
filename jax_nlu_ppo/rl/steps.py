"""The PPO step functions of `ppo`, jitted once over a mesh with explicit shardings, and the
arrays they start from.

`setup` is the one place a PPO run is built: policy split -> optimiser -> shardings -> placement
-> KL reference -> initial state -> jitted steps. The trainer and the benchmark call it; the
memory plan calls `build` on abstract shapes. All get the same programs, so the benchmark times
and the plan measures what training runs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import ppo as ppo_lib
from jax_nlu_ppo.model import sampling as sampling_lib
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.config import TrainConfig
from jax_nlu_ppo.model.prompts import PromptLayout


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Where every input and output of the steps lives."""
  base: Any               # frozen weights, split by their logical names
  trainable: Any          # adapters and value head (also the KL reference)
  state: ppo_lib.PPOState
  rows1: jax.sharding.NamedSharding   # (batch,) arrays: rewards, task indices
  rows2: jax.sharding.NamedSharding   # (batch, time) arrays: prompts, responses, batches
  replicated: jax.sharding.NamedSharding


@dataclasses.dataclass(frozen=True)
class Steps:
  """rollout(base, trainable, prompts, key, limit) -> Generation
  experience(base, trainable, reference, prompts, gen, scores_b, tasks_b, kl_coef)
      -> (Batch, kl_br); tasks_b: each row's task index, below `len(config.train_tasks)`
  minibatch(batch, rows, layout) -> Batch
  update(state, base, batch, dropout_key) -> (state, metrics); `state` is donated.

  The prompts' layout (`prompts.PromptLayout`, static in `Prompts` and in the batch) lets the
  shared start all rows have run once per call instead of once per row, and the shorter half of
  each batch shard's rows skip the padding it does not need. Each layout compiles its own
  programs; a run meets a few (the trainer logs `tokens/shared_prefix` and `tokens/skipped`).
  """
  rollout: Callable
  experience: Callable
  minibatch: Callable
  update: Callable
  shardings: Shardings
  tx: optax.GradientTransformation


@dataclasses.dataclass
class Setup:
  """A PPO run's steps and the arrays they start from, all on the mesh."""
  graphdef: Any           # the policy's structure (decoder, adapters, value head)
  steps: Steps
  base: Any               # the frozen weights
  reference: Any          # the KL reference: the starting trainable values
  state: ppo_lib.PPOState


def setup(llama_graphdef, llama_params, config: TrainConfig, mesh: sharding_lib.LogicalMesh, *,
          eos_ids: tuple[int, ...], pad_id: int, initial_trainable=None) -> Setup:
  """The policy of `config` on a loaded decoder (fresh adapters and value head, or
  `initial_trainable`'s values), placed on `mesh` with its optimiser state, and the
  steps that train it."""
  graphdef, trainable, base = policy_lib.policy_split(
      llama_graphdef, llama_params, config.lora, value_dropout=config.value_dropout,
      seed=config.seed, critic_lora=config.critic_lora, remat=config.remat,
      initial_trainable=initial_trainable)
  steps = build(graphdef, base, trainable, config, mesh, eos_ids, pad_id)
  sh = steps.shardings
  base, trainable = sharding_lib.place(base, sh.base), sharding_lib.place(trainable, sh.trainable)
  # The KL reference is the starting policy (the base itself for a fresh adapter).
  reference = jax.tree.map(jnp.copy, trainable)
  state = initial_state(trainable, steps.tx, sh, config.ppo.kl.init_coef)
  return Setup(graphdef, steps, base, reference, state)


def shardings(mesh: sharding_lib.LogicalMesh, base, trainable,
              tx: optax.GradientTransformation) -> Shardings:
  """Shardings of the steps' arguments from (possibly abstract) `base` and `trainable`."""
  rows1, rows2, rep = mesh.batch(1), mesh.batch(2), mesh.replicated
  trainable_sh = mesh.tree(trainable)
  state = ppo_lib.PPOState(step=rep, trainable=trainable_sh,
                           opt_state=optimizer_shardings(mesh, tx, trainable), kl_coef=rep)
  return Shardings(base=mesh.tree(base), trainable=trainable_sh, state=state, rows1=rows1,
                   rows2=rows2, replicated=rep)


def optimizer_shardings(mesh: sharding_lib.LogicalMesh, tx: optax.GradientTransformation,
                        trainable) -> Any:
  """The optimiser state's shardings: each moment split like its parameter, the rest (counts,
  factored statistics of other shapes) replicated."""
  return mesh.tree(jax.eval_shape(tx.init, trainable), strict=False)


def initial_state(trainable, tx: optax.GradientTransformation, sh: Shardings,
                  kl_coef: float) -> ppo_lib.PPOState:
  """Step 0 on the mesh: every leaf already where the steps expect it, so the second call of a
  step finds the same input shardings as the first and nothing recompiles."""
  opt_state = jax.jit(tx.init, out_shardings=sh.state.opt_state)(trainable)
  return sharding_lib.place(ppo_lib.PPOState(step=np.int32(0), trainable=trainable,
                                             opt_state=opt_state, kl_coef=np.float32(kl_coef)),
                            sh.state)


def build(graphdef, base, trainable, config: TrainConfig, mesh: sharding_lib.LogicalMesh,
          eos_ids: tuple[int, ...], pad_id: int) -> Steps:
  """The optimiser and the four steps, each `jax.jit` with in/out shardings (the graph is closed
  over), tracing the model's activation constraints for `mesh`. `base` and `trainable`
  may be abstract (shapes): only their structure is read. Arrays of one row per sample take
  their batch sharding whole (`Prompts`, `Generation` and `Batch` alike)."""
  tx = ppo_lib.make_optimizer(config.optimizer)
  sh = shardings(mesh, base, trainable, tx)
  r, rep, rows = config.rollout, sh.replicated, sh.rows2
  sampling = sampling_lib.SamplingConfig(r.temperature, r.top_k, r.top_p)
  rollout = jax.jit(
      sharding_lib.with_activations(mesh, functools.partial(
          ppo_lib.rollout, graphdef, max_new_tokens=r.max_new_tokens, sampling=sampling,
          eos_ids=eos_ids, pad_id=pad_id)),
      in_shardings=(sh.base, sh.trainable, rows, rep, rep), out_shardings=rows)
  experience = jax.jit(
      sharding_lib.with_activations(mesh, functools.partial(
          ppo_lib.experience_batch, graphdef, temperature=r.temperature,
          values=config.ppo.uses_critic,
          reuse_rollout=ppo_lib.reuses_rollout(sampling, config.critic_lora),
          config=config.ppo, num_tasks=len(config.train_tasks))),
      in_shardings=(sh.base, sh.trainable, sh.trainable, rows, rows, sh.rows1, sh.rows1, rep),
      out_shardings=(rows, rows))
  take = jax.jit(lambda batch, picked: jax.tree.map(lambda x: x[picked], batch),
                 in_shardings=(rows, rep), out_shardings=rows)

  def minibatch(batch: ppo_lib.Batch, picked, layout: PromptLayout) -> ppo_lib.Batch:
    """The `picked` rows of `batch`, laid out by `layout` (one program whatever the layout)."""
    batch = take(_laid_out(batch, PromptLayout()), picked)
    return _laid_out(batch, layout)

  def update(state, base, batch, key):
    if config.lora.dropout:
      # A start run once would give every row the same adapter-dropout masks there.
      batch = _laid_out(batch, batch.sequences.layout.without_shared())
    return ppo_lib.update_minibatch(state, graphdef, base, batch, key, tx=tx, config=config.ppo,
                                    temperature=r.temperature)

  update = jax.jit(sharding_lib.with_activations(mesh, update),
                   in_shardings=(sh.state, sh.base, rows, rep), out_shardings=(sh.state, rep),
                   donate_argnums=0)
  return Steps(rollout, experience, minibatch, update, sh, tx)


def _laid_out(batch: ppo_lib.Batch, layout: PromptLayout) -> ppo_lib.Batch:
  return batch.replace(sequences=batch.sequences.replace(layout=layout))
