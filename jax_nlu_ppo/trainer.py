"""The PPO training loop: prompts -> rollout -> reward -> experience -> advantages -> updates.

The host does what is text (prompts, answer extraction, logging); every array step is one of
the pure functions of `ppo`, jitted once here.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nlu_ppo import answer as answer_lib
from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import evaluate as evaluate_lib
from jax_nlu_ppo import policy as policy_lib
from jax_nlu_ppo import ppo as ppo_lib
from jax_nlu_ppo import ppo_math
from jax_nlu_ppo import pretrained
from jax_nlu_ppo import run_loop
from jax_nlu_ppo import sampling as sampling_lib
from jax_nlu_ppo import tasks as tasks_lib
from jax_nlu_ppo import token_reward
from jax_nlu_ppo.config import TrainConfig

log = logging.getLogger(__name__)

EVAL_MAX_NEW_TOKENS = 32
# Rows of each rollout written to samples.jsonl, and the characters of input text kept per row:
# enough to read what the policy says, too few to cost time or disk.
SAMPLES_PER_ITERATION = 4
SAMPLE_TEXT_CHARS = 200


class PPOTrainer:
  """Owns the frozen base, the reference, the `PPOState` and the data position.

  With `config.output_dir` holding checkpoints, it continues from the latest one.
  """

  def __init__(self, config: TrainConfig, lm: pretrained.LanguageModel | None = None,
               train_examples: Sequence[dict[str, Any]] | None = None,
               initial_trainable=None):
    self.config = config
    self.lm = lm or pretrained.load_pretrained(config.model.name, config.model.dtype,
                                               config.model.gguf_file)
    self.tokenizer = self.lm.tokenizer
    # Every row names its task (a mixture tags its rows; a single source is its `data.task`).
    self.tasks = {spec: tasks_lib.get_task(spec) for spec in config.train_tasks}
    self.train_examples = list(train_examples if train_examples is not None
                               else run_loop.load_training_rows(config.data, config.mixture,
                                                                config.seed))
    if not self.train_examples:
      raise ValueError(f"no training examples for {', '.join(self.tasks)}")

    llama = nnx.merge(self.lm.graphdef, self.lm.params)
    policy = policy_lib.make_policy(llama, config.lora, config.value_dropout, config.seed,
                                    critic_lora=config.critic_lora)
    self.graphdef, trainable, self.base = policy_lib.split(policy)
    if initial_trainable is not None:
      nnx.replace_by_pure_dict(trainable, nnx.to_pure_dict(initial_trainable))
    # The KL reference is the starting policy (the base itself for a fresh adapter).
    self.reference = jax.tree.map(jnp.copy, trainable)
    self.tx = ppo_lib.make_optimizer(config.optimizer)
    self.state = ppo_lib.PPOState(step=jnp.int32(0), trainable=trainable,
                                  opt_state=self.tx.init(trainable),
                                  kl_coef=jnp.float32(config.ppo.kl.init_coef))
    self.key = jax.random.key(config.seed)
    self.host_rng = np.random.default_rng(config.seed)
    self.position = 0          # index into train_examples of the next prompt
    self.skipped_rows = 0      # rows whose prompt does not fit the context
    self.iteration = 0
    self.rules = {spec: task.extraction_rule(lenient=config.reward.lenient,
                                             fmt=config.rollout.prompt_format)
                  for spec, task in self.tasks.items()}
    self.matchers = ({spec: token_reward.TokenMatcher.build(rule, self.tokenizer,
                                                            self.lm.eos_ids())
                      for spec, rule in self.rules.items()}
                     if config.reward.extractor == "token" else None)

    r = config.rollout
    self.sampling = sampling_lib.SamplingConfig(r.temperature, r.top_k, r.top_p)
    self._rollout = jax.jit(functools.partial(
        ppo_lib.rollout, max_new_tokens=r.max_new_tokens, sampling=self.sampling,
        eos_ids=self.lm.eos_ids(), pad_id=self.lm.pad_id), static_argnums=0)
    self.reuse_rollout = ppo_lib.reuses_rollout(self.sampling, config.critic_lora)
    self._experience = jax.jit(functools.partial(
        ppo_lib.experience, temperature=r.temperature, values=config.ppo.uses_critic,
        reuse_rollout=self.reuse_rollout), static_argnums=0)
    self._advantages = jax.jit(functools.partial(ppo_lib.advantages, config=config.ppo))
    self._update = jax.jit(functools.partial(ppo_lib.update_minibatch, tx=self.tx,
                                             config=config.ppo, temperature=r.temperature),
                           static_argnums=1, donate_argnums=0)
    self.checkpointer = run_loop.open_checkpoints(self, config, self.lm)

  def task_of(self, example: dict[str, Any]) -> str:
    return run_loop.task_of(example, self.config.train_tasks)

  # --------------------------------------------------------------------------------------------
  def next_examples(self, n: int) -> list[dict[str, Any]]:
    """The next `n` training examples, cycling through the (already shuffled) list.

    A row whose prompt leaves no room for the answer in the model's context is skipped, once
    per pass, with a warning naming it; `skipped_rows` counts them.
    """
    return [example for example, _ in self._next_rows(n)]

  def _next_rows(self, n: int) -> list[tuple[dict[str, Any], list[int]]]:
    """(example, its rendered prompt ids) for the next `n` usable examples."""
    out, misses = [], 0
    while len(out) < n:
      if misses >= len(self.train_examples):
        raise ValueError("no training prompt fits the model's context of "
                         f"{self.lm.config.max_position_embeddings} tokens")
      example = self.train_examples[self.position % len(self.train_examples)]
      self.position += 1
      ids = self._prompt_ids(example)
      if ids is not None:
        out.append((example, ids))
        misses = 0
      else:
        misses += 1
    return out

  def _prompt_ids(self, example: dict[str, Any]) -> list[int] | None:
    """The example's prompt as token ids, or None if it leaves no room for the answer."""
    cfg = self.config.rollout
    prompt = tasks_lib.build_prompt(self.tasks[self.task_of(example)], example,
                                    cfg.prompt_format)
    ids = pretrained.render_prompt(self.tokenizer, prompt,
                                   tasks_lib.uses_chat_template(cfg.prompt_format))
    if len(ids) + cfg.max_new_tokens <= self.lm.config.max_position_embeddings:
      return ids
    if self.position <= len(self.train_examples):   # report each row once, not every pass
      self.skipped_rows += 1
      log.warning("skipping training row idx %s of %s: its prompt has %d tokens, too many for "
                  "%d new tokens in the model's %d-token context", example.get("idx"),
                  self.task_of(example), len(ids), cfg.max_new_tokens,
                  self.lm.config.max_position_embeddings)
    return None

  def step(self) -> dict[str, float]:
    """One PPO iteration; returns its metrics (TRL names where TRL has one)."""
    cfg, times = self.config, {}
    group = cfg.ppo.group_size
    start = time.perf_counter()
    rows = [row for row in self._next_rows(cfg.rollout.batch_size) for _ in range(group)]
    examples = [example for example, _ in rows]
    specs = [self.task_of(ex) for ex in examples]
    prompt_bt, prompt_mask_bt = pretrained.pad_left([ids for _, ids in rows], self.lm.pad_id)
    self.key, rollout_key = jax.random.split(self.key)
    limit = int(self.host_rng.integers(cfg.rollout.min_new_tokens,
                                       cfg.rollout.max_new_tokens + 1))
    gen = self._rollout(self.graphdef, self.base, self.state.trainable, prompt_bt,
                        prompt_mask_bt, rollout_key, limit)
    gen = jax.block_until_ready(gen)
    times["time/rollout"] = time.perf_counter() - start

    start = time.perf_counter()
    golds = [ex["label"] for ex in examples]
    preds, scores_b = self._rewards(gen, specs, golds)
    times["time/reward"] = time.perf_counter() - start

    start = time.perf_counter()
    tokens_bt = jnp.concatenate([prompt_bt, gen.tokens_bn], axis=1)
    mask_bt = jnp.concatenate([prompt_mask_bt, gen.mask_bn.astype(prompt_mask_bt.dtype)], axis=1)
    old_logp, old_values, ref_logp = self._experience(
        self.graphdef, self.base, self.state.trainable, self.reference, tokens_bt, mask_bt, gen)
    adv, returns, kl_bn = self._advantages(scores_b, old_logp, ref_logp, old_values,
                                           gen.mask_bn, self.state.kl_coef)
    batch = ppo_lib.Batch(tokens_bt, mask_bt, gen.tokens_bn, gen.mask_bn, old_logp, ref_logp,
                          old_values, adv, returns)
    jax.block_until_ready(batch)
    times["time/experience"] = time.perf_counter() - start

    start = time.perf_counter()
    n, mb = len(examples), cfg.ppo.minibatch_size
    updates = []
    for _ in range(cfg.ppo.ppo_epochs):
      order = self.host_rng.permutation(n)
      for begin in range(0, n, mb):
        rows = order[begin:begin + mb]
        self.key, dropout_key = jax.random.split(self.key)
        minibatch = jax.tree.map(lambda x, rows=rows: x[rows], batch)
        self.state, metrics = self._update(self.state, self.graphdef, self.base, minibatch,
                                           dropout_key)
        updates.append(metrics)
    update_metrics = {k: float(np.mean([jax.device_get(m[k]) for m in updates]))
                      for k in updates[0]}
    times["time/update"] = time.perf_counter() - start

    # Ziegler's controller sees the mean over samples of each response's summed KL.
    mask_np = np.asarray(gen.mask_bn)
    kl_per_sample = np.asarray(kl_bn).sum(axis=1)
    kl_coef = float(self.state.kl_coef)
    self.state = self.state.replace(kl_coef=ppo_math.kl_coef_update(
        cfg.ppo.kl, self.state.kl_coef, float(kl_per_sample.mean()), n))
    self.iteration += 1

    scores_b = np.asarray(scores_b)
    parsed = np.asarray([p is not None for p in preds])
    correct = np.asarray([p is not None and not self.tasks[spec].is_regression
                          and int(p) == int(g) for spec, p, g in zip(specs, preds, golds)])
    valid = mask_np.astype(bool)
    metrics = {
        "iteration": self.iteration,
        "env/reward_mean": float(scores_b.mean()),
        "env/reward_std": float(scores_b.std()),
        "env/accuracy": float(correct.mean()),
        "env/unparsed_rate": float(1 - parsed.mean()),
        "objective/kl": float(kl_per_sample.mean()),
        "objective/kl_coef": kl_coef,
        "returns/mean": float(np.asarray(returns)[valid].mean()),
        "advantages/mean": float(np.asarray(adv)[valid].mean()),
        "tokens/response_len_mean": float(mask_np.sum(axis=1).mean()),
        "tokens/max_new_tokens": limit,
        "tokens/prompt_len": int(prompt_bt.shape[1]),
        "data/skipped_rows": self.skipped_rows,
        **update_metrics, **times,
    }
    if len(self.tasks) > 1:
      for spec, task in self.tasks.items():
        rows = np.asarray([s == spec for s in specs])
        if rows.any():
          metrics[f"env/accuracy/{task.name}"] = float(correct[rows].mean())
          metrics[f"env/reward_mean/{task.name}"] = float(scores_b[rows].mean())
    metrics["time/step"] = sum(times.values())
    metrics["tokens/per_s"] = float(mask_np.sum()) / times["time/rollout"]
    self.last_generation = gen
    self.last_rows = (examples, specs, preds, scores_b)
    return metrics

  def _rewards(self, gen, specs: Sequence[str], golds: Sequence[float]):
    """Each row's parsed label (None: unparsed) and reward, by its own task's rule."""
    cfg = self.config
    if self.matchers is not None:
      # On device: each task's matcher reads the whole batch, each row keeps its own task's.
      golds_b = jnp.asarray(golds, jnp.int32)
      labels_b = np.full(len(specs), -1, np.int32)
      scores_b = np.zeros(len(specs), np.float32)
      for spec, matcher in self.matchers.items():
        rows = np.asarray([s == spec for s in specs])
        if not rows.any():
          continue
        lenient = self.rules[spec].lenient      # "plain" prompts are always read whole
        labels = token_reward.token_labels(matcher, gen.tokens_bn, gen.mask_bn, lenient=lenient)
        scores = token_reward.token_rewards(matcher, gen.tokens_bn, gen.mask_bn, golds_b,
                                            cfg.reward, lenient=lenient)
        labels_b = np.where(rows, np.asarray(labels), labels_b)
        scores_b = np.where(rows, np.asarray(scores), scores_b)
      return [None if label < 0 else int(label) for label in labels_b], scores_b
    responses = pretrained.decode_responses(self.tokenizer, gen, self.lm.eos_ids())
    preds = [answer_lib.extract(text, self.rules[spec]).label
             for spec, text in zip(specs, responses)]
    scores_b = np.asarray([answer_lib.reward(p, g, regression=self.tasks[spec].is_regression,
                                             config=cfg.reward)
                           for spec, p, g in zip(specs, preds, golds)], np.float32)
    return preds, scores_b

  def last_responses(self) -> list[str]:
    """The decoded answers of the latest rollout (sample generations for logs)."""
    return pretrained.decode_responses(self.tokenizer, self.last_generation, self.lm.eos_ids())

  def samples(self, n: int = SAMPLES_PER_ITERATION) -> list[dict[str, Any]]:
    """The latest rollout's first `n` rows: input text (shortened), response, parsed label (None:
    unparsed), gold and reward; one line each in samples.jsonl."""
    examples, specs, preds, scores_b = self.last_rows
    first = jax.tree.map(lambda x: x[:n], self.last_generation)
    responses = pretrained.decode_responses(self.tokenizer, first, self.lm.eos_ids())
    rows = []
    for ex, spec, response, pred, score in zip(examples, specs, responses, preds, scores_b):
      text = " | ".join(str(ex[c]) for c in self.tasks[spec].input_columns)
      rows.append({"iteration": self.iteration, "task": self.tasks[spec].name,
                   "prompt": text[:SAMPLE_TEXT_CHARS], "response": response,
                   "label": pred, "gold": np.asarray(ex["label"]).item(),
                   "reward": float(score)})
    return rows

  def snapshot(self) -> checkpoint_lib.Snapshot:
    """What a checkpoint holds: the `PPOState`, the KL reference, both random generators' states
    and the data position."""
    return checkpoint_lib.Snapshot(
        arrays={"state": self.state, "reference": self.reference,
                "key": jax.random.key_data(self.key)},
        host={"position": self.position, "iteration": self.iteration,
              "skipped_rows": self.skipped_rows, "host_rng": self.host_rng.bit_generator.state,
              "key_impl": str(jax.random.key_impl(self.key))})

  def load_snapshot(self, snapshot: checkpoint_lib.Snapshot) -> None:
    host = snapshot.host
    self.state, self.reference = snapshot.arrays["state"], snapshot.arrays["reference"]
    self.key = jax.random.wrap_key_data(snapshot.arrays["key"], impl=host["key_impl"])
    self.host_rng.bit_generator.state = host["host_rng"]
    self.position, self.iteration = host["position"], host["iteration"]
    self.skipped_rows = host["skipped_rows"]

  # --------------------------------------------------------------------------------------------
  def policy_model(self) -> pretrained.LanguageModel:
    """The current policy (adapters on) as a `LanguageModel`, for generation and evaluation."""
    return run_loop.adapted_model(self.lm, self.graphdef, self.base, self.state.trainable)

  def evaluate(self, examples: Sequence[dict[str, Any]],
               task: str | None = None) -> evaluate_lib.EvalResult:
    """Greedy answers of the current policy to one task's examples, scored with its metrics.

    `task` defaults to the examples' `task` key, else the (first) training task.
    """
    return run_loop.evaluate_model(self.policy_model(), examples, self.config.train_tasks,
                                   self.config.rollout.prompt_format, task,
                                   max_new_tokens=EVAL_MAX_NEW_TOKENS)

  @property
  def total_steps(self) -> int:
    """`config.steps`, or the iterations that make `config.epochs` passes over the data."""
    return run_loop.total_steps(self.config.steps, self.config.epochs, len(self.train_examples),
                                self.config.rollout.batch_size)

  def train(self, steps: int | None = None,
            on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Runs `steps` more iterations (default: up to `total_steps`, so a continued run completes
    its schedule); writes config.yaml, metrics.jsonl, samples.jsonl and checkpoints if output_dir
    (see `run_loop.run_steps`).
    """
    steps = self.total_steps - self.iteration if steps is None else steps
    return run_loop.run_steps(self, max(steps, 0), self.config.output_dir, on_step,
                              self.checkpointer, samples=self.samples)


def format_metrics(m: dict[str, float]) -> str:
  """One log line per step."""
  return (f"it {m['iteration']:4d}  reward {m['env/reward_mean']:+.3f}  "
          f"acc {m['env/accuracy']:.3f}  unparsed {m['env/unparsed_rate']:.3f}  "
          f"kl {m['objective/kl']:.3f}  beta {m['objective/kl_coef']:.4f}  "
          f"len {m['tokens/response_len_mean']:.1f}  "
          f"rollout {m['time/rollout']:.1f}s exp {m['time/experience']:.1f}s "
          f"update {m['time/update']:.1f}s  skipped {m['ppo/skipped']:.2f}")
