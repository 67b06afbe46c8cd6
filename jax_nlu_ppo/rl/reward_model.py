"""A learned reward model (the paper's section 3.8): the frozen base with its own LoRA adapters and
a scalar head, trained on (prompt, answer) pairs built from labelled rows; PPO can then score its
rollouts with it (`reward.model`) instead of, or beside, the label match.

Every labelled row gives its task's K answers, " {label word} </Judgement>" for each label (the
SFT target without the end of turn, `sft.encode_answers`): the gold one is chosen, the others
rejected. A (prompt, answer) sequence scores r = w . h, h the final hidden state at the answer's
last token (an EOS ending it is not part of it), as `LlamaForSequenceClassification` scores the
last token. Losses (`loss`):

  bradley_terry (default):  L = mean over (row, wrong answer j) of -log sigmoid(r_gold - r_j)
  pointwise:                L = mean over (row, answer j) of BCE(sigmoid(r_j), [j is gold])

Bradley-Terry by default (TRL's RewardTrainer and the InstructGPT recipe): only differences on
one prompt are fitted, so the label balance of the data does not move the scores, and the
comparison is the one PPO draws on. The head is PPO's `ValueHead`, its bias left out of r (a
score of HF's bias-free `score` layer), so the exported classifier computes exactly r.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo import distributed
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.model import sampling as sampling_lib
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.nlu import tasks as tasks_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import run_loop
from jax_nlu_ppo.rl import sft

Array = jax.Array
LOSSES = ("bradley_terry", "pointwise")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig(sft.SFTConfig):
  """SFT's settings (model, adapters, data, prompts, schedule, checkpoints) and the loss.

  One classification task (`data`); `data.label_noise` trains on flipped labels as SFT does.
  """
  loss: str = "bradley_terry"

  def __post_init__(self):
    super().__post_init__()
    if self.loss not in LOSSES:
      raise config_lib.ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
    if self.mixture:
      raise config_lib.ConfigError("a reward model trains on one task (data), not a mixture")
    task = tasks_lib.get_task(self.data.task)
    if task.is_regression:
      raise config_lib.ConfigError(
          f"a reward model ranks a task's answers; {task.name}'s labels are scores, not classes")
    if task.num_labels < 2:
      raise config_lib.ConfigError(f"{task.name} has {task.num_labels} label; a reward model "
                                   "needs a wrong answer to rank below the gold one")


# ----------------------------------------------------------------------------------------------
# Examples -> candidate answers -> batches
# ----------------------------------------------------------------------------------------------


def encode_candidates(tokenizer, task: tasks_lib.Task, example: dict[str, Any], fmt: str,
                      eos_ids: Sequence[int]) -> tuple[list[int], list[list[int]], int]:
  """(prompt ids, every label's answer ids, the gold label) of a labelled example; an answer's
  ids are SFT's target for that label, without the EOS that ends it."""
  prompt, targets = sft.encode_answers(tokenizer, task, example, fmt, eos_ids,
                                       range(task.num_labels))
  answers = [target[:-1] if target[-1] in eos_ids else target for target in targets]
  return prompt, answers, int(example["label"])


@flax.struct.dataclass
class Candidates(sft.Batch):
  """K answers to each of B prompts: `sft.Batch` arrays of shape (B, K, ...), and the gold's k."""
  gold_b: Array


def make_candidates(rows: Sequence[tuple[list[int], list[list[int]], int]], pad_id: int,
                    lengths: tuple[int, int] | None = None) -> Candidates:
  """Host arrays of encoded rows, padded to `lengths` (default: `sft.batch_lengths` of all
  answers)."""
  flat = [(prompt, answer) for prompt, answers, _ in rows for answer in answers]
  batch = sft.make_batch(flat, pad_id, lengths)
  shaped = jax.tree.map(lambda x: x.reshape(len(rows), -1, *x.shape[1:]), batch)
  return Candidates(shaped.tokens_bt, shaped.mask_bt, shaped.target_mask_br,
                    np.asarray([gold for _, _, gold in rows], np.int32))


def candidate_lengths(rows) -> tuple[int, int]:
  return sft.batch_lengths([(p, a) for p, answers, _ in rows for a in answers])


# ----------------------------------------------------------------------------------------------
# Scores and the loss (pure)
# ----------------------------------------------------------------------------------------------


def sequence_scores(model: policy_lib.Policy, sequences: prompts_lib.Prompts, answer_mask_br,
                    dropout_key=None) -> Array:
  """r of each row: the head on the final hidden state of its answer's last token.

  `sequences` are left-padded prompts followed by answers of width R (`answer_mask_br` marks
  the answer tokens, a prefix of each row's R columns, no EOS); a row with no answer token
  scores its prompt's last token.
  """
  prompt_len = sequences.ids_bt.shape[1] - answer_mask_br.shape[1]
  hidden_btd = prompts_lib.hidden_states(model.llama, sequences, dropout_key)
  last_b = prompt_len - 1 - sequences.layout.shared + answer_mask_br.astype(jnp.int32).sum(1)
  h_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0]
  return h_bd.astype(jnp.float32) @ model.value_head.kernel[...]


def candidate_scores(trainable, graphdef, base, batch: Candidates, dropout_key=None) -> Array:
  """(B, K) scores of a `Candidates` batch."""
  b, k, t = batch.tokens_bt.shape
  model = policy_lib.with_trainable(graphdef, base, trainable)
  flat = prompts_lib.Prompts(batch.tokens_bt.reshape(b * k, t), batch.mask_bt.reshape(b * k, t))
  scores = sequence_scores(model, flat, batch.target_mask_br.reshape(b * k, -1), dropout_key)
  return scores.reshape(b, k)


def loss_sums(scores_bk: Array, gold_b: Array, loss: str) -> sft.Sums:
  """The module's L summed over its terms, their count, and summed pair accuracy and margin."""
  k = scores_bk.shape[1]
  gold_bk = jnp.arange(k)[None, :] == gold_b[:, None]
  wrong_bk = ~gold_bk
  margin_bk = jnp.take_along_axis(scores_bk, gold_b[:, None], axis=1) - scores_bk
  if loss == "bradley_terry":
    total = jnp.where(wrong_bk, jax.nn.softplus(-margin_bk), 0.0).sum()
    count = wrong_bk.sum()
  else:
    terms = optax.sigmoid_binary_cross_entropy(scores_bk, gold_bk.astype(jnp.float32))
    total, count = terms.sum(), jnp.asarray(gold_bk.size, jnp.int32)
  pairs = wrong_bk.sum().astype(jnp.float32)
  # Reported per pair whatever the loss: scaled from per-term means back to pair sums.
  per_pair = count.astype(jnp.float32) / pairs
  return sft.Sums(total, count.astype(jnp.int32), {
      "accuracy": jnp.where(wrong_bk, margin_bk > 0, False).sum() * per_pair,
      "margin": jnp.where(wrong_bk, margin_bk, 0.0).sum() * per_pair})


def update(state: sft.SFTState, graphdef, base, batch: Candidates, dropout_key, *,
           tx: optax.GradientTransformation, accumulation_steps: int = 1,
           loss: str = "bradley_terry") -> tuple[sft.SFTState, dict[str, Array]]:
  """One optimiser step on the batch's mean loss; `rm/accuracy` and `rm/margin` are over its
  (row, wrong answer) pairs."""
  def sums(trainable, micro_batch, key):
    return loss_sums(candidate_scores(trainable, graphdef, base, micro_batch, key),
                     micro_batch.gold_b, loss)

  return sft.accumulated_update(state, sums, batch, dropout_key, tx=tx,
                                accumulation_steps=accumulation_steps, prefix="rm")


# ----------------------------------------------------------------------------------------------
# Held-out scores
# ----------------------------------------------------------------------------------------------


def ranking_metrics(scores_nk: np.ndarray, gold_n: np.ndarray) -> dict[str, float]:
  """accuracy: the top-scored answer is the gold one; pairwise_accuracy: over (row, wrong answer)
  pairs, the gold scores higher; auc: a gold answer outscores a wrong one of any row (ties half),
  i.e. whether one threshold on r separates right from wrong answers across prompts."""
  n, k = scores_nk.shape
  gold_nk = np.arange(k)[None, :] == gold_n[:, None]
  gold_scores, wrong_scores = scores_nk[gold_nk], scores_nk[~gold_nk]
  margins = (scores_nk[np.arange(n), gold_n][:, None] - scores_nk)[~gold_nk]
  ranks = _average_ranks(np.concatenate([gold_scores, wrong_scores]))
  u = ranks[:len(gold_scores)].sum() - len(gold_scores) * (len(gold_scores) + 1) / 2
  return {"accuracy": float((scores_nk.argmax(1) == gold_n).mean()),
          "pairwise_accuracy": float((margins > 0).mean()),
          "auc": float(u / (len(gold_scores) * len(wrong_scores))),
          "count": float(n)}


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of `x`, ties sharing their mean rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(1, len(x) + 1)
  values, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=ranks, minlength=len(values))
  return (sums / np.bincount(inverse, minlength=len(values)))[inverse]


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class RewardModelTrainer(sft.SFTTrainer):
  """SFT's loop (data position, checkpoints, resume, periodic evaluation) on candidate batches
  and the ranking loss; `evaluate` scores held-out rows with `ranking_metrics`."""

  config: RewardModelConfig
  skipped_metric = "rm/skipped"

  def _setup(self, initial_trainable) -> sft.Setup:
    rows3 = self.mesh.batch(3)
    return sft.setup(self.lm.graphdef, self.lm.params, self.config, self.mesh, initial_trainable,
                     step=functools.partial(update, loss=self.config.loss),
                     batch_sharding=Candidates(rows3, rows3, rows3, self.mesh.batch(1)))

  def _encode_example(self, task: tasks_lib.Task, example: dict[str, Any]):
    return encode_candidates(self.tokenizer, task, example, self.config.prompt_format,
                             self.lm.eos_ids())

  @staticmethod
  def _length(ids) -> int:
    return len(ids[0]) + max(len(answer) for answer in ids[1])

  def _local_batch(self, rows) -> Candidates:
    lengths = tuple(distributed.max_over_processes(n) for n in candidate_lengths(rows))
    return make_candidates(rows, self.lm.pad_id, lengths)

  @functools.cached_property
  def _score_batch(self) -> Callable:
    """(trainable, base, Candidates) -> (B, K) scores, jitted once over the mesh."""
    graphdef = self.graphdef
    return jax.jit(
        sharding_lib.with_activations(
            self.mesh, lambda trainable, base, batch: candidate_scores(trainable, graphdef,
                                                                       base, batch)),
        in_shardings=(self.mesh.tree(self.state.trainable), self.mesh.tree(self.base),
                      self._batch_sh),
        out_shardings=self.mesh.replicated)

  def scores(self, rows: Sequence[tuple[list[int], list[list[int]], int]]) -> np.ndarray:
    """(N, K) scores of encoded rows under the current adapters, `batch_size` rows at a time
    (each batch padded with copies of its last row to split over the mesh)."""
    out = []
    step = self.config.batch_size
    for begin in range(0, len(rows), step):
      chunk = list(rows[begin:begin + step])
      n = len(chunk)
      chunk += [chunk[-1]] * (-n % self.mesh.batch_ways)
      batch = sharding_lib.place(make_candidates(chunk, self.lm.pad_id), self._batch_sh)
      out.append(np.asarray(self._score_batch(self.state.trainable, self.base, batch))[:n])
    return np.concatenate(out)

  def evaluate(self, examples: Sequence[dict[str, Any]],
               task: str | None = None) -> evaluate_lib.EvalResult:
    """`ranking_metrics` of the current model on labelled `examples` of one task (default: the
    training task); rows it cannot score (unlabelled, too long) are listed as skipped."""
    spec = task or self.config.data.task
    task_obj = tasks_lib.get_task(spec)
    rows, kept, skipped = [], [], []
    limit = self.lm.config.max_position_embeddings
    for i, example in enumerate(examples):
      if not sft.is_labelled(example):
        skipped.append({"idx": example.get("idx", i), "why": "unlabelled"})
        continue
      ids = self._encode_example(task_obj, example)
      if self._length(ids) > limit:
        skipped.append({"idx": example.get("idx", i),
                        "why": f"{self._length(ids)} tokens, more than the context ({limit})"})
        continue
      rows.append(ids)
      kept.append(example)
    if not rows:
      raise ValueError(f"none of the {len(examples)} {spec} rows to evaluate has a label the "
                       "reward model can rank")
    scores_nk = self.scores(rows)
    gold_n = np.asarray([gold for _, _, gold in rows])
    predictions = [{"idx": ex.get("idx", i), "label": int(g), "scores": [float(s) for s in row],
                    "prediction": int(row.argmax())}
                   for i, (ex, g, row) in enumerate(zip(kept, gold_n, scores_nk))]
    return evaluate_lib.EvalResult(task_obj.name, ranking_metrics(scores_nk, gold_n),
                                   predictions, None, lenient=False, skipped=skipped,
                                   settings={"scored_by": "reward model"})


def format_metrics(m: dict[str, float]) -> str:
  """One log line per step."""
  return (f"step {m['iteration']:4d}  loss {m['rm/loss']:.4f}  pair acc {m['rm/accuracy']:.3f}  "
          f"margin {m['rm/margin']:+.3f}  grad_norm {m['rm/grad_norm']:.3f}  "
          f"len {m['tokens/seq_len']}  {m['tokens/per_s']:.0f} tok/s  {m['time/step']:.2f}s")


# ----------------------------------------------------------------------------------------------
# Scoring PPO's rollouts
# ----------------------------------------------------------------------------------------------


def rollout_scores(graphdef, base, trainable, prompts: prompts_lib.Prompts,
                   gen: sampling_lib.Generation, *, eos_ids: tuple[int, ...]) -> Array:
  """r of each rollout row: its prompt and response, the response's EOS left out."""
  answer_mask_br = gen.mask_br.astype(bool) & ~jnp.isin(gen.tokens_br, jnp.asarray(eos_ids))
  model = policy_lib.with_trainable(graphdef, base, trainable)
  return sequence_scores(model, prompts.extended(gen.tokens_br, gen.mask_br), answer_mask_br)


@dataclasses.dataclass
class RolloutScorer:
  """A trained reward model on the policy's mesh: `scorer(prompts, gen)` gives every rollout
  row's score as a global (batch,) array, in one jitted forward sharded like the reference's."""
  path: str
  config: RewardModelConfig
  score: Callable
  base: Any
  trainable: Any

  def __call__(self, prompts: prompts_lib.Prompts, gen: sampling_lib.Generation) -> Array:
    return self.score(self.base, self.trainable, prompts, gen)


def check_run_folder(path: str) -> None:
  """Before anything is loaded: `path` must be a run folder (or step folder) with checkpoints."""
  try:
    run_loop.locate_run(path)
  except checkpoint_lib.CheckpointReadError:
    raise ValueError(f"reward.model {path}: not a run folder of `jax-nlu-ppo reward-model` "
                     "(no checkpoints/ in it)") from None


def rollout_scorer(path: str, lm: pretrained.LanguageModel, mesh: sharding_lib.LogicalMesh, *,
                   prompt_format: str) -> RolloutScorer:
  """The reward model of run folder `path` (its latest good step) on `mesh`, for a policy of
  `lm` (the base it was trained on) whose prompts are written in `prompt_format`."""
  saved = run_loop.saved_run(path)
  kind = run_loop.run_kind(saved.config)
  if kind != "reward_model":
    raise ValueError(f"reward.model {path} is a {kind.upper()} run, not a reward model (train "
                     "one with `jax-nlu-ppo reward-model`)")
  if saved.config.get("prompt_format") != prompt_format:
    raise ValueError(f"reward.model {path} was trained on prompt_format "
                     f"{saved.config.get('prompt_format')!r}, but rollout.prompt_format is "
                     f"{prompt_format!r}: it would score prompts it has never seen")
  # Restored onto `mesh`: its adapters and base are already where the scorer wants them; the
  # trainer (and its optimiser state) is dropped.
  trainer, _ = run_loop.restore_saved(saved, RewardModelConfig, RewardModelTrainer, lm, mesh)
  base, trainable, rows = trainer.base, trainer.state.trainable, mesh.batch(2)
  score = jax.jit(
      sharding_lib.with_activations(mesh, functools.partial(rollout_scores, trainer.graphdef,
                                                            eos_ids=tuple(lm.eos_ids()))),
      in_shardings=(mesh.tree(base), mesh.tree(trainable), rows, rows),
      out_shardings=mesh.batch(1))
  return RolloutScorer(path, trainer.config, score, base, trainable)
