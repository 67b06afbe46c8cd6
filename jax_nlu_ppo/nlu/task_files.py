"""Custom tasks from YAML files: bring a classification or rating data set without code.

    name: movie-reviews
    instruction: Decide whether the review is positive or negative.
    inputs:                      # data column -> how the prompt introduces it
      text: Review
    labels:                      # value in the label column -> the word the model answers
      neg: Negative
      pos: Positive
    metrics: [accuracy, macro_f1]
    data:
      files: {train: reviews_train.jsonl, validation: reviews_dev.jsonl}  # beside this file
      columns: {label: sentiment}  # task column -> the file's column, where they differ

Optional keys: `template` (a `str.format` string over the input columns, replacing the
"Title: text" lines), `case_sensitive` (default false: custom label words are matched in any
case), `regression: {min: 0, max: 5}` instead of `labels` (the answer is the first number;
metrics default to pearson and spearman), and `data.hub` / `data.config` / `data.splits` for a
dataset on the Hugging Face hub (split name -> the hub's split name). Data files may be csv,
tsv, json, jsonl, parquet or `save_to_disk` folders, as `data.load_file` reads them.

`load_task` gives the checked fields of the file's `tasks.Task`, which `tasks.get_task` builds:
the dependency runs one way, tasks on task files.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import string
from collections.abc import Collection
from typing import Any

import yaml

from jax_nlu_ppo.nlu import metrics as metrics_lib

_KEYS = {"name", "instruction", "inputs", "template", "labels", "regression", "metrics",
         "case_sensitive", "data"}
_DATA_KEYS = {"files", "hub", "config", "splits", "columns"}


class TaskFileError(ValueError):
  """A task YAML that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Where a custom task's rows live: local files per split, or a hub dataset."""
  files: tuple[tuple[str, str], ...] = ()        # (split, absolute path)
  hub: str | None = None
  hub_config: str | None = None
  hub_splits: tuple[tuple[str, str], ...] = ()   # (our split, the hub's split)
  columns: tuple[tuple[str, str], ...] = ()      # (task column, source column)

  @property
  def column_map(self) -> dict[str, str]:
    return dict(self.columns)

  def file(self, split: str) -> str | None:
    return dict(self.files).get(split)

  def hub_split(self, split: str) -> str:
    return dict(self.hub_splits).get(split, split)


@functools.lru_cache(maxsize=64)
def _load_cached(path: str, mtime: float, glue_names: tuple[str, ...]) -> dict[str, Any]:
  del mtime  # part of the cache key only: an edited file is read again
  return parse_task(_read(pathlib.Path(path)), pathlib.Path(path), glue_names)


def load_task(path: str | pathlib.Path, glue_names: Collection[str]) -> dict[str, Any]:
  """The `tasks.Task` fields a YAML file defines (read once per file version); the task may
  not take one of `glue_names`."""
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise TaskFileError(f"task file {path} does not exist")
  return dict(_load_cached(str(path), path.stat().st_mtime, tuple(glue_names)))


def _read(path: pathlib.Path) -> dict[str, Any]:
  try:
    values = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise TaskFileError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(values, dict):
    raise TaskFileError(f"{path}: the top level must be a mapping of task keys")
  return values


def parse_task(values: dict[str, Any], path: pathlib.Path,
               glue_names: Collection[str]) -> dict[str, Any]:
  """The `tasks.Task` fields of a task file's contents; `path` names the file in errors and
  anchors data."""
  def fail(key: str, message: str):
    raise TaskFileError(f"{path}: {key}: {message}")

  unknown = sorted(set(values) - _KEYS)
  if unknown:
    fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
  for key in ("name", "instruction", "inputs"):
    if key not in values:
      fail(key, "missing (a task file needs name, instruction, inputs, and labels or "
                "regression)")
  name, instruction = values["name"], values["instruction"]
  if not isinstance(name, str) or not name.strip():
    fail("name", f"expected a non-empty string, got {name!r}")
  if name in glue_names:
    fail("name", f"{name!r} is a GLUE task's name; choose another")
  if not isinstance(instruction, str) or not instruction.strip():
    fail("instruction", f"expected a non-empty string, got {instruction!r}")

  inputs = values["inputs"]
  if isinstance(inputs, list):
    inputs = {column: column for column in inputs}
  if not isinstance(inputs, dict) or not inputs:
    fail("inputs", "expected a mapping of column -> title (or a list of columns)")
  columns = tuple(str(c) for c in inputs)
  if "label" in columns or "idx" in columns:
    fail("inputs", "'label' and 'idx' are reserved column names; map them with data.columns")

  template = values.get("template")
  if template is not None:
    if not isinstance(template, str):
      fail("template", f"expected a string, got {template!r}")
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if not fields <= set(columns):
      fail("template", f"names {sorted(fields - set(columns))}, which are not among the "
                       f"inputs {list(columns)}")

  if ("labels" in values) == ("regression" in values):
    fail("labels", "give exactly one of labels (classification) or regression")
  case_sensitive = values.get("case_sensitive", False)
  if not isinstance(case_sensitive, bool):
    fail("case_sensitive", f"expected true or false, got {case_sensitive!r}")
  kwargs: dict[str, Any] = {}
  if "labels" in values:
    labels = values["labels"]
    if not isinstance(labels, dict) or len(labels) < 2:
      fail("labels", "expected a mapping of at least two label values -> label words")
    for value, word in labels.items():
      if not isinstance(word, str) or not word.strip():
        fail("labels", f"value {value!r} needs a non-empty label word, got {word!r}")
    label_values = tuple(_value_text(v) for v in labels)
    kwargs.update(label_names=label_values, label_values=label_values,
                  label_words=tuple(w.strip() for w in labels.values()))
    default_metrics = ("accuracy",)
  else:
    spec = values["regression"]
    if not isinstance(spec, dict) or set(spec) != {"min", "max"} or not all(
        isinstance(spec[k], (int, float)) for k in spec) or spec["min"] >= spec["max"]:
      fail("regression", f"expected {{min: LOW, max: HIGH}} with LOW < HIGH, got {spec!r}")
    kwargs.update(is_regression=True, value_range=(float(spec["min"]), float(spec["max"])))
    default_metrics = ("pearson", "spearman")

  metrics = values.get("metrics", default_metrics)
  if isinstance(metrics, str):
    metrics = [metrics]
  unknown = [m for m in metrics if m not in metrics_lib.METRICS]
  if unknown:
    fail("metrics", f"unknown metric {unknown[0]!r}; known: {', '.join(metrics_lib.METRICS)}")
  regression_metrics = {"pearson", "spearman"}
  if any((m in regression_metrics) != ("regression" in values) for m in metrics):
    fail("metrics", f"{list(metrics)} do not suit a "
                    f"{'regression' if 'regression' in values else 'classification'} task")
  if "f1" in metrics and len(kwargs.get("label_names", ())) != 2:
    fail("metrics", "f1 is binary F1 of the second label; with more labels use macro_f1")

  data = _parse_data(values.get("data"), path, columns, fail)
  # Local files name the splits there are; a hub dataset's splits are checked by the hub.
  splits = tuple(split for split, _ in data.files) if data is not None else ()
  return dict(name=name.strip(), input_columns=columns,
              input_titles=tuple(str(t) for t in inputs.values()),
              instruction=instruction.strip(), metrics=tuple(metrics), splits=splits,
              case_sensitive=case_sensitive, input_template=template, data=data, **kwargs)


def _value_text(value: Any) -> str:
  """A label value as the text the loader compares against (1, 1.0 and "1" are the same)."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value).strip()


def _parse_data(spec: Any, path: pathlib.Path, columns: tuple[str, ...], fail) -> TaskData | None:
  if spec is None:
    return None
  if not isinstance(spec, dict):
    fail("data", f"expected a mapping with files or hub, got {spec!r}")
  unknown = sorted(set(spec) - _DATA_KEYS)
  if unknown:
    fail(f"data.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_DATA_KEYS))})")
  if ("files" in spec) == ("hub" in spec):
    fail("data", "give exactly one of data.files (local files) or data.hub (a hub dataset)")
  mapping = spec.get("columns") or {}
  if not isinstance(mapping, dict):
    fail("data.columns", f"expected a mapping of task column -> source column, got {mapping!r}")
  bad = sorted(set(mapping) - {*columns, "label"})
  if bad:
    fail("data.columns", f"{bad[0]!r} is not a task column ({[*columns, 'label']})")
  columns_map = tuple((str(k), str(v)) for k, v in mapping.items())
  if "files" in spec:
    files = spec["files"]
    if isinstance(files, str):
      files = {"train": files}
    if not isinstance(files, dict) or not files:
      fail("data.files", "expected a mapping of split -> file (relative to the task file)")
    resolved = tuple((str(split), str((path.parent / str(f)).resolve()))
                     for split, f in files.items())
    return TaskData(files=resolved, columns=columns_map)
  hub, config, splits = spec["hub"], spec.get("config"), spec.get("splits") or {}
  if not isinstance(hub, str) or not isinstance(splits, dict):
    fail("data.hub", "expected a dataset name, with data.splits a mapping of split -> hub split")
  return TaskData(hub=hub, hub_config=None if config is None else str(config),
                  hub_splits=tuple((str(k), str(v)) for k, v in splits.items()),
                  columns=columns_map)
