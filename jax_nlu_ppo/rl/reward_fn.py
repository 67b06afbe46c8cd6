"""A reward of your own: a Python function that scores a rollout, beside or instead of the label.

`reward.function: "package.module:name"` (or `"path/to/file.py:name"`) names it. Each iteration
calls it once on this process's rows, by keyword:

    def brevity(prompts, responses, labels, rows):
      # prompts: the rendered prompt texts the model answered; responses: the decoded answers;
      # labels: the parsed labels (None: unparsed); rows: the data rows (gold `label` included).
      return [-0.1 * len(r.split()) for r in responses]

and each row's reward is `reward.label_weight * label reward + reward.function_weight * value`.
A function that raises, returns another number of values than rows, or a value that is not a
finite number stops the step with a `RewardFunctionError` naming the function and the row: the
iteration has not updated anything yet, and what was saved before stays as it was.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

from jax_nlu_ppo.nlu import answer as answer_lib


class RewardFunctionError(ValueError):
  """A reward function could not be loaded, or its values cannot be used."""


def load(spec: str) -> Callable[..., Sequence[float]]:
  """The function `spec` names: "package.module:name" or "path/to/file.py:name"."""
  where, sep, name = spec.rpartition(":")
  if not sep or not where or not name:
    raise RewardFunctionError(f"reward.function {spec!r}: expected 'package.module:name' or "
                              "'path/to/file.py:name'")
  if where.endswith(".py"):
    path = pathlib.Path(where).expanduser()
    if not path.is_file():
      raise RewardFunctionError(f"reward.function {spec!r}: no such file {path}")
    module_name = f"jax_nlu_ppo_reward_{path.stem}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module     # pickling and dataclasses in the file find it
    try:
      loader.loader.exec_module(module)
    except Exception as e:
      raise RewardFunctionError(f"reward.function {spec!r}: importing {path} failed: "
                                f"{type(e).__name__}: {e}") from e
  else:
    try:
      module = importlib.import_module(where)
    except ImportError as e:
      raise RewardFunctionError(f"reward.function {spec!r}: cannot import {where} ({e})") from e
  fn = getattr(module, name, None)
  if not callable(fn):
    raise RewardFunctionError(f"reward.function {spec!r}: {where} has no function {name!r}")
  return fn


def score(fn: Callable[..., Sequence[float]], spec: str, prompts: Sequence[str],
          responses: Sequence[str], labels: Sequence[Any],
          rows: Sequence[dict[str, Any]]) -> np.ndarray:
  """`fn`'s values for the rows, as float32, once they are known to be one finite number each."""
  try:
    values = fn(prompts=list(prompts), responses=list(responses), labels=list(labels),
                rows=list(rows))
  except Exception as e:
    raise RewardFunctionError(f"reward.function {spec} raised {type(e).__name__}: {e} (on a "
                              f"batch of {len(rows)} rows, the first {_name(rows[0])})") from e
  try:
    values = list(values)
  except TypeError:
    raise RewardFunctionError(f"reward.function {spec} returned {type(values).__name__}, not "
                              f"a sequence of {len(rows)} numbers") from None
  if len(values) != len(rows):
    raise RewardFunctionError(f"reward.function {spec} returned {len(values)} values for "
                              f"{len(rows)} rows")
  out = np.empty(len(rows), np.float32)
  for i, (value, row) in enumerate(zip(values, rows)):
    try:
      out[i] = value = float(value)
    except (TypeError, ValueError):
      raise RewardFunctionError(f"reward.function {spec} returned {value!r} for row {i} "
                                f"({_name(row)}), not a number") from None
    if not math.isfinite(value):
      raise RewardFunctionError(f"reward.function {spec} returned {value} for row {i} "
                                f"({_name(row)}); rewards must be finite")
  return out


def _name(row: dict[str, Any]) -> str:
  """A data row as a user finds it again: its task and `idx`."""
  parts = [f"{k} {row[k]}" for k in ("task", "idx") if k in row]
  return ", ".join(parts) or "a row without idx"


def answer_format(prompts: Sequence[str], responses: Sequence[str],
                  labels: Sequence[Any], rows: Sequence[dict[str, Any]]) -> list[float]:
  """0 for an answer the task's extractor reads a label from, -3 (the label reward's `unparsed`
  default) for one it does not: the answer format rewarded without gold labels, beside a reward
  model that has only seen well-formed answers (`reward.function:
  jax_nlu_ppo.rl.reward_fn:answer_format`)."""
  del prompts, responses, rows
  unparsed = answer_lib.RewardConfig.unparsed
  return [0.0 if label is not None else unparsed for label in labels]
