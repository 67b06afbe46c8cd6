"""Evaluation: answer a task's examples, extract the labels, score them with the official metrics."""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

from jax_nlu_ppo import answer as answer_lib
from jax_nlu_ppo import metrics as metrics_lib
from jax_nlu_ppo import tasks as tasks_lib

# prompts -> responses (greedy, for example); the model side stays outside this module.
GenerateFn = Callable[[Sequence[Any]], list[str]]


@dataclasses.dataclass
class EvalResult:
  task: str
  metrics: dict[str, float]           # official metric names, plus unparsed_rate and count
  predictions: list[dict[str, Any]]   # one per example: prompt index, response, parsed label
  confusion: metrics_lib.ConfusionMatrix | None
  lenient: bool

  def to_json(self) -> dict[str, Any]:
    out = {"task": self.task, **self.metrics, "n": len(self.predictions),
           "lenient_parsing": self.lenient, "predictions": self.predictions}
    if self.confusion is not None:
      out["confusion_matrix"] = {"labels": list(self.confusion.label_names),
                                 "counts": self.confusion.counts_kc.tolist()}
    return out


def evaluate(generate: GenerateFn, task: tasks_lib.Task, examples: Sequence[dict[str, Any]], *,
             fmt: str = "chat", shots: Sequence[dict[str, Any]] = (), lenient: bool = True,
             fallback_seed: int | None = None) -> EvalResult:
  """Scores `generate`'s answers to `examples`.

  `lenient` reads the whole response when the closing tag is missing (the paper's evaluation);
  unparsed answers count as wrong unless `fallback_seed` asks for the paper's random label.
  """
  rule = task.extraction_rule(lenient=lenient)
  prompts = [tasks_lib.build_prompt(task, ex, fmt, shots) for ex in examples]
  responses = generate(prompts)
  rng = random.Random(fallback_seed) if fallback_seed is not None else None
  fallback = "random" if rng is not None else None
  preds, golds, predictions = [], [], []
  for i, (ex, response) in enumerate(zip(examples, responses)):
    extraction = answer_lib.extract(response, rule, fallback=fallback, rng=rng)
    preds.append(extraction.label)
    golds.append(ex["label"])
    predictions.append({"index": i, "response": response, "prediction": extraction.label,
                        "status": extraction.status, "label": ex["label"]})
  scores = metrics_lib.compute_metrics(task.metrics, preds, golds)
  confusion = (None if task.is_regression
               else metrics_lib.confusion_matrix(preds, golds, task.label_names))
  return EvalResult(task.name, scores, predictions, confusion, lenient)
