"""One PPO iteration, written once: rollout -> reward -> experience -> update epochs -> KL
controller.

The trainer runs it on its prompts with the tasks' rewards; the benchmark times it with fixed
rewards. Array work is the jitted steps of `steps`; the host draws the response length and the
minibatches, reads the rewards, and steers the KL coefficient.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jax_nlu_ppo import distributed
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.config import TrainConfig
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.model import sampling as sampling_lib
from jax_nlu_ppo.rl import ppo as ppo_lib
from jax_nlu_ppo.rl import ppo_math
from jax_nlu_ppo.rl import steps as steps_lib

# (The rollout, global on the mesh; this process's rows of it, on the host) -> (each of this
# process's rows' parsed label, None when unparsed; their rewards as float32).
RewardFn = Callable[[sampling_lib.Generation, sampling_lib.Generation],
                    tuple[Sequence[Any], np.ndarray]]


@dataclasses.dataclass
class Outcome:
  """What an iteration did: its new state and key, and what its metrics are read from."""
  state: ppo_lib.PPOState               # after the updates and the KL controller
  key: jax.Array
  limit: int                            # the iteration's max new tokens
  generation: sampling_lib.Generation   # global, on the mesh
  local_generation: sampling_lib.Generation   # this process's rows, on the host
  labels: Sequence[Any]                 # this process's rows, from the reward function
  scores_b: np.ndarray                  # this process's rows
  batch: ppo_lib.Batch                  # the update's global batch
  kl_per_sample: np.ndarray             # every row's summed KL to the reference
  response_mask: np.ndarray             # every row's response mask
  kl_coef: float                        # the coefficient this iteration used
  update_metrics: dict[str, float]
  times: dict[str, float]


def run(steps: steps_lib.Steps, base, reference, state: ppo_lib.PPOState,
        prompts: prompts_lib.Prompts, reward: RewardFn, key: jax.Array,
        host_rng: np.random.Generator, config: TrainConfig,
        tasks_b: np.ndarray | None = None) -> Outcome:
  """One iteration on global `prompts`; `state` is consumed (the update donates it).
  `tasks_b`: this process's rows' task index, below `len(config.train_tasks)` (default: all 0)."""
  times = {}
  key, rollout_key = jax.random.split(key)
  limit = int(host_rng.integers(config.rollout.min_new_tokens, config.rollout.max_new_tokens + 1))
  start = time.perf_counter()
  generation = steps.rollout(base, state.trainable, prompts, rollout_key, limit)
  local_generation = jax.tree.map(distributed.local_rows, jax.block_until_ready(generation))
  times["time/rollout"] = time.perf_counter() - start

  start = time.perf_counter()
  labels, scores_b = reward(generation, local_generation)
  times["time/reward"] = time.perf_counter() - start

  start = time.perf_counter()
  if tasks_b is None:
    tasks_b = np.zeros(len(scores_b), np.int32)
  batch, kl_br = steps.experience(
      base, state.trainable, reference, prompts, generation,
      distributed.global_batch(scores_b, steps.shardings.rows1),
      distributed.global_batch(np.asarray(tasks_b, np.int32), steps.shardings.rows1),
      state.kl_coef)
  jax.block_until_ready(batch)
  times["time/experience"] = time.perf_counter() - start

  start = time.perf_counter()
  state, update_metrics, key = update_epochs(steps, state, base, batch, prompts.layout, key,
                                             host_rng, config.ppo)
  times["time/update"] = time.perf_counter() - start

  kl_per_sample = distributed.all_rows(kl_br).sum(axis=1)
  kl_coef = float(state.kl_coef)
  state = adapt_kl(state, kl_coef, kl_per_sample, batch.response_br.shape[0], config.ppo.kl,
                   steps.shardings.replicated)
  return Outcome(state, key, limit, generation, local_generation, labels, scores_b, batch,
                 kl_per_sample, distributed.all_rows(generation.mask_br), kl_coef,
                 update_metrics, times)


def update_epochs(steps: steps_lib.Steps, state: ppo_lib.PPOState, base, batch: ppo_lib.Batch,
                  layout: prompts_lib.PromptLayout, key: jax.Array,
                  host_rng: np.random.Generator, config: ppo_lib.PPOConfig):
  """`config.ppo_epochs` passes over `batch` in random minibatches (drawn to keep the halves of
  the prompts' `layout`) -> (state, the passes' token-weighted metrics, key)."""
  updates = []
  for _ in range(config.ppo_epochs):
    picks, picked_layout = prompts_lib.minibatches(host_rng, batch.response_br.shape[0],
                                                   config.minibatch_size, layout,
                                                   config.gradient_accumulation_steps)
    for picked in picks:
      key, dropout_key = jax.random.split(key)
      state, metrics = steps.update(state, base, steps.minibatch(batch, picked, picked_layout),
                                    dropout_key)
      updates.append(metrics)
  return state, ppo_lib.mean_metrics(jax.device_get(updates)), key


def adapt_kl(state: ppo_lib.PPOState, kl_coef: float, kl_per_sample: np.ndarray, samples: int,
             config: ppo_math.KLControlConfig, replicated) -> ppo_lib.PPOState:
  """Ziegler's controller: the coefficient after `kl_coef` (the state's, on the host), from the
  mean over samples of each response's summed KL."""
  coef = ppo_math.kl_coef_update(config, kl_coef, float(kl_per_sample.mean()), samples)
  return state.replace(kl_coef=sharding_lib.place(np.asarray(np.float32(coef)), replicated))
