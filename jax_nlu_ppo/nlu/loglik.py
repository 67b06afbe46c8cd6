"""Log-likelihood scoring: each label's answer scored after the prompt, the most likely chosen.

    score(c) = sum_{t in answer c} log p(x_t | prompt, x_<t)

divided by nothing ("none", lm-evaluation-harness's `acc`), by the answer's token count
("tokens") or by its length in characters ("chars", the harness's `acc_norm`). One forward per
(prompt, answer) row and no generation, as the harness scores multiple-choice tasks, so its
numbers and ours compare (scripts/harness_agreement.py, docs/benchmarks.md). Label i's answer
is the text the task's extraction rule reads as i, written as a demonstration writes it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nlu_ppo import distributed
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.nlu import tasks as tasks_lib
from jax_nlu_ppo.rl import ppo_math

# Answers' token windows are rounded up to a multiple of this, so that few shapes compile.
_ANSWER_MULTIPLE = 4


def answer_texts(task: tasks_lib.Task, fmt: tasks_lib.Format) -> tuple[str, ...]:
  """Each label's answer as the model writes it after the prompt: " Positive </Judgement>"
  after the tagged formats' open "<Judgement>" (as in their demonstrations), the bare word
  ("Positive") in the "plain" format's assistant turn."""
  tasks_lib.check_scoring(task, "loglik")
  tasks_lib.uses_chat_template(fmt)  # a known format
  if fmt == "plain":
    return tuple(task.label_words)
  return tuple(f" {word} {tasks_lib.CLOSE_TAG}" for word in task.label_words)


def with_answer(prompt: pretrained.Prompt, answer: str) -> pretrained.Prompt:
  """The prompt with `answer` written after it: appended to a text prompt or an open assistant
  turn, else as a new assistant turn (which `render_prompt` leaves open)."""
  if isinstance(prompt, str):
    return prompt + answer
  last = prompt[-1]
  if last["role"] == "assistant":
    return [*prompt[:-1], {**last, "content": last["content"] + answer}]
  return [*prompt, {"role": "assistant", "content": answer}]


@dataclasses.dataclass(frozen=True)
class ChoiceRows:
  """One prompt's tokens and each answer's tokens after them."""
  prompt: list[int]
  answers: tuple[list[int], ...]


def choice_rows(tokenizer, prompt: pretrained.Prompt, answers: Sequence[str],
                chat: bool) -> ChoiceRows:
  """The prompt's tokens as generation sees them, and each answer's continuation tokens."""
  context = pretrained.render_prompt(tokenizer, prompt, chat)
  continuations = []
  for answer in answers:
    whole = pretrained.render_prompt(tokenizer, with_answer(prompt, answer), chat)
    # The harness's rule: the answer is what tokenizing prompt+answer holds past the prompt's
    # token count; BPE starts a token at " word" and after "\n", so nothing spans the boundary.
    continuation = whole[len(context):]
    if not continuation:
      raise ValueError(f"answer {answer!r} adds no tokens after the prompt")
    continuations.append(continuation)
  return ChoiceRows(context, tuple(continuations))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def answer_logprobs(graphdef, params, prompts: prompts_lib.Prompts, targets_bk: jax.Array,
                    mask_bk: jax.Array, *, mesh=None) -> jax.Array:
  """sum_k mask_bk log p(targets_bk | everything before), per row, in float32.

  `targets_bk` are the last K tokens of each left-padded row (its answer, right-aligned;
  `mask_bk` marks them): only those K positions' logits are computed, not the (B, T, V) ones.
  """
  k = targets_bk.shape[1]
  with sharding_lib.activations(mesh):
    model = nnx.merge(graphdef, params)
    hidden_btd = prompts_lib.hidden_states(model, prompts)
    logits_bkv = model.logits(hidden_btd[:, -k - 1:-1])
  logp_bk = ppo_math.token_logprobs(logits_bkv, targets_bk)
  return jnp.where(mask_bk.astype(bool), logp_bk, 0.0).sum(axis=1)


def score_rows(lm: pretrained.LanguageModel, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Summed log-probability of each (prompt, answer) row's answer, float32, in `rows`' order.

  Rows go by length into the batches generation uses (`prompts.length_batches`: `lm.batch_size`
  rows, `lm.batch_tokens` tokens; a short last batch filled with copies, so that it reuses a
  compiled shape); the start every row of a batch shares (the task's instructions) runs once.
  """
  ways = lm.mesh.batch_ways if lm.mesh is not None else 1
  budget = lm.batch_tokens or pretrained.DEFAULT_TOKENS_PER_ROW * lm.batch_size
  batches = prompts_lib.length_batches([len(p) + len(a) for p, a in rows], lm.batch_size,
                                       budget, 0, ways)
  out = np.zeros(len(rows), np.float32)
  done = 0
  for indices, size in batches:
    fill = size - len(indices) if len(batches) > 1 or lm.mesh is not None else 0
    picked = list(indices) + [indices[0]] * fill
    ids = [list(rows[i][0]) + list(rows[i][1]) for i in picked]
    answer_lens = np.array([len(rows[i][1]) for i in picked])
    # The shared start must end before the token that predicts the first answer token.
    shared = min(prompts_lib.shared_prefix_length(ids), min(len(rows[i][0]) for i in picked) - 1)
    multiple = prompts_lib.SHARED_PREFIX_MULTIPLE
    shared = max(0, shared) // multiple * multiple
    ids_bt, mask_bt = prompts_lib.pad_left(ids, lm.pad_id, shared_prefix=shared)
    k = min(-(-answer_lens.max() // _ANSWER_MULTIPLE) * _ANSWER_MULTIPLE,
            ids_bt.shape[1] - shared - 1)
    arrays = [ids_bt, mask_bt, ids_bt[:, -k:],
              (np.arange(k)[None, :] >= k - answer_lens[:, None]).astype(np.int32)]
    if lm.mesh is not None:
      arrays = [sharding_lib.place(x, lm.mesh.batch(2)) for x in arrays]
    prompts = prompts_lib.Prompts(arrays[0], arrays[1], prompts_lib.PromptLayout(shared=shared))
    logp_b = answer_logprobs(lm.graphdef, lm.params, prompts, arrays[2], arrays[3],
                             mesh=lm.mesh)
    out[indices] = distributed.all_rows(logp_b)[:len(indices)]
    done += len(indices)
    if progress is not None:
      progress(done, len(rows))
  return out


@dataclasses.dataclass(frozen=True)
class Choices:
  """Each kept example's answer scores: `kept` indexes `examples`; the rest are listed in
  `skipped` (too long for the model's context)."""
  answers: tuple[str, ...]
  kept: list[int]
  preds: list[int]
  logprob_nc: np.ndarray  # [kept, choice] summed log-probability of each answer
  tokens_nc: np.ndarray   # [kept, choice] the answer's token count
  skipped: list[dict[str, Any]]


def choose(lm: pretrained.LanguageModel, task: tasks_lib.Task,
           examples: Sequence[dict[str, Any]], shots: Sequence[Sequence[dict[str, Any]]],
           fmt: str, normalize: str = "none",
           progress: Callable[[int, int], None] | None = None) -> Choices:
  """Each example's (with its demonstrations) label answers scored; the prediction is the
  argmax of the `normalize`d score. Examples whose prompt and answer exceed the model's context
  are skipped and listed."""
  answers = answer_texts(task, fmt)
  chat = tasks_lib.uses_chat_template(fmt)
  tokenizer = lm.tokenizer
  if tokenizer is None:
    raise ValueError("log-likelihood scoring needs the model's tokenizer, and this model was "
                     "loaded without one (add tokenizer files to the model folder)")
  context = lm.config.max_position_embeddings
  kept, choice_sets, skipped = [], [], []
  for i, (ex, demos) in enumerate(zip(examples, shots, strict=True)):
    choices = choice_rows(tokenizer, tasks_lib.build_prompt(task, ex, fmt, demos), answers, chat)
    length = len(choices.prompt) + max(len(a) for a in choices.answers)
    if length > context:
      skipped.append({"idx": ex.get("idx", i), "reason": (
          f"prompt and answer of {length} tokens exceed the model's {context}-token context")})
      continue
    kept.append(i)
    choice_sets.append(choices)
  if not kept:
    raise ValueError(f"task {task.name}: every prompt is too long for the model "
                     f"({skipped[0]['reason'] if skipped else 'no examples'})")
  c = len(answers)
  rows = [(s.prompt, a) for s in choice_sets for a in s.answers]
  row_progress = None if progress is None else (lambda done, _: progress(done // c, len(kept)))
  logprob_nc = score_rows(lm, rows, row_progress).reshape(len(kept), c)
  tokens_nc = np.array([[len(a) for a in s.answers] for s in choice_sets], np.float32)
  score_nc = {"none": logprob_nc, "tokens": logprob_nc / tokens_nc,
              "chars": logprob_nc / np.array([len(a) for a in answers], np.float32)
              }[normalize]
  return Choices(answers, kept, [int(p) for p in np.argmax(score_nc, axis=1)], logprob_nc,
                 tokens_nc, skipped)
