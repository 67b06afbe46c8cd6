"""The PPO trainer: its data, prompts and rewards around the iteration of `iteration`.

The host does what is text (prompts, answer extraction, logging); every array step is one of
the pure functions of `ppo`, jitted once by `steps.setup`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_nlu_ppo.nlu import answer as answer_lib
from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import compiles
from jax_nlu_ppo import distributed
from jax_nlu_ppo import run_lock
from jax_nlu_ppo import tracking
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.rl import iteration as iteration_lib
from jax_nlu_ppo.rl import steps as ppo_steps
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompt_layout
from jax_nlu_ppo.model import sampling as sampling_lib
from jax_nlu_ppo.rl import reward_fn
from jax_nlu_ppo.rl import reward_model
from jax_nlu_ppo.rl import run_loop
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.nlu import tasks as tasks_lib
from jax_nlu_ppo.rl import token_reward
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

  skipped_metric = "ppo/skipped"

  def __init__(self, config: TrainConfig, lm: pretrained.LanguageModel | None = None,
               train_examples: Sequence[dict[str, Any]] | None = None,
               initial_trainable=None, mesh: sharding_lib.LogicalMesh | None = None):
    self.config = config
    # The mesh and the batch sizes are checked before anything is loaded or compiled. `mesh`
    # (a mesh over chosen devices) replaces the one `config.mesh` builds over all devices.
    self.mesh = mesh or sharding_lib.LogicalMesh.create(config.mesh)
    self.local_batch = check_mesh(config, self.mesh)
    run_lock.check(config.output_dir)     # another live run in the folder: stop now
    tracking.check(config.logging)
    # Every row names its task (a mixture tags its rows; a single source is its `data.task`).
    self.tasks = {spec: tasks_lib.get_task(spec) for spec in config.train_tasks}
    # A reward function of the user's is imported before anything is loaded or compiled.
    self.reward_function = (reward_fn.load(config.reward.function)
                            if config.reward.function else None)
    if config.reward.model:
      reward_model.check_run_folder(config.reward.model)
    examples, self.train_examples = run_loop.process_rows(config, self.local_batch,
                                                          train_examples)
    if not self.train_examples:
      where = (f" on process {jax.process_index()} of {jax.process_count()} (fewer rows than "
               "one global batch)" if examples else "")
      raise ValueError(f"no training examples for {', '.join(self.tasks)}{where}")
    self.lm, initial_trainable = run_loop.starting_point(self.mesh, config, lm, initial_trainable)
    self.tokenizer = self.lm.tokenizer

    run = ppo_steps.setup(self.lm.graphdef, self.lm.params, config, self.mesh,
                          eos_ids=self.lm.eos_ids(), pad_id=self.lm.pad_id,
                          initial_trainable=initial_trainable)
    self.graphdef, self.steps = run.graphdef, run.steps
    self.reward_model = (reward_model.rollout_scorer(config.reward.model, self.lm, self.mesh,
                                                     prompt_format=config.rollout.prompt_format)
                         if config.reward.model else None)
    self.base, self.reference, self.state = run.base, run.reference, run.state
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

  def _shared_prefix(self, ids: list[list[int]]) -> int:
    """How many first tokens all prompts of the global batch share, to run once (0 when
    `rollout.shared_prefix` is off)."""
    if not self.config.rollout.shared_prefix:
      return 0
    local = prompt_layout.shared_prefix_length(ids)
    return distributed.shared_over_processes(ids[0][:local],
                                             prompt_layout.SHARED_PREFIX_MULTIPLE)

  def _sort_blocks(self) -> int:
    """The blocks of the global batch whose rows are sorted among themselves: one per batch
    shard, so that sorting moves no row to another device (a process's rows are consecutive
    and fill its shards)."""
    return self.mesh.batch_ways

  def _skip(self, ids: list[list[int]], shared: int, length: int) -> int:
    """`PromptLayout.skip` for these rows (sorted by `rollout.sort_by_length`), the smallest
    of every process's."""
    if not self.config.rollout.sort_by_length:
      return 0
    local = prompt_layout.short_half_skip([len(x) for x in ids],
                                          self._sort_blocks() // jax.process_count(), shared,
                                          length)
    return -distributed.max_over_processes(-local)

  def step(self) -> dict[str, float]:
    """One PPO iteration; returns its metrics (TRL names where TRL has one).

    Text work (prompts, answers, rewards) is done by each process for its own rows; array work
    runs on global arrays over the mesh; metrics are over all processes' rows.
    """
    compiled_before = compiles.count()
    start = time.perf_counter()
    examples, ids = self._next_batch()
    prompts = self._prompts(ids)
    prompts_s = time.perf_counter() - start
    specs = [self.task_of(ex) for ex in examples]
    task_names = list(self.tasks)
    task_ids = np.asarray([task_names.index(s) for s in specs])   # whitening, per-task metrics
    golds = [ex["label"] for ex in examples]
    out = iteration_lib.run(self.steps, self.base, self.reference, self.state, prompts,
                            lambda gen, local: self._rewards(prompts, gen, local, specs, golds,
                                                             examples, ids),
                            self.key, self.host_rng, self.config, tasks_b=task_ids)
    self.state, self.key = out.state, out.key
    self.iteration += 1
    metrics = self._metrics(out, prompts, specs, task_ids, golds)
    metrics["time/prompts"] = prompts_s
    metrics["time/step"] = prompts_s + sum(out.times.values())
    # Anything but 0 after the first step is a shape that changed (e.g. a longer prompt bucket).
    metrics["jit/compilations"] = compiles.count() - compiled_before
    self.last_generation = out.local_generation   # this process's rows, on the host
    self.last_batch = out.batch                   # the update's global batch, on the mesh
    self.last_rows = (examples, specs, out.labels, out.scores_b)
    return metrics

  def _next_batch(self) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """This process's rows of the next global batch and their prompt ids: sorted by length
    within each batch shard when `rollout.sort_by_length`, each repeated `ppo.group_size` times."""
    rows = self._next_rows(self.local_batch)
    if self.config.rollout.sort_by_length:
      # Whole groups move, so a prompt's samples stay together.
      rows = [rows[i] for i in prompt_layout.sorted_within_blocks(
          [len(ids) for _, ids in rows], self._sort_blocks() // jax.process_count())]
    rows = [row for row in rows for _ in range(self.config.ppo.group_size)]
    return [example for example, _ in rows], [ids for _, ids in rows]

  def _prompts(self, ids: list[list[int]]) -> prompt_layout.Prompts:
    """Every process's rows as one global, left-padded `Prompts` with their layout."""
    shared = self._shared_prefix(ids)
    # Every process pads to the same length: the global batch has one shape.
    length = distributed.max_over_processes(prompt_layout.padded_length(ids, shared))
    ids_np, mask_np = prompt_layout.pad_left(ids, self.lm.pad_id, length, shared)
    layout = prompt_layout.PromptLayout(shared, self._skip(ids, shared, length),
                                        self._sort_blocks())
    rows = self.mesh.batch(2)
    return prompt_layout.Prompts(distributed.global_batch(ids_np, rows),
                                 distributed.global_batch(mask_np, rows), layout)

  def _metrics(self, out: iteration_lib.Outcome, prompts: prompt_layout.Prompts,
               specs: Sequence[str], task_ids: np.ndarray,
               golds: Sequence[float]) -> dict[str, float]:
    """The iteration's metrics over every process's rows, per task too for a mixture
    (`task_ids`: each of this process's rows' index in `self.tasks`)."""
    parsed = np.asarray([p is not None for p in out.labels])
    correct = np.asarray([p is not None and not self.tasks[spec].is_regression
                          and int(p) == int(g) for spec, p, g in zip(specs, out.labels, golds)])
    all_scores, parsed, correct, task_ids = (distributed.all_rows(x) for x in (
        out.scores_b, parsed, correct, task_ids))
    mask_np = out.response_mask
    valid = mask_np.astype(bool)
    metrics = {
        "iteration": self.iteration,
        "env/reward_mean": float(all_scores.mean()),
        "env/reward_std": float(all_scores.std()),
        "env/accuracy": float(correct.mean()),
        "env/unparsed_rate": float(1 - parsed.mean()),
        "objective/kl": float(out.kl_per_sample.mean()),
        "objective/kl_coef": out.kl_coef,
        "returns/mean": float(distributed.all_rows(out.batch.returns_br)[valid].mean()),
        "advantages/mean": float(distributed.all_rows(out.batch.advantages_br)[valid].mean()),
        "tokens/response_len_mean": float(mask_np.sum(axis=1).mean()),
        "tokens/max_new_tokens": out.limit,
        "tokens/prompt_len": int(prompts.ids_bt.shape[1]),
        "tokens/shared_prefix": prompts.layout.shared,
        "tokens/skipped": prompts.layout.skip,
        "data/skipped_rows": self.skipped_rows,
        **out.update_metrics, **out.times,
    }
    if len(self.last_reward_parts) > 1:
      for part, scores in self.last_reward_parts.items():
        metrics[f"env/{part}_reward_mean"] = float(distributed.all_rows(scores).mean())
    if len(self.tasks) > 1:
      for i, task in enumerate(self.tasks.values()):
        rows = task_ids == i
        if rows.any():
          metrics[f"env/accuracy/{task.name}"] = float(correct[rows].mean())
          metrics[f"env/reward_mean/{task.name}"] = float(all_scores[rows].mean())
    metrics["tokens/per_s"] = float(mask_np.sum()) / out.times["time/rollout"]
    return metrics

  def _rewards(self, prompts: prompt_layout.Prompts, gen: sampling_lib.Generation,
               local: sampling_lib.Generation, specs: Sequence[str], golds: Sequence[float],
               examples: Sequence[dict[str, Any]], ids: Sequence[Sequence[int]]):
    """Each of this process's rows' parsed label (None: unparsed) and reward: its own task's
    label reward, plus the user's reward function's value and the reward model's score (of the
    global rollout `gen`, on the mesh) with their weights when there are."""
    r = self.config.reward
    # Decoded once, for the text extractor and the reward function alike.
    responses = (pretrained.decode_responses(self.tokenizer, local, self.lm.eos_ids())
                 if self.matchers is None or self.reward_function is not None else None)
    preds, label_scores = self._label_rewards(local, responses, specs, golds)
    parts = {"label": label_scores}
    if self.reward_function is not None:
      prompt_texts = self.tokenizer.batch_decode([list(x) for x in ids])
      parts["function"] = reward_fn.score(self.reward_function, r.function, prompt_texts,
                                          responses, preds, examples)
    if self.reward_model is not None:
      parts["model"] = distributed.local_rows(self.reward_model(prompts, gen))
    self.last_reward_parts = parts
    if len(parts) == 1:
      return preds, label_scores
    weights = {"label": r.label_weight, "function": r.function_weight, "model": r.model_weight}
    return preds, sum(weights[k] * v for k, v in parts.items()).astype(np.float32)

  def _label_rewards(self, gen, responses: Sequence[str] | None, specs: Sequence[str],
                     golds: Sequence[float]):
    """Each row's parsed label (None: unparsed) and reward, by its own task's rule: on the
    generated ids with the token extractor, else on the decoded `responses`."""
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
        labels = token_reward.token_labels(matcher, gen.tokens_br, gen.mask_br, lenient=lenient)
        scores = token_reward.token_rewards(matcher, gen.tokens_br, gen.mask_br, golds_b,
                                            cfg.reward, lenient=lenient)
        labels_b = np.where(rows, np.asarray(labels), labels_b)
        scores_b = np.where(rows, np.asarray(scores), scores_b)
      return [None if label < 0 else int(label) for label in labels_b], scores_b
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
                # On the mesh like the rest: a multi-process checkpoint saves only global arrays.
                "key": self.mesh.replicate(jax.random.key_data(self.key))},
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
    return run_loop.adapted_model(self.lm, self.graphdef, self.base, self.state.trainable,
                                  self.mesh)

  def evaluate(self, examples: Sequence[dict[str, Any]],
               task: str | None = None) -> evaluate_lib.EvalResult:
    """Greedy answers of the current policy to one task's examples, scored with its metrics.

    `task` defaults to the examples' `task` key, else the (first) training task.
    """
    return run_loop.evaluate_model(self.policy_model(), examples, self.config.train_tasks,
                                   self.config.rollout.prompt_format, task,
                                   max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                   scoring=self.config.eval_scoring)

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


def check_mesh(config: TrainConfig, mesh: sharding_lib.LogicalMesh) -> int:
  """Prompts per process per iteration, once the batch sizes are known to split over the mesh
  and the processes (checked before any model is loaded)."""
  p, prompts = config.ppo, config.rollout.batch_size
  mesh.check_batch(prompts * p.group_size, "rollout.batch_size x ppo.group_size")
  mesh.check_batch(p.minibatch_size // p.gradient_accumulation_steps,
                     "ppo.minibatch_size / ppo.gradient_accumulation_steps")
  return distributed.per_process(prompts, "rollout.batch_size")


def format_metrics(m: dict[str, float]) -> str:
  """One log line per step."""
  return (f"it {m['iteration']:4d}  reward {m['env/reward_mean']:+.3f}  "
          f"acc {m['env/accuracy']:.3f}  unparsed {m['env/unparsed_rate']:.3f}  "
          f"kl {m['objective/kl']:.3f}  beta {m['objective/kl_coef']:.4f}  "
          f"len {m['tokens/response_len_mean']:.1f}  "
          f"rollout {m['time/rollout']:.1f}s exp {m['time/experience']:.1f}s "
          f"update {m['time/update']:.1f}s  skipped {m['ppo/skipped']:.2f}")
