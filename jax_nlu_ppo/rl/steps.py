"""The PPO step functions of `ppo`, jitted once over a mesh with explicit shardings.

Shared by the trainer (which calls them on arrays) and the memory plan (which compiles them on
abstract shapes): both get the same programs, so the plan measures what training will run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
import optax

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
  rows1: jax.sharding.NamedSharding   # (batch,) arrays: rewards
  rows2: jax.sharding.NamedSharding   # (batch, time) arrays: prompts, responses
  generation: sampling_lib.Generation
  batch: ppo_lib.Batch
  replicated: jax.sharding.NamedSharding


@dataclasses.dataclass(frozen=True)
class Steps:
  """rollout(base, trainable, prompt_bt, prompt_mask_bt, key, limit, layout) -> Generation
  experience(base, trainable, reference, prompt_bt, prompt_mask_bt, gen, scores_b, kl_coef,
             layout) -> (Batch, kl_bn)
  minibatch(batch, rows) -> Batch
  update(state, base, batch, dropout_key, layout) -> (state, metrics); `state` is donated.

  `layout` (static, default: rows whole) is the prompts' `prompt_layout.PromptLayout`: the
  shared start all rows have runs once per call instead of once per row, and the shorter half
  of each batch shard's rows skips the padding it does not need. Each layout compiles its own
  programs; a run meets a few (the trainer logs `tokens/shared_prefix` and `tokens/skipped`).
  """
  rollout: Callable
  experience: Callable
  minibatch: Callable
  update: Callable
  shardings: Shardings


def shardings(layout: sharding_lib.Layout, base, trainable,
              tx: optax.GradientTransformation) -> Shardings:
  """Shardings of the steps' arguments from (possibly abstract) `base` and `trainable`."""
  rows1, rows2, rep = layout.batch(1), layout.batch(2), layout.replicated
  trainable_sh = layout.tree(trainable)
  state = ppo_lib.PPOState(step=rep, trainable=trainable_sh,
                           opt_state=layout.tree(jax.eval_shape(tx.init, trainable), strict=False),
                           kl_coef=rep)
  return Shardings(base=layout.tree(base), trainable=trainable_sh, state=state, rows1=rows1,
                   rows2=rows2, generation=sampling_lib.Generation(rows2, rows2, rows2, rows2),
                   batch=ppo_lib.Batch(*[rows2] * len(dataclasses.fields(ppo_lib.Batch))),
                   replicated=rep)


def initial_state(trainable, tx: optax.GradientTransformation, sh: Shardings,
                  kl_coef: float) -> ppo_lib.PPOState:
  """Step 0 on the mesh: every leaf already where the steps expect it, so the second call of a
  step finds the same input shardings as the first and nothing recompiles."""
  opt_state = jax.jit(tx.init, out_shardings=sh.state.opt_state)(trainable)
  return sharding_lib.place(ppo_lib.PPOState(step=np.int32(0), trainable=trainable,
                                             opt_state=opt_state, kl_coef=np.float32(kl_coef)),
                            sh.state)


def build(graphdef, sh: Shardings, tx: optax.GradientTransformation, config: TrainConfig,
          eos_ids: tuple[int, ...], pad_id: int) -> Steps:
  """The four steps, each `jax.jit` with in/out shardings (the graph is closed over)."""
  r, rep = config.rollout, sh.replicated
  sampling = sampling_lib.SamplingConfig(r.temperature, r.top_k, r.top_p)
  rollout = jax.jit(
      functools.partial(ppo_lib.rollout, graphdef, max_new_tokens=r.max_new_tokens,
                        sampling=sampling, eos_ids=eos_ids, pad_id=pad_id),
      in_shardings=(sh.base, sh.trainable, sh.rows2, sh.rows2, rep, rep),
      out_shardings=sh.generation, static_argnums=6)
  experience = jax.jit(
      functools.partial(ppo_lib.experience_batch, graphdef, temperature=r.temperature,
                        values=config.ppo.uses_critic,
                        reuse_rollout=ppo_lib.reuses_rollout(sampling, config.critic_lora),
                        config=config.ppo),
      in_shardings=(sh.base, sh.trainable, sh.trainable, sh.rows2, sh.rows2, sh.generation,
                    sh.rows1, rep),
      out_shardings=(sh.batch, sh.rows2), static_argnums=8)
  minibatch = jax.jit(lambda batch, rows: jax.tree.map(lambda x: x[rows], batch),
                      in_shardings=(sh.batch, rep), out_shardings=sh.batch)

  def update(state, base, batch, key, layout=PromptLayout()):
    # A start run once would give every row the same adapter-dropout masks there.
    layout = layout.without_shared() if config.lora.dropout else layout
    return ppo_lib.update_minibatch(state, graphdef, base, batch, key, tx=tx, config=config.ppo,
                                    temperature=r.temperature, layout=layout)

  update = jax.jit(update, in_shardings=(sh.state, sh.base, sh.batch, rep),
                   out_shardings=(sh.state, rep), donate_argnums=0, static_argnums=4)
  return Steps(rollout, experience, minibatch, update, sh)
