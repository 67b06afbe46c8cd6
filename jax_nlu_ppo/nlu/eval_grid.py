"""Several models scored on several evaluation sets in one call: one results file, one table.

`jax-nlu-ppo eval --model A --model B --task sst2 --data X --data Y` reads every set once
(`evaluate.read_sets`), then loads each model in turn and scores it on every set; models of one
shape reuse each other's compiled programs. The results go to one JSON file,
`{"evaluations": [entry, ...]}`, an entry being one model on one set (`EvalResult.to_json()`
with the model, the set's label and the `cell` that identifies it), rewritten after every
model, so an interrupted call loses at most one model's work. With `skip_done`, entries already
in the file whose cell this call would score again are kept instead of rescored, and the other
entries there are kept too: a table grows over several calls. A setting missing from a stored cell
(the file predates it) counts as its default.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Sequence

from jax_nlu_ppo import storage
from jax_nlu_ppo.nlu import evaluate as evaluate_lib

log = logging.getLogger(__name__)

Entry = dict[str, Any]
# What `EvalResult.metrics` holds beside the task's own metrics.
NOT_METRICS = ("unparsed_rate", "count")


def cell(model: str, s: evaluate_lib.EvalSet, config: evaluate_lib.EvalConfig) -> dict[str, Any]:
  """What makes two evaluations the same: the model as named, the set, every scoring setting."""
  return {"model": model, "task": s.task.name, "data": s.data, "split": s.split,
          "limit": s.limit, "shuffle_seed": s.shuffle_seed, "offset": s.offset,
          **dataclasses.asdict(config)}


def read_entries(path: storage.PathLike) -> list[Entry]:
  """The entries of a results file `evaluate_grid` wrote ([] when there is none)."""
  p = storage.path(path)
  if not p.exists():
    return []
  try:
    out = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); move it aside or name another --output")
  if not isinstance(out, dict) or not isinstance(out.get("evaluations"), list):
    raise ValueError(f"{path}: not a results file of several evaluations (no 'evaluations' "
                     "list); name another --output")
  return out["evaluations"]


def evaluate_grid(models: Sequence[str], sets: Sequence[evaluate_lib.EvalSet],
                  config: evaluate_lib.EvalConfig, load_model: Callable[[str], Any], *,
                  output: storage.PathLike | None = None, skip_done: bool = False,
                  progress: Callable[[str], evaluate_lib.ProgressFn] | None = None
                  ) -> list[Entry]:
  """Every model of `models` (loaded by `load_model(name)`) on every set: the entries, in the
  order models x sets (see the module docstring for `output` and `skip_done`)."""
  if output:
    evaluate_lib.check_writable(output)
  kept = read_entries(output) if output and skip_done else []
  done = {_frozen(e["cell"]): e for e in kept if "cell" in e}
  wanted = {_frozen(cell(m, s, config)) for m in models for s in sets}
  others = [e for e in kept if "cell" not in e or _frozen(e["cell"]) not in wanted]
  entries = []
  for model in models:
    todo = [s for s in sets if _frozen(cell(model, s, config)) not in done]
    if len(todo) < len(sets):
      log.info("%s: %d of %d sets already in %s", model, len(sets) - len(todo), len(sets),
               output)
    results = iter(evaluate_lib.evaluate_sets(load_model(model), todo, config, progress)
                   if todo else ())
    for s in sets:
      key = cell(model, s, config)
      entry = done.get(_frozen(key))
      if entry is None:
        entry = {**as_entry(model, s, next(results)), "cell": key}
      entries.append(entry)
    if output:
      write(output, others + entries)
  return others + entries


def as_entry(model: str, s: evaluate_lib.EvalSet, result: evaluate_lib.EvalResult) -> Entry:
  """`result` (of `model` on `s`) as a row of the table."""
  return {"model": model, "set": s.label,
          "metric_names": [k for k in result.metrics if k not in NOT_METRICS],
          **result.to_json()}


def write(path: storage.PathLike, entries: Sequence[Entry]) -> None:
  storage.write_text(path, json.dumps({"evaluations": list(entries)}, indent=1,
                                      default=evaluate_lib.json_default))


def table(entries: Sequence[Entry]) -> str:
  """A markdown table, a row per entry: model, set, examples, unparsed rate, each metric with
  its 95% bootstrap interval over the examples."""
  lines = ["| model | set | n | unparsed | metrics [95% interval] |", "|---|---|---|---|---|"]
  for e in entries:
    intervals = e.get("intervals_95", {})
    shown = [f"{name} {e[name]:.4f}" + (" [{:.3f}, {:.3f}]".format(*intervals[name])
                                        if name in intervals else "")
             for name in e["metric_names"]]
    shots = e["cell"]["shots"] if "cell" in e else 0
    label = e["set"] + (f", {shots}-shot seed {e['cell']['shot_seed']}" if shots else "")
    lines.append(f"| {e['model']} | {label} | {e['n']} | {e['unparsed_rate']:.3f} | "
                 f"{'  '.join(shown)} |")
  return "\n".join(lines)


def _frozen(key: dict[str, Any]) -> str:
  return json.dumps({**_CELL_DEFAULTS, **key}, sort_keys=True, default=str)


# The settings of a cell that have defaults, for cells written before a setting existed.
_CELL_DEFAULTS = {"offset": 0, **dataclasses.asdict(evaluate_lib.EvalConfig())}
