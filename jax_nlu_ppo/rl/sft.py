"""Supervised fine-tuning, the paper's SFT baseline: the gold answer after PPO's own prompt.

The prompt is the one PPO samples from (`tasks.build_prompt`: in the "chat" and "paper" formats
it ends in an open "<Judgement>"); the target is what a correct answer continues it with,
" {label word} </Judgement>" (the bare label word for "plain" prompts) and the end of the turn
as the tokenizer's chat template closes an assistant message ("<|im_end|>" in ChatML), cut
after its EOS token since generation stops there. Only target tokens count:

    L = sum_{b,t} m_bt * -log p(y_bt | prompt_b, y_b,<t) / sum_{b,t} m_bt

LoRA adapters train on the frozen base exactly as in PPO, and the trainable pytree is PPO's
(adapters plus a value head that no loss reads, so it keeps its zero init): an SFT policy is a
PPO run's `initial_trainable` as it is.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import compiles
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import data as data_lib
from jax_nlu_ppo import distributed
from jax_nlu_ppo import run_lock
from jax_nlu_ppo import tracking
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.model import lm_loss
from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import ppo as ppo_lib
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.rl import run_loop
from jax_nlu_ppo.rl import steps as steps_lib
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.nlu import tasks as tasks_lib

log = logging.getLogger(__name__)

Array = jax.Array
# Answers are a few tokens; the default minimum bucket of 16 would mostly compute padding.
_MIN_ANSWER_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  model: config_lib.ModelConfig = config_lib.ModelConfig()
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
  optimizer: ppo_lib.OptimizerConfig = ppo_lib.OptimizerConfig()
  data: data_lib.DataConfig = data_lib.DataConfig(task="sst2", shuffle_seed=0)
  # Several tasks at once: weighted components replace `data` (rows keep their task's prompt).
  mixture: tuple[data_lib.MixtureComponent, ...] = ()
  eval_data: data_lib.DataConfig | None = None
  eval_every: int = 0                        # 0: evaluate eval_data only before and after
  eval_before: bool = True                   # as TrainConfig.eval_before
  eval_scoring: str = "generate"             # as TrainConfig.eval_scoring
  prompt_format: tasks_lib.Format = "chat"   # as PPO's rollout.prompt_format
  batch_size: int = 16                       # examples per optimiser step
  # Each batch runs as this many micro-batches; the step is exactly the whole batch's.
  gradient_accumulation_steps: int = 1
  steps: int = 100
  epochs: float | None = None                # passes over the training set; replaces `steps`
  seed: int = 0
  output_dir: str | None = None              # metrics.jsonl and checkpoints/; a run there continues
  logging: tracking.LoggingConfig = tracking.LoggingConfig()   # W&B beside TensorBoard
  checkpoint: checkpoint_lib.CheckpointConfig = checkpoint_lib.CheckpointConfig()
  max_skipped_steps: int = 3                 # as TrainConfig.max_skipped_steps
  mesh: sharding_lib.MeshConfig = sharding_lib.MeshConfig()
  remat: str = "none"                        # as PPO's: none, full or dots

  def __post_init__(self):
    config_lib.check_eval(self.eval_data, self.eval_every, self.checkpoint,
                          self.eval_scoring)
    config_lib.check_max_skipped(self.max_skipped_steps)
    if self.remat not in model_lib.REMAT_POLICIES:
      raise config_lib.ConfigError(f"remat must be one of {', '.join(model_lib.REMAT_POLICIES)}, "
                                   f"got {self.remat!r}")
    if self.prompt_format not in tasks_lib.FORMATS:
      raise config_lib.ConfigError(f"prompt_format must be one of {', '.join(tasks_lib.FORMATS)}"
                                   f", got {self.prompt_format!r}")
    if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or (
        self.batch_size % self.gradient_accumulation_steps):
      raise config_lib.ConfigError(
          f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide "
          f"batch_size ({self.batch_size}), both >= 1")
    if self.steps < 1:
      raise config_lib.ConfigError(f"steps must be >= 1, got {self.steps}")
    if self.epochs is not None and self.epochs <= 0:
      raise config_lib.ConfigError(f"epochs must be > 0, got {self.epochs}")

  @property
  def train_tasks(self) -> tuple[str, ...]:
    """The task (name or task-file path) of every training source."""
    if self.mixture:
      return tuple(component.data.task for component in self.mixture)
    return (self.data.task,)


# ----------------------------------------------------------------------------------------------
# Examples -> token ids -> batches
# ----------------------------------------------------------------------------------------------


def answer_text(task: tasks_lib.Task, label: int | float, fmt: str = "chat") -> str:
  """What a correct answer writes after the prompt: " Positive </Judgement>" after the open
  tag, or the bare "Positive" as the whole reply to a "plain" prompt."""
  word = task.answer_word(label)
  return word if fmt == "plain" else f" {word} {tasks_lib.CLOSE_TAG}"


def _turn_end(tokenizer, messages: list[dict[str, str]], answer: str) -> str:
  """`answer` and the template's end of the assistant turn, as the template itself writes it.

  The prompt side is rendered as `pretrained.render_prompt` does: a final assistant message is
  a turn left open, otherwise the template's generation prompt opens one.
  """
  open_turn = messages[-1]["role"] == "assistant"
  open_text = tokenizer.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=not open_turn,
                                            continue_final_message=open_turn)
  if open_turn:
    closed = [*messages[:-1], {"role": "assistant", "content": messages[-1]["content"] + answer}]
  else:
    closed = [*messages, {"role": "assistant", "content": answer}]
  closed_text = tokenizer.apply_chat_template(closed, tokenize=False)
  if not closed_text.startswith(open_text):
    raise ValueError("the tokenizer's chat template renders a finished assistant turn that does "
                     "not extend the open one; SFT targets cannot be placed after the prompt "
                     "(use prompt_format=paper)")
  return closed_text[len(open_text):]


def encode_example(tokenizer, task: tasks_lib.Task, example: dict[str, Any], fmt: str,
                   eos_ids: Sequence[int]) -> tuple[list[int], list[int]]:
  """(prompt ids, target ids) of a labelled example.

  The prompt ids are exactly what PPO and evaluation feed the model (`render_prompt`). The
  target is tokenized on its own, as the model must generate it after those ids, and ends with
  the first EOS (appended when the format or template has none).
  """
  prompt_ids, (target_ids,) = encode_answers(tokenizer, task, example, fmt, eos_ids,
                                             [example["label"]])
  return prompt_ids, target_ids


def encode_answers(tokenizer, task: tasks_lib.Task, example: dict[str, Any], fmt: str,
                   eos_ids: Sequence[int], labels: Sequence[int | float]
                   ) -> tuple[list[int], list[list[int]]]:
  """(prompt ids, the target ids of each of `labels`): `encode_example`'s, the prompt rendered
  once."""
  prompt = tasks_lib.build_prompt(task, example, fmt)
  chat = tasks_lib.uses_chat_template(fmt)
  prompt_ids = pretrained.render_prompt(tokenizer, prompt, chat)
  targets = []
  for label in labels:
    answer = answer_text(task, label, fmt)
    target = _turn_end(tokenizer, prompt, answer) if chat else answer
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    ends = [i for i, t in enumerate(target_ids) if t in eos_ids]
    targets.append(target_ids[:ends[0] + 1] if ends else [*target_ids, tokenizer.eos_token_id])
  return prompt_ids, targets


@flax.struct.dataclass
class Batch:
  """[left-padded prompt of static length P | right-padded target of static length R]."""
  tokens_bt: Array
  mask_bt: Array
  target_mask_br: Array    # target tokens that count; its width R fixes P = T - R


def make_batch(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
               lengths: tuple[int, int] | None = None) -> Batch:
  """Host arrays of (prompt, target) id pairs, padded to `lengths` (default: `batch_lengths`)."""
  prompt_len, target_len = lengths or batch_lengths(rows)
  tokens_bt = np.full((len(rows), prompt_len + target_len), pad_id, np.int32)
  mask_bt = np.zeros_like(tokens_bt)
  for row, (prompt, target) in enumerate(rows):
    begin, end = prompt_len - len(prompt), prompt_len + len(target)
    tokens_bt[row, begin:end] = [*prompt, *target]
    mask_bt[row, begin:end] = 1
  return Batch(tokens_bt, mask_bt, mask_bt[:, prompt_len:].copy())


def batch_lengths(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[int, int]:
  """(prompt, target) lengths a batch pads to: both bucketed, so shapes are few."""
  return (prompts_lib.bucket_length(max(len(p) for p, _ in rows)),
          prompts_lib.bucket_length(max(len(t) for _, t in rows), _MIN_ANSWER_BUCKET))


# ----------------------------------------------------------------------------------------------
# The jitted step
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SFTState:
  step: Array
  trainable: Any          # nnx.State of the adapters (+ PPO's value head, unused here)
  opt_state: Any


def target_nll(trainable, graphdef, base, batch: Batch, dropout_key=None) -> lm_loss.NLLSum:
  """Summed NLL of the target tokens under the adapted model, and their count.

  Only the positions that predict target tokens go through the vocabulary projection.
  """
  prompt_len = batch.tokens_bt.shape[1] - batch.target_mask_br.shape[1]
  policy = policy_lib.with_trainable(graphdef, base, trainable)
  out = policy_lib.response_outputs(policy, prompts_lib.Prompts(batch.tokens_bt, batch.mask_bt),
                                    prompt_len, dropout_key, values=False)
  return lm_loss.nll_sum(out.logits_brv, batch.tokens_bt[:, prompt_len:], batch.target_mask_br)


def update(state: SFTState, graphdef, base, batch: Batch, dropout_key, *,
           tx: optax.GradientTransformation,
           accumulation_steps: int = 1) -> tuple[SFTState, dict[str, Array]]:
  """One optimiser step on the batch's token-mean target NLL (the module's L)."""
  def sums(trainable, micro_batch, key):
    nll = target_nll(trainable, graphdef, base, micro_batch, key)
    return Sums(nll.nll, nll.tokens, {})

  state, metrics = accumulated_update(state, sums, batch, dropout_key, tx=tx,
                                      accumulation_steps=accumulation_steps, prefix="sft")
  metrics["sft/tokens"] = metrics.pop("sft/count")
  return state, metrics


@flax.struct.dataclass
class Sums:
  """A micro-batch's loss summed over its terms (target tokens, answer pairs), their count, and
  other sums reported as means over the same count."""
  loss: Array
  count: Array
  reported: dict[str, Array]


def accumulated_update(state: SFTState, sums_fn: Callable[[Any, Any, Any], Sums], batch,
                       dropout_key, *, tx: optax.GradientTransformation,
                       accumulation_steps: int, prefix: str) -> tuple[SFTState, dict[str, Array]]:
  """One optimiser step on sum(loss) / sum(count) over the batch's micro-batches.

  Micro-batches return the gradient of their loss *sum*; the sum over micro-batches divided once
  by the batch's count is the whole batch's mean and its gradient, however the terms fall
  between micro-batches. A non-finite loss or gradient skips the step (counted in
  `<prefix>/skipped`), leaving parameters and optimiser state as they were.
  """
  def summed(trainable, micro_batch, key):
    out = sums_fn(trainable, micro_batch, key)
    return out.loss, out

  grad_fn = jax.value_and_grad(summed, has_aux=True)
  micro = jax.tree.map(lambda x: x.reshape(accumulation_steps, -1, *x.shape[1:]), batch)
  keys = None if dropout_key is None else jax.random.split(dropout_key, accumulation_steps)

  def accumulate(carry, xs):
    total, grad_sum = carry
    (_, out), grads = grad_fn(state.trainable, *xs)
    return (jax.tree.map(jnp.add, total, out), jax.tree.map(jnp.add, grad_sum, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                        jax.eval_shape(sums_fn, state.trainable, first, dropout_key)),
           jax.tree.map(jnp.zeros_like, state.trainable))
  (total, grad_sum), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
  count = jnp.maximum(total.count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / count, grad_sum)
  loss = total.loss / count
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = SFTState(step=state.step + ok.astype(jnp.int32),
                       trainable=keep(trainable, state.trainable),
                       opt_state=keep(opt_state, state.opt_state))
  metrics = {f"{prefix}/loss": loss, f"{prefix}/count": total.count,
             f"{prefix}/grad_norm": grad_norm, f"{prefix}/skipped": 1.0 - ok.astype(jnp.float32),
             **{f"{prefix}/{name}": value / count for name, value in total.reported.items()}}
  return new_state, metrics


@dataclasses.dataclass
class Setup:
  """An SFT run's jitted update and the arrays it starts from, all on the mesh (the peer of
  PPO's `steps.Setup`)."""
  graphdef: Any
  update: Callable          # (state, base, batch, dropout_key) -> (state, metrics); donates state
  base: Any
  state: SFTState
  batch_sharding: Batch


def setup(llama_graphdef, llama_params, config: SFTConfig, mesh: sharding_lib.LogicalMesh,
          initial_trainable=None, *, step: Callable = update, batch_sharding=None) -> Setup:
  """PPO's policy (`policy.policy_split`) on a loaded decoder, placed on `mesh` with
  its optimiser state, and the update that trains it: `step(state, graphdef, base, batch, key,
  *, tx, accumulation_steps)` (default: SFT's `update`) on batches placed as `batch_sharding`
  (default: a `Batch`'s)."""
  graphdef, trainable, base = policy_lib.policy_split(
      llama_graphdef, llama_params, config.lora, value_dropout=0.0, seed=config.seed,
      remat=config.remat, initial_trainable=initial_trainable)
  tx = ppo_lib.make_optimizer(config.optimizer)
  base_sh, trainable_sh = mesh.tree(base), mesh.tree(trainable)
  state_sh = SFTState(step=mesh.replicated, trainable=trainable_sh,
                      opt_state=steps_lib.optimizer_shardings(mesh, tx, trainable))
  base = sharding_lib.place(base, base_sh)
  trainable = sharding_lib.place(trainable, trainable_sh)
  state = sharding_lib.place(
      SFTState(step=np.int32(0), trainable=trainable,
               opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(trainable)),
      state_sh)
  step = functools.partial(step, tx=tx, accumulation_steps=config.gradient_accumulation_steps)
  batch_sh = batch_sharding or Batch(mesh.batch(2), mesh.batch(2), mesh.batch(2))
  jitted = jax.jit(
      sharding_lib.with_activations(
          mesh, lambda state, base, batch, key: step(state, graphdef, base, batch, key)),
      in_shardings=(state_sh, base_sh, batch_sh, mesh.replicated),
      out_shardings=(state_sh, mesh.replicated), donate_argnums=0)
  return Setup(graphdef, jitted, base, state, batch_sh)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class SFTTrainer:
  """Owns the frozen base, the `SFTState` and the data position.

  With `config.output_dir` holding checkpoints, it continues from the latest one.
  """

  skipped_metric = "sft/skipped"

  def __init__(self, config: SFTConfig, lm: pretrained.LanguageModel | None = None,
               train_examples: Sequence[dict[str, Any]] | None = None,
               initial_trainable=None, mesh: sharding_lib.LogicalMesh | None = None):
    self.config = config
    # As PPOTrainer: mesh and batch sizes checked first; each process has its block of rows.
    self.mesh = mesh or sharding_lib.LogicalMesh.create(config.mesh)
    self.mesh.check_batch(config.batch_size // config.gradient_accumulation_steps,
                          "batch_size / gradient_accumulation_steps")
    self.local_batch = distributed.per_process(config.batch_size, "batch_size")
    run_lock.check(config.output_dir)     # another live run in the folder: stop now
    tracking.check(config.logging)
    # Every row names its task (a mixture tags its rows; a single source is its `data.task`).
    self.tasks = {spec: tasks_lib.get_task(spec) for spec in config.train_tasks}
    rows, self.train_examples = run_loop.process_rows(config, self.local_batch, train_examples)
    # Every process checks all rows: one process's block may lack labels, or (restoring a run
    # with a placeholder row) be empty.
    if not any(is_labelled(ex) for ex in rows):
      raise ValueError(f"none of the {len(rows)} training examples of "
                       f"{', '.join(self.tasks)} has a label; SFT needs gold answers")
    self.lm, initial_trainable = run_loop.starting_point(self.mesh, config, lm, initial_trainable)
    if self.lm.tokenizer is None:
      raise ValueError(f"{config.model.name} was loaded without a tokenizer; SFT needs one to "
                       "encode prompts and answers")
    self.tokenizer = self.lm.tokenizer

    run = self._setup(initial_trainable)
    self.graphdef, self._update, self._batch_sh = run.graphdef, run.update, run.batch_sharding
    self.base, self.state = run.base, run.state
    self.key = jax.random.key(config.seed)
    self.position = 0          # index into train_examples of the next example
    self.iteration = 0
    self.skipped: set[int] = set()
    self._encoded: dict[int, tuple[list[int], list[int]]] = {}
    self.checkpointer = run_loop.open_checkpoints(self, config, self.lm)

  def _setup(self, initial_trainable) -> Setup:
    return setup(self.lm.graphdef, self.lm.params, self.config, self.mesh, initial_trainable)

  # --------------------------------------------------------------------------------------------
  def task_of(self, example: dict[str, Any]) -> str:
    return run_loop.task_of(example, self.config.train_tasks)

  def _task(self, spec: str) -> tasks_lib.Task:
    if spec not in self.tasks:       # a row of a task the config does not name
      self.tasks[spec] = tasks_lib.get_task(spec)
    return self.tasks[spec]

  def encode(self, index: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, target ids) of training example `index`, or None if it cannot be used."""
    if index in self._encoded:
      return self._encoded[index]
    if index in self.skipped:
      return None
    example = self.train_examples[index]
    task = self._task(self.task_of(example))
    where = f"training example {index}" + (f" (idx {example['idx']})" if "idx" in example else "")
    problem = None
    if not is_labelled(example):
      problem = f"label {example.get('label')!r}: unlabelled"
    else:
      ids = self._encode_example(task, example)
      limit = self.lm.config.max_position_embeddings
      if self._length(ids) > limit:
        problem = (f"prompt and answer take {self._length(ids)} tokens, more than the "
                   f"model's max_position_embeddings ({limit})")
    if problem is not None:
      self.skipped.add(index)
      log.warning("%s of task %s skipped: %s", where, task.name, problem)
      if len(self.skipped) == len(self.train_examples):
        raise ValueError(f"every one of the {len(self.skipped)} training examples was skipped "
                         "(unlabelled or too long); see the warnings above")
      return None
    self._encoded[index] = ids
    return ids

  def _encode_example(self, task: tasks_lib.Task, example: dict[str, Any]):
    return encode_example(self.tokenizer, task, example, self.config.prompt_format,
                          self.lm.eos_ids())

  @staticmethod
  def _length(ids) -> int:
    """Tokens of an encoded example's longest sequence."""
    return len(ids[0]) + len(ids[1])

  def next_rows(self, n: int) -> list[tuple[list[int], list[int]]]:
    """The next `n` usable examples, encoded, cycling through the (already shuffled) list."""
    rows = []
    while len(rows) < n:
      ids = self.encode(self.position % len(self.train_examples))
      self.position += 1
      if ids is not None:
        rows.append(ids)
    return rows

  def step(self) -> dict[str, float]:
    """One optimiser step on the next `batch_size` examples; returns its metrics."""
    compiled_before = compiles.count()
    start = time.perf_counter()
    local = self._local_batch(self.next_rows(self.local_batch))
    batch = jax.tree.map(distributed.global_batch, local, self._batch_sh)
    self.key, dropout_key = jax.random.split(self.key)
    self.state, metrics = self._update(self.state, self.base, batch, dropout_key)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    seconds = time.perf_counter() - start
    self.iteration += 1
    tokens = distributed.all_rows(np.asarray([local.mask_bt.sum()])).sum()
    return {"iteration": self.iteration, **metrics,
            "tokens/seq_len": int(local.mask_bt.shape[-1]),
            "tokens/per_s": float(tokens) / seconds,
            "data/skipped": len(self.skipped), "time/step": seconds,
            "jit/compilations": compiles.count() - compiled_before}

  def _local_batch(self, rows) -> Batch:
    """This process's rows as host arrays, padded as every process pads them: the global batch
    has one shape."""
    lengths = tuple(distributed.max_over_processes(n) for n in batch_lengths(rows))
    return make_batch(rows, self.lm.pad_id, lengths)

  def snapshot(self) -> checkpoint_lib.Snapshot:
    """What a checkpoint holds: the `SFTState`, the key and the data position."""
    return checkpoint_lib.Snapshot(
        arrays={"state": self.state,
                "key": self.mesh.replicate(jax.random.key_data(self.key))},
        host={"position": self.position, "iteration": self.iteration,
              "skipped": sorted(self.skipped), "key_impl": str(jax.random.key_impl(self.key))})

  def load_snapshot(self, snapshot: checkpoint_lib.Snapshot) -> None:
    host = snapshot.host
    self.state = snapshot.arrays["state"]
    self.key = jax.random.wrap_key_data(snapshot.arrays["key"], impl=host["key_impl"])
    self.position, self.iteration = host["position"], host["iteration"]
    self.skipped = set(host["skipped"])

  # --------------------------------------------------------------------------------------------
  def policy_model(self) -> pretrained.LanguageModel:
    """The current model (adapters on) as a `LanguageModel`, for generation and perplexity."""
    return run_loop.adapted_model(self.lm, self.graphdef, self.base, self.state.trainable,
                                  self.mesh)

  def evaluate(self, examples: Sequence[dict[str, Any]],
               task: str | None = None) -> evaluate_lib.EvalResult:
    """Greedy answers of the current model to one task's examples, scored with its metrics
    (`EvalConfig`'s defaults: lenient parsing, 32 new tokens, unparsed counted as wrong).

    `task` defaults to the examples' `task` key, else the (first) training task.
    """
    return run_loop.evaluate_model(self.policy_model(), examples, self.config.train_tasks,
                                   self.config.prompt_format, task,
                                   scoring=self.config.eval_scoring)

  @property
  def total_steps(self) -> int:
    """`config.steps`, or the steps that make `config.epochs` passes over the data."""
    return run_loop.total_steps(self.config.steps, self.config.epochs, len(self.train_examples),
                                self.config.batch_size)

  def train(self, steps: int | None = None,
            on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Runs `steps` more steps (default: up to `total_steps`, so a continued run completes its
    schedule); writes config.yaml, metrics.jsonl and checkpoints if output_dir (see
    `run_loop.run_steps`).
    """
    steps = self.total_steps - self.iteration if steps is None else steps
    return run_loop.run_steps(self, max(steps, 0), self.config.output_dir, on_step,
                              self.checkpointer)


def is_labelled(example: dict[str, Any]) -> bool:
  """Whether a row has a gold label (not a test row's mark)."""
  # Loaders mark test rows -1 (-1.0 for STS-B, whose gold scores lie in 0..5).
  label = example.get("label")
  return label is not None and float(label) >= 0


def format_metrics(m: dict[str, float]) -> str:
  """One log line per step."""
  return (f"step {m['iteration']:4d}  loss {m['sft/loss']:.4f}  tokens {m['sft/tokens']:4.0f}  "
          f"grad_norm {m['sft/grad_norm']:.3f}  len {m['tokens/seq_len']}  "
          f"{m['tokens/per_s']:.0f} tok/s  {m['time/step']:.2f}s")
