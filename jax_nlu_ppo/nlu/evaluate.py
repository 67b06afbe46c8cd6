"""Evaluation: answer a task's examples, extract the labels, score them with the official metrics.

`evaluate` takes any prompts -> responses function; `evaluate_model` runs a `LanguageModel`
(zero-shot or k-shot, in batches, with progress); `read_sets` reads each task's data from each
location before any model loads, and `evaluate_sets` scores one model on them (`jax-nlu-ppo
eval`; several models go through `eval_grid`); `evaluate_tasks` is both for one model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import random
import time
from typing import Any, Callable, Sequence

import numpy as np

from jax_nlu_ppo import storage
from jax_nlu_ppo.nlu import answer as answer_lib
from jax_nlu_ppo.nlu import data as data_lib
from jax_nlu_ppo.nlu import metrics as metrics_lib
from jax_nlu_ppo.nlu import tasks as tasks_lib

log = logging.getLogger(__name__)

# prompts -> responses (greedy, for example); the model side stays outside `evaluate`.
GenerateFn = Callable[[Sequence[Any]], list[str]]
# (examples answered so far, total): called after each generated batch.
ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass
class EvalResult:
  task: str
  metrics: dict[str, float]           # official metric names, plus unparsed_rate and count
  predictions: list[dict[str, Any]]   # one per scored example: idx, response, parsed label
  confusion: metrics_lib.ConfusionMatrix | None
  lenient: bool
  # Examples that were not scored (e.g. a prompt longer than the model's context), with why.
  skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  # What reading the data kept and skipped (bad rows, with file, line and reason).
  data_report: data_lib.LoadReport | None = None
  # 95% bootstrap intervals of the metrics over the examples (`metrics.bootstrap_intervals`).
  intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    out = {"task": self.task, **self.metrics, "n": len(self.predictions),
           "lenient_parsing": self.lenient, "skipped": len(self.skipped), **self.settings}
    if self.intervals:
      out["intervals_95"] = {name: list(bounds) for name, bounds in self.intervals.items()}
    if self.confusion is not None:
      out["confusion_matrix"] = {"labels": list(self.confusion.label_names),
                                 "counts": self.confusion.counts_kc.tolist()}
    out["skipped_examples"] = self.skipped
    if self.data_report is not None:
      out["data"] = self.data_report.to_json()
    out["predictions"] = self.predictions
    return out

  def metrics_text(self, leave_out: Sequence[str] = ("count",)) -> str:
    """"accuracy 0.8430 [0.821, 0.864]  ...": each metric with its interval when it has one."""
    return "  ".join(
        f"{k} {v:.4f}" + (" [{:.3f}, {:.3f}]".format(*self.intervals[k]) if k in self.intervals
                          else "")
        for k, v in self.metrics.items() if k not in leave_out)

  def summary(self) -> str:
    skipped = f"  skipped {len(self.skipped)}" if self.skipped else ""
    return f"{self.task}: n {len(self.predictions)}  {self.metrics_text()}{skipped}"


SCORINGS = ("generate", "loglik")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How a model is evaluated. `shots` demonstrations per prompt come from a labelled pool (the
  train split): drawn per example with `shot_seed` ("random"), or the pool's first rows for
  every prompt ("first", the paper's 5-shot baseline); `lenient` parsing reads the whole response when the
  closing tag is missing; `random_fallback` replaces unparsed answers by a random label (the
  paper's test-server submissions; off by default, so unparsed answers count as wrong)."""
  shots: int = 0
  shot_seed: int = 0
  shot_selection: str = "random"
  prompt_format: tasks_lib.Format = "chat"
  max_new_tokens: int = 32
  lenient: bool = True
  random_fallback: bool = False
  # "generate": greedy answers, parsed; "loglik": the most likely label answer (nlu/loglik.py),
  # its summed log-probability divided by nothing, its tokens or its characters.
  scoring: str = "generate"
  loglik_normalize: str = "none"

  def __post_init__(self):
    if self.shots < 0:
      raise ValueError(f"shots must be >= 0, got {self.shots}")
    if self.shot_selection not in ("random", "first"):
      raise ValueError(f"shot_selection must be 'random' or 'first', got {self.shot_selection!r}")
    tasks_lib.uses_chat_template(self.prompt_format)  # a known format
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.scoring not in SCORINGS:
      raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
    if self.loglik_normalize not in ("none", "tokens", "chars"):
      raise ValueError("loglik_normalize must be 'none', 'tokens' or 'chars', got "
                       f"{self.loglik_normalize!r}")


def draw_shots(pool: Sequence[dict[str, Any]], k: int, seed: int, count: int,
               selection: str = "random") -> list[list[dict[str, Any]]]:
  """`k` distinct labelled demonstrations for each of `count` examples.

  "random": example i's draw depends only on (seed, i), so a subset or a resumed evaluation
  sees the same prompts as a full one. "first": the pool's first k labelled rows, for all.
  """
  if k == 0:
    return [[] for _ in range(count)]
  labelled = [row for row in pool if row.get("label", -1) != -1]
  if len(labelled) < k:
    raise ValueError(f"{k}-shot prompts need {k} labelled demonstrations; the pool has "
                     f"{len(labelled)}")
  if selection == "first":
    return [labelled[:k]] * count
  return [[labelled[j] for j in np.random.default_rng([seed, i]).choice(
      len(labelled), size=k, replace=False)] for i in range(count)]


def score(task: tasks_lib.Task, examples: Sequence[dict[str, Any]], responses: Sequence[str], *,
          lenient: bool = True, fallback_seed: int | None = None,
          fmt: tasks_lib.Format = "chat") -> EvalResult:
  """Extracts each response's label and scores them against the examples' gold labels."""
  rule = task.extraction_rule(lenient=lenient, fmt=fmt)
  rng = random.Random(fallback_seed) if fallback_seed is not None else None
  fallback = "random" if rng is not None else None
  preds, golds, predictions = [], [], []
  for i, (ex, response) in enumerate(zip(examples, responses, strict=True)):
    extraction = answer_lib.extract(response, rule, fallback=fallback, rng=rng)
    preds.append(extraction.label)
    golds.append(ex["label"])
    predictions.append({"index": i, "idx": ex.get("idx", i), "response": response,
                        "prediction": extraction.label, "status": extraction.status,
                        "label": ex["label"]})
  return scored(task, preds, golds, predictions, lenient)


def scored(task: tasks_lib.Task, preds: Sequence[Any], golds: Sequence[Any],
           predictions: list[dict[str, Any]], lenient: bool) -> EvalResult:
  """`preds` against `golds`: the task's metrics, their bootstrap intervals, the confusion
  matrix."""
  return EvalResult(
      task.name, metrics_lib.compute_metrics(task.metrics, preds, golds), predictions,
      None if task.is_regression else metrics_lib.confusion_matrix(preds, golds,
                                                                   task.label_names),
      lenient, intervals=metrics_lib.bootstrap_intervals(task.metrics, preds, golds))


def evaluate(generate: GenerateFn, task: tasks_lib.Task, examples: Sequence[dict[str, Any]], *,
             fmt: str = "chat", shots: Sequence[dict[str, Any]] = (), lenient: bool = True,
             fallback_seed: int | None = None) -> EvalResult:
  """Scores `generate`'s answers to `examples`, each prompt with the same `shots`.

  `lenient` reads the whole response when the closing tag is missing (the paper's evaluation);
  unparsed answers count as wrong unless `fallback_seed` asks for the paper's random label.
  """
  prompts = [tasks_lib.build_prompt(task, ex, fmt, shots) for ex in examples]
  return score(task, examples, generate(prompts), lenient=lenient, fallback_seed=fallback_seed,
               fmt=fmt)


def evaluate_model(lm, task: tasks_lib.Task | str, examples: Sequence[dict[str, Any]],
                   config: EvalConfig = EvalConfig(), *,
                   shot_pool: Sequence[dict[str, Any]] = (),
                   progress: ProgressFn | None = None) -> EvalResult:
  """Greedy answers of `lm` (a `pretrained.LanguageModel`) to `examples`, scored.

  Unlabelled rows cannot be scored and are refused. A prompt that leaves no room for
  `max_new_tokens` in the model's context is skipped and listed in `result.skipped`, never
  silently truncated.
  """
  from jax_nlu_ppo.model import pretrained  # the model side; the scoring above needs no JAX

  task = tasks_lib.get_task(task)
  unlabelled = [ex.get("idx", i) for i, ex in enumerate(examples) if ex["label"] == -1]
  if unlabelled:
    raise ValueError(f"task {task.name}: {len(unlabelled)} examples have no label (a test "
                     f"split?), e.g. row idx {unlabelled[0]}; evaluate a labelled split")
  chat = tasks_lib.uses_chat_template(config.prompt_format)
  shots = draw_shots(shot_pool, config.shots, config.shot_seed, len(examples),
                     config.shot_selection)
  if config.scoring == "loglik":
    return _evaluate_loglik(lm, task, examples, shots, config, progress)
  limit = lm.config.max_position_embeddings - config.max_new_tokens
  kept, prompts, skipped = [], [], []
  for i, (ex, demos) in enumerate(zip(examples, shots)):
    prompt = tasks_lib.build_prompt(task, ex, config.prompt_format, demos)
    ids = pretrained.render_prompt(lm.tokenizer, prompt, chat)
    length = len(ids)
    if length > limit:
      skipped.append({"idx": ex.get("idx", i), "reason": (
          f"prompt of {length} tokens + {config.max_new_tokens} new tokens exceeds the "
          f"model's {lm.config.max_position_embeddings}-token context")})
      continue
    kept.append(ex)
    prompts.append(ids)
  if not kept:
    raise ValueError(f"task {task.name}: every prompt is too long for the model "
                     f"({skipped[0]['reason'] if skipped else 'no examples'})")
  responses = lm.generate_rendered(prompts, max_new_tokens=config.max_new_tokens,
                                   temperature=0.0, progress=progress)
  result = score(task, kept, responses, lenient=config.lenient,
                 fallback_seed=config.shot_seed if config.random_fallback else None,
                 fmt=config.prompt_format)
  result.skipped = skipped
  result.settings = {"shots": config.shots, "shot_seed": config.shot_seed,
                     "shot_selection": config.shot_selection,
                     "prompt_format": config.prompt_format,
                     "max_new_tokens": config.max_new_tokens,
                     "random_fallback": config.random_fallback, "scoring": "generate"}
  return result


def _evaluate_loglik(lm, task: tasks_lib.Task, examples: Sequence[dict[str, Any]],
                    shots: Sequence[Sequence[dict[str, Any]]], config: EvalConfig,
                    progress: ProgressFn | None) -> EvalResult:
  """`examples` scored by the log-likelihood of each label's answer (nlu/loglik.py): the
  prediction is the most likely answer under `config.loglik_normalize`, never unparsed."""
  from jax_nlu_ppo.nlu import loglik  # the model side, as above

  tasks_lib.check_scoring(task, "loglik")
  choices = loglik.choose(lm, task, examples, shots, config.prompt_format,
                          config.loglik_normalize, progress)
  golds = [examples[i]["label"] for i in choices.kept]
  predictions = [{"index": i, "idx": examples[i].get("idx", i),
                  "response": choices.answers[pred], "prediction": pred, "status": "parsed",
                  "label": gold, "logprobs": [round(float(x), 5) for x in lp],
                  "answer_tokens": [int(t) for t in tokens]}
                 for i, pred, gold, lp, tokens in zip(choices.kept, choices.preds, golds,
                                                      choices.logprob_nc, choices.tokens_nc)]
  result = scored(task, choices.preds, golds, predictions, config.lenient)
  result.skipped = choices.skipped
  result.settings = {"shots": config.shots, "shot_seed": config.shot_seed,
                     "shot_selection": config.shot_selection,
                     "prompt_format": config.prompt_format, "scoring": "loglik",
                     "loglik_normalize": config.loglik_normalize,
                     "answers": list(choices.answers)}
  return result


@dataclasses.dataclass
class EvalSet:
  """A task's examples read from one data location (and its shot pool), ready to score."""
  task: tasks_lib.Task
  data: str | None            # the --data location as given (None: the task's default)
  split: str
  examples: list[dict[str, Any]]
  pool: list[dict[str, Any]]
  report: data_lib.LoadReport
  limit: int | None = None
  shuffle_seed: int | None = None
  offset: int = 0

  @property
  def label(self) -> str:
    """How tables name it: the task, and the data file or split."""
    if self.data and self.data != "hub" and not pathlib.Path(self.data).is_dir():
      return f"{self.task.name} {pathlib.Path(self.data).name}"
    return f"{self.task.name} {self.split}"


def read_sets(task_specs: Sequence[str], config: EvalConfig, *,
              data: Sequence[str | None] = (None,), split: str | None = None,
              limit: int | None = None, shuffle_seed: int | None = None, offset: int = 0,
              strict_data: bool = False, shot_data: str | None = None,
              shot_split: str = "train") -> list[EvalSet]:
  """Each task's examples from each `data` location (forms as `data.data_config_for` takes
  them; None: the task's default), its split by default `tasks.default_eval_split`, and the
  shot pools: read, and the scoring checked, before any model loads, so that a bad name, path
  or file fails in seconds."""
  tasks = [tasks_lib.get_task(spec) for spec in task_specs]
  for task in tasks:
    tasks_lib.check_scoring(task, config.scoring)
  sets = []
  for location in data:
    for spec, task in zip(task_specs, tasks):
      task_split = split or tasks_lib.default_eval_split(task.name)
      examples, report = data_lib.load_checked(data_lib.data_config_for(
          spec, location, task_split, limit, shuffle_seed, strict_data, offset))
      pool = []
      if config.shots:
        pool = data_lib.load_rows(data_lib.data_config_for(
            spec, shot_data or location, shot_split, None, None, strict_data))
      sets.append(EvalSet(task, location, task_split, examples, pool, report, limit,
                          shuffle_seed, offset))
  return sets


def evaluate_sets(lm, sets: Sequence[EvalSet], config: EvalConfig,
                  progress: Callable[[str], ProgressFn] | None = None) -> list[EvalResult]:
  """`evaluate_model` of `lm` on each set; `progress(label)` gives a set's progress function.
  Each result's settings record where its examples came from."""
  results = []
  for s in sets:
    start = time.perf_counter()
    result = evaluate_model(lm, s.task, s.examples, config, shot_pool=s.pool,
                            progress=progress(s.label) if progress else None)
    result.data_report = s.report
    result.settings.update(data=s.data, split=s.split, limit=s.limit,
                           shuffle_seed=s.shuffle_seed, offset=s.offset,
                           seconds=round(time.perf_counter() - start, 2))
    log.info(result.summary())
    results.append(result)
  return results


def evaluate_tasks(task_specs: Sequence[str], config: EvalConfig, load_model: Callable[[], Any],
                   *, data: str | None = None, output: str | None = None,
                   progress: Callable[[str], ProgressFn] | None = None,
                   **read_options) -> list[EvalResult]:
  """Each task's `evaluate_model` result for the model that `load_model()` returns, the data
  read (`read_sets`, with `read_options`) and `output` checked (`check_writable`) before the
  model loads."""
  sets = read_sets(task_specs, config, data=(data,), **read_options)
  if output:
    check_writable(output)
  return evaluate_sets(load_model(), sets, config, progress)


def check_writable(path: str | pathlib.Path) -> None:
  """Fail before hours of work, not after: the output folder must be creatable and writable."""
  reason = storage.unwritable(path)
  if reason is not None:
    raise ValueError(f"--output {path}: cannot write there ({reason})")


def write_json(results: Sequence[EvalResult], path: str | pathlib.Path,
               extra: dict[str, Any] | None = None) -> None:
  """One task: its result object at the top level; several: {"tasks": {name: result}}.

  Written to a temporary file and renamed, so an existing results file is only replaced by a
  complete one.
  """
  if len(results) == 1:
    out = {**(extra or {}), **results[0].to_json()}
  else:
    out = {**(extra or {}), "tasks": {r.task: r.to_json() for r in results}}
  storage.write_text(path, json.dumps(out, indent=1, default=json_default))


def json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"cannot write {type(x).__name__} to JSON")
