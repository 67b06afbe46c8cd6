"""Loading task data into `datasets.Dataset`s with the hub's column names and integer labels.

Four sources, each normalised to the `nyu-mll/glue` layout (the task's input columns, `label`
as a ClassLabel or, for STS-B, a float, and `idx`, the row's position in its source), and
"auto", which picks one of them (`resolve_source`):

* "hub": `load_dataset("nyu-mll/glue", task, split=split)` (needs internet);
* "glue_dir": a folder in the original GLUE distribution layout (`CoLA/dev.tsv`, ...);
* "file": a csv / tsv / json / jsonl / parquet file, or a `save_to_disk` folder, with an
  optional column mapping;
* "task": the files or hub dataset a custom task's YAML file names (`task_files`).

Several tasks train together through a `Mixture`: weighted components, each a `DataConfig`,
whose rows carry a `task` key naming their task.

Rows are read and checked one by one so that a problem (a missing column, a label the task does
not know, a malformed line) names the file and row. Bad rows are skipped and counted in a
`LoadReport`, or raise a `DataError` with `strict=True`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow.parquet as pq

from jax_nlu_ppo.nlu import tasks as tasks_lib

log = logging.getLogger(__name__)

HUB_NAME = "nyu-mll/glue"
# Where "auto" looks for a local GLUE folder when data.path is not given.
DEFAULT_GLUE_DIR = "../shared/data/glue"

# Folder of each task in the GLUE distribution, and its files for the standard splits.
GLUE_FOLDERS = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
    "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "ax": "diagnostic",
}
_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_MNLI_SPLIT_FILES = {
    "train": "train.tsv",
    "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv",
}
# Some copies hold MNLI's validation splits as the hub's dataset saved with `save_to_disk`.
_MNLI_SAVED_FOLDER = "hf_glue_mnli_validation"

# Source column names accepted for each hub column, first match wins (GLUE TSV headers differ
# from the hub's: MRPC's "#1 String", STS-B's "score", MNLI's "gold_label", QQP's "is_duplicate").
_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "mrpc": {"sentence1": ("#1 String",), "sentence2": ("#2 String",), "label": ("Quality",)},
    "stsb": {"label": ("score",)},
    "qqp": {"label": ("is_duplicate",)},
    "mnli": {"premise": ("sentence1",), "hypothesis": ("sentence2",), "label": ("gold_label",)},
    "ax": {"premise": ("sentence1", "Premise"), "hypothesis": ("sentence2", "Hypothesis"),
           "label": ("Label", "gold_label")},
}
# CoLA's train and dev files have no header (its test.tsv has one).
_COLA_COLUMNS = ("source", "label", "original_label", "sentence")

Source = Literal["auto", "hub", "glue_dir", "file", "task"]
SOURCES = ("auto", "hub", "glue_dir", "file", "task")
_MAX_PROBLEMS_KEPT = 100


class DataError(ValueError):
  """A data file or row that cannot be used; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What loading read and skipped. `problems` holds the first skipped rows (where, why)."""
  source: str
  rows_read: int
  rows_kept: int
  problems: tuple[SkippedRow, ...] = ()

  @property
  def rows_skipped(self) -> int:
    return self.rows_read - self.rows_kept

  def to_json(self) -> dict[str, Any]:
    return {"source": self.source, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "skipped_rows": [problem.to_json() for problem in self.problems]}

  def summary(self, max_problems: int = 5) -> str:
    text = f"{self.source}: kept {self.rows_kept} of {self.rows_read} rows"
    if self.rows_skipped:
      shown = "\n  ".join(map(str, self.problems[:max_problems]))
      more = self.rows_skipped - min(max_problems, len(self.problems))
      text += f", skipped {self.rows_skipped}:\n  {shown}"
      text += f"\n  ... and {more} more" if more > 0 else ""
    return text


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where a task's split comes from and how it is cut.

  `source`: "hub", "glue_dir" (`path` = the GLUE folder), "file" (`path` = a file or a
  `save_to_disk` folder), "task" (the data a custom task's YAML names; `task` is its path) or
  "auto": a custom task's own data; else `path` (default `DEFAULT_GLUE_DIR`) as a GLUE folder or
  data file when it exists; else the hub. `column_map` maps hub column names to the file's own
  (only the ones that differ); `header` names the columns of a csv / tsv file without a header
  row.
  `labelled=None` means unlabelled only for test splits. Rows are shuffled with
  `shuffle_seed` (None keeps file order), the first `offset` dropped, then cut to `limit`, then
  sharded per host (so offset=480 with the same seed holds out the rows another run's limit=480
  read).
  """
  task: str
  split: str = "train"
  source: Source = "auto"
  path: str | None = None
  column_map: Mapping[str, str] | None = None
  shuffle_seed: int | None = None
  limit: int | None = None
  offset: int = 0
  strict: bool = False
  labelled: bool | None = None
  header: tuple[str, ...] | None = None
  # Training on noisy labels: this fraction of the labelled rows (after shuffle and limit) gets
  # another label, uniformly, chosen with `label_noise_seed` (`flip_labels`; logged).
  label_noise: float = 0.0
  label_noise_seed: int = 0

  def __post_init__(self):
    task = tasks_lib.get_task(self.task)
    if self.source not in SOURCES:
      raise ValueError(f"data.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
    if self.source in ("glue_dir", "file") and not self.path:
      raise ValueError(f"data.source={self.source!r} needs data.path")
    if self.source == "task" and task.data is None:
      raise ValueError(f"data.source='task' needs a task file with a data section; "
                       f"{self.task!r} has none (give data.source=file and data.path)")
    if self.source in ("hub", "glue_dir") and task.name not in tasks_lib.TASKS:
      raise ValueError(f"custom task {task.name} reads data.source='task' or 'file', "
                       f"not {self.source!r}")
    if self.offset < 0:
      raise ValueError(f"data.offset must be a number of rows >= 0, got {self.offset}")
    if self.limit is not None and self.limit < 1:
      raise ValueError(f"data.limit must be a positive number of rows or None, got {self.limit}")
    if not 0.0 <= self.label_noise <= 1.0:
      raise ValueError(f"data.label_noise must be a fraction in [0, 1], got {self.label_noise}")
    if self.label_noise and task.is_regression:
      raise ValueError(f"data.label_noise flips class labels; {task.name}'s labels are scores")


def resolve_source(config: DataConfig) -> DataConfig:
  """`config` with source "auto" replaced by the source it finds (logged); others unchanged."""
  if config.source != "auto":
    return config
  task = tasks_lib.get_task(config.task)
  if config.path is None and task.data is not None:
    found = dataclasses.replace(config, source="task")
  else:
    path = pathlib.Path(config.path or DEFAULT_GLUE_DIR)
    if path.is_dir() and any((path / f).is_dir() for f in GLUE_FOLDERS.values()):
      found = dataclasses.replace(config, source="glue_dir", path=str(path))
    elif config.path is not None:
      if not path.exists():
        raise DataError(f"data.path {path}: no such file or folder (from "
                        f"{pathlib.Path.cwd()})")
      found = dataclasses.replace(config, source="file")
    elif task.name not in tasks_lib.TASKS:
      raise DataError(f"custom task {task.name} names no data of its own; give data.path")
    else:
      found = dataclasses.replace(config, source="hub")
  where = {"task": f"the task file's data ({task.name})", "file": f"the file {found.path}",
           "glue_dir": f"the local GLUE folder {found.path}",
           "hub": f"the hub's {HUB_NAME} (no GLUE folder at {config.path or DEFAULT_GLUE_DIR}, "
                  f"from {pathlib.Path.cwd()})"}[found.source]
  log.info("data for %s %s: %s (data.source auto)", task.name, config.split, where)
  return found


def load(config: DataConfig, *, num_shards: int = 1,
         shard_index: int = 0) -> tuple[datasets.Dataset, LoadReport]:
  """Loads, shuffles, limits and shards the configured split: this host's rows and a report."""
  task = tasks_lib.get_task(config.task)
  auto, config = config.source == "auto", resolve_source(config)
  if config.source == "hub":
    try:
      ds, report = load_hub(task, config.split, strict=config.strict,
                            labelled=config.labelled)
    except (ConnectionError, OSError) as e:
      if not auto:
        raise
      raise DataError(
          f"no data for {task.name} {config.split}: no local GLUE folder at "
          f"{pathlib.Path(config.path or DEFAULT_GLUE_DIR).resolve()} and the hub's {HUB_NAME} "
          f"cannot be read ({type(e).__name__}: {e}); give data.path=FOLDER (the GLUE TSV "
          "layout) or a data file, or connect to the internet") from None
  elif config.source == "task":
    ds, report = load_task_data(task, config.split, column_map=config.column_map,
                                strict=config.strict, labelled=config.labelled)
  elif config.source == "glue_dir":
    ds, report = load_glue_dir(task, config.split, config.path, strict=config.strict,
                               labelled=config.labelled)
  else:
    ds, report = load_file(task, config.path, split=config.split,
                           column_map=config.column_map, header=config.header,
                           strict=config.strict, labelled=config.labelled)
  ds = subset(ds, shuffle_seed=config.shuffle_seed, offset=config.offset, limit=config.limit)
  if config.label_noise:
    ds, flipped = flip_labels(ds, config.label_noise, config.label_noise_seed, task.num_labels)
    idx = ds["idx"] if "idx" in ds.column_names else range(len(ds))
    flipped_idx = [idx[i] for i in flipped]
    log.warning("data.label_noise=%g: %d of %d labels of %s %s flipped (the same seed flips "
                "the same rows), rows idx %s%s", config.label_noise, len(flipped), len(ds),
                task.name, config.split, flipped_idx[:_LOGGED_ROWS],
                " ... (all of them at DEBUG level)" if len(flipped) > _LOGGED_ROWS else "")
    log.debug("data.label_noise: the flipped rows of %s %s, idx %s", task.name, config.split,
              flipped_idx)
  ds = subset(ds, num_shards=num_shards, shard_index=shard_index)
  return ds, report


_LOGGED_ROWS = 20     # flipped rows named in the warning; all of them at DEBUG level


def flip_labels(ds: datasets.Dataset, fraction: float, seed: int,
                num_labels: int) -> tuple[datasets.Dataset, list[int]]:
  """`ds` with round(fraction x labelled rows) of its labelled rows (label >= 0), chosen with
  `seed`, given another of the `num_labels` labels uniformly; and those rows' positions."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(ds["label"])
  labelled = np.flatnonzero(labels >= 0)
  chosen = np.sort(rng.choice(labelled, size=round(fraction * len(labelled)), replace=False))
  new = labels.copy()
  new[chosen] = (labels[chosen] + rng.integers(1, num_labels, size=len(chosen))) % num_labels
  ds = (ds.add_column("noisy_label", new.tolist(), feature=ds.features["label"])
        .remove_columns("label").rename_column("noisy_label", "label"))
  return ds, chosen.tolist()


def data_config_for(task_spec: str, location: str | None, split: str, limit: int | None = None,
                    shuffle_seed: int | None = None, strict: bool = False,
                    offset: int = 0) -> DataConfig:
  """Where a task's split comes from, given a `--data` location: None ("auto": a custom task's
  own data, else a GLUE folder at `DEFAULT_GLUE_DIR`, else the hub), 'hub', a GLUE folder or a
  data file."""
  task = tasks_lib.get_task(task_spec)
  common = dict(task=task_spec, split=split, limit=limit, shuffle_seed=shuffle_seed,
                strict=strict, offset=offset)
  if location is None:
    return DataConfig(source="auto", **common)
  if location == "hub":
    return DataConfig(source="hub", **common)
  path = pathlib.Path(location)
  if not path.exists():
    raise DataError(f"--data {location}: no such file or folder (give 'hub', a GLUE "
                    "folder or a data file)")
  glue_folder = path.is_dir() and any((path / f).is_dir() for f in GLUE_FOLDERS.values())
  if not glue_folder:
    return DataConfig(source="file", path=str(path), **common)
  if task.name in GLUE_FOLDERS:
    return DataConfig(source="glue_dir", path=str(path), **common)
  # A GLUE folder given for GLUE tasks evaluated beside a custom task: it reads its own data.
  if task.data is not None:
    return DataConfig(source="task", **common)
  raise DataError(f"--data {location} is a GLUE folder; custom task {task.name} needs a "
                  "data file (or a data section in its task file)")


def load_rows(config: DataConfig) -> list[dict[str, Any]]:
  """`config`'s rows (see `load_checked`)."""
  return load_checked(config)[0]


def load_checked(config: DataConfig) -> tuple[list[dict[str, Any]], LoadReport]:
  """`config`'s rows and load report; skipped bad rows are logged, and an unreachable hub is a
  `DataError` that says how to read local data instead."""
  try:
    ds, report = load(config)
  except ConnectionError as e:
    raise DataError(
        f"cannot reach the Hugging Face hub for {config.task} ({e}); pass --data with a local "
        "GLUE folder (e.g. ../shared/data/glue) or a data file") from None
  if report.rows_skipped:
    log.warning(report.summary())
  return list(ds), report


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
  """One task of a multi-task mixture and its sampling weight (relative to the others)."""
  data: DataConfig
  weight: float = 1.0

  def __post_init__(self):
    if not (self.weight > 0 and math.isfinite(self.weight)):
      raise ValueError(f"mixture weight of task {self.data.task} must be > 0, got {self.weight}")


def load_mixture(components: Sequence[MixtureComponent], *, seed: int = 0, size: int | None = None,
                 num_shards: int = 1, shard_index: int = 0
                 ) -> tuple[list[dict[str, Any]], list[LoadReport]]:
  """Rows of several tasks, interleaved by weight; each row's `task` names its task.

  Each position draws a component with probability proportional to its weight (seeded), then
  takes that component's next row, cycling when a small task runs out. `size` defaults to the
  total number of rows, so one pass sees every task's rows about `weight`-proportionally.
  """
  if not components:
    raise ValueError("a mixture needs at least one component")
  rows, reports = [], []
  for component in components:
    ds, report = load(component.data, num_shards=num_shards, shard_index=shard_index)
    rows.append([{**row, "task": component.data.task} for row in ds])
    reports.append(report)
  return mix(rows, [c.weight for c in components], seed=seed, size=size), reports


def mix(parts: Sequence[Sequence[dict[str, Any]]], weights: Sequence[float], *, seed: int = 0,
        size: int | None = None) -> list[dict[str, Any]]:
  """Interleaves `parts` by `weights` (see `load_mixture`)."""
  probs = np.asarray(weights, np.float64)
  probs = probs / probs.sum()
  size = sum(len(p) for p in parts) if size is None else size
  choices = np.random.default_rng(seed).choice(len(parts), size=size, p=probs)
  cursors = [0] * len(parts)
  out = []
  for c in choices:
    out.append(parts[c][cursors[c] % len(parts[c])])
    cursors[c] += 1
  return out


def deal(rows: Sequence[dict[str, Any]], block: int, num_shards: int = 1,
         index: int = 0) -> list[dict[str, Any]]:
  """Shard `index` of `rows` dealt round-robin in blocks of `block` rows.

  With `block` the rows one process adds to each global batch, process p's i-th block is its
  part of the i-th batch, so a run on several processes sees the same batches, in the same
  order, as on one.
  """
  if not 0 <= index < num_shards:
    raise ValueError(f"shard index must lie in 0..{num_shards - 1}, got {index}")
  return [row for i, row in enumerate(rows) if (i // block) % num_shards == index]


def subset(ds: datasets.Dataset, *, shuffle_seed: int | None = None, offset: int = 0,
           limit: int | None = None, num_shards: int = 1,
           shard_index: int = 0) -> datasets.Dataset:
  """Seeded shuffle, then `limit` rows from row `offset`, then contiguous shard `shard_index`.

  Every host shuffles with the same seed before taking its shard, so the shards are disjoint
  and together hold exactly the limited rows.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must lie in 0..{num_shards - 1}, got {shard_index}")
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  if offset or limit is not None:
    end = len(ds) if limit is None else min(offset + limit, len(ds))
    rows = range(min(offset, end), end)
    ds = ds.select(rows if rows else [])    # datasets refuses an empty range past its end
  if num_shards > 1:
    ds = ds.shard(num_shards=num_shards, index=shard_index, contiguous=True)
  return ds


def features(task: tasks_lib.Task) -> datasets.Features:
  columns = {c: datasets.Value("string") for c in task.input_columns}
  columns["label"] = (datasets.Value("float32") if task.is_regression
                      else datasets.ClassLabel(names=list(task.label_names)))
  columns["idx"] = datasets.Value("int32")
  return datasets.Features(columns)


def load_hub(task: tasks_lib.Task | str, split: str, *, strict: bool = False,
             labelled: bool | None = None) -> tuple[datasets.Dataset, LoadReport]:
  """The split from the Hugging Face hub (`nyu-mll/glue`); needs internet."""
  task = _as_task(task)
  _check_split(task, split)
  raw = datasets.load_dataset(HUB_NAME, task.name, split=split)
  source = f"{HUB_NAME}/{task.name}[{split}]"
  rows = ((Where(source, row=i), row) for i, row in enumerate(raw))
  return _build(task, source, rows, {}, _is_labelled(split, labelled), strict)


def load_task_data(task: tasks_lib.Task | str, split: str, *,
                   column_map: Mapping[str, str] | None = None, strict: bool = False,
                   labelled: bool | None = None) -> tuple[datasets.Dataset, LoadReport]:
  """A split of the data a custom task's YAML file names (local files or a hub dataset)."""
  task = _as_task(task)
  if task.data is None:
    raise ValueError(f"task {task.name} names no data of its own; load it from a file or folder")
  columns = {**task.data.column_map, **(column_map or {})}
  if task.data.hub is None:
    path = task.data.file(split)
    if path is None:
      raise DataError(f"task {task.name} has no {split!r} data; its task file names "
                      f"{[s for s, _ in task.data.files]}")
    return load_file(task, path, split=split, column_map=columns, strict=strict,
                     labelled=labelled)
  hub_split = task.data.hub_split(split)
  raw = datasets.load_dataset(task.data.hub, task.data.hub_config, split=hub_split)
  source = f"{task.data.hub}[{hub_split}]"
  rows = ((Where(source, row=i), row) for i, row in enumerate(raw))
  return _build(task, source, rows, columns, _is_labelled(split, labelled), strict)


def glue_path(glue_dir: str | pathlib.Path, task: tasks_lib.Task | str,
              split: str) -> pathlib.Path:
  """The file (or MNLI's `save_to_disk` folder) holding a split in a GLUE-layout folder.

  A split that is not a standard one names a file in the task's folder without ".tsv", e.g.
  "subsets/lmbff_k-shot_16-42_train" for the LM-BFF 16-shot samples.
  """
  task = _as_task(task)
  if not pathlib.Path(glue_dir).is_dir():
    raise DataError(f"GLUE folder {glue_dir} not found (from {pathlib.Path.cwd()}); give "
                    "data.path=FOLDER (the GLUE TSV layout), or data.source=hub to read "
                    "nyu-mll/glue from the Hugging Face hub (needs internet)")
  folder = pathlib.Path(glue_dir) / GLUE_FOLDERS[task.name]
  if task.name == "ax":
    candidates = [folder / "diagnostic.tsv"] if split == "test" else []
  elif task.name == "mnli" and split in _MNLI_SPLIT_FILES:
    candidates = [folder / _MNLI_SPLIT_FILES[split]]
    if split.startswith("validation_"):
      candidates.append(folder / _MNLI_SAVED_FOLDER)
  elif split in _SPLIT_FILES:
    candidates = [folder / _SPLIT_FILES[split]]
  else:
    candidates = [folder / f"{split}.tsv"]
  for path in candidates:
    if path.exists():
      return path
  present = (sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tsv"))
             if folder.is_dir() else [])
  raise DataError(
      f"no data for task {task.name!r} split {split!r} in {glue_dir}: looked for "
      f"{', '.join(str(p) for p in candidates) or '(none: ax has only a test split)'}; "
      f"TSV files present in {folder}: {present or 'none'}")


def load_glue_dir(task: tasks_lib.Task | str, split: str, glue_dir: str | pathlib.Path, *,
                  strict: bool = False,
                  labelled: bool | None = None) -> tuple[datasets.Dataset, LoadReport]:
  """A split from a folder in the original GLUE layout (TSV files, quoting disabled)."""
  task = _as_task(task)
  path = glue_path(glue_dir, task, split)
  header = _COLA_COLUMNS if task.name == "cola" and path.name != "test.tsv" else None
  return load_file(task, path, split=split, header=header, strict=strict, labelled=labelled)


def load_file(task: tasks_lib.Task | str, path: str | pathlib.Path, *, split: str | None = None,
              column_map: Mapping[str, str] | None = None, header: Sequence[str] | None = None,
              strict: bool = False,
              labelled: bool | None = None) -> tuple[datasets.Dataset, LoadReport]:
  """A local csv / tsv / json / jsonl / parquet file or `save_to_disk` folder.

  `column_map` maps hub column names to the file's (e.g. {"sentence": "text"}); columns not in
  it are looked up under the hub name, then the GLUE file's usual names. `header` names the
  columns of a csv / tsv file that has no header row. `split` picks a split of a saved
  `DatasetDict` and decides whether labels are expected (test splits have none).
  """
  task = _as_task(task)
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"data file {path} does not exist")
  if path.is_dir():
    rows = _saved_rows(path, split)
  else:
    suffix = path.suffix.lower()
    readers = {".tsv": _tsv_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows,
               ".parquet": _parquet_rows}
    if suffix not in readers:
      raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(readers)} "
                      "or a datasets save_to_disk folder")
    if path.stat().st_size == 0:
      raise DataError(f"data file {path} is empty")
    if header is not None and suffix not in (".tsv", ".csv"):
      raise ValueError(f"{path}: header= applies to csv / tsv files only")
    rows = readers[suffix](path, header)
  return _build(task, str(path), rows, column_map or {}, _is_labelled(split, labelled), strict)


def _as_task(task: tasks_lib.Task | str) -> tasks_lib.Task:
  return tasks_lib.get_task(task) if isinstance(task, str) else task


def _check_split(task: tasks_lib.Task, split: str) -> None:
  if task.splits and split not in task.splits:
    raise ValueError(f"task {task.name} has no split {split!r}; its splits: {task.splits}")


def _is_labelled(split: str | None, labelled: bool | None) -> bool:
  if labelled is not None:
    return labelled
  return not (split or "").startswith("test")


# Readers: each yields (where, record) with `where` naming the file and row for messages, or
# (where, error message) for a row that could not even be read.

@dataclasses.dataclass(frozen=True)
class Where:
  """A row's place: a text file's line (1-based), else its index in a dataset or array."""
  file: str
  line: int | None = None
  row: int | None = None

  def __str__(self) -> str:
    return f"{self.file}, line {self.line}" if self.line is not None else (
        f"{self.file}, row index {self.row}")


@dataclasses.dataclass(frozen=True)
class SkippedRow:
  where: Where
  reason: str

  def __str__(self) -> str:
    return f"{self.where}: {self.reason}"

  def to_json(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self.where).items() if v is not None} | {
        "reason": self.reason}


Row = tuple[Where, dict[str, Any] | str]


def _delimited_rows(path: pathlib.Path, header: Sequence[str] | None, delimiter: str,
                    quoting: int) -> Iterator[Row]:
  # utf-8-sig drops the byte-order mark MRPC's files begin with.
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    if header is None:
      header = next(reader, None)
      if header is None:
        raise DataError(f"data file {path} is empty")
    if len(set(header)) != len(header):
      raise DataError(f"{path}: repeated column names in the header {list(header)}")
    for fields in reader:
      where = Where(str(path), line=reader.line_num)
      if not fields:
        continue
      if len(fields) != len(header):
        yield where, (f"{len(fields)} fields where the header has {len(header)} "
                      "(a stray tab or quote in the text?)")
        continue
      yield where, dict(zip(header, fields))


def _tsv_rows(path: pathlib.Path, header: Sequence[str] | None) -> Iterator[Row]:
  # GLUE's TSVs hold quote characters as text: quoting must be off or rows merge.
  return _delimited_rows(path, header, "\t", csv.QUOTE_NONE)


def _csv_rows(path: pathlib.Path, header: Sequence[str] | None) -> Iterator[Row]:
  return _delimited_rows(path, header, ",", csv.QUOTE_MINIMAL)


def _jsonl_rows(path: pathlib.Path, header: None = None) -> Iterator[Row]:
  with open(path, encoding="utf-8-sig") as f:
    for line_num, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = Where(str(path), line=line_num)
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        yield where, f"not valid JSON ({e.msg})"
        continue
      yield where, _object_or_message(record)


def _object_or_message(record: Any) -> dict[str, Any] | str:
  return record if isinstance(record, dict) else f"expected a JSON object, got {record!r:.60}"


def _json_rows(path: pathlib.Path, header: None = None) -> Iterator[Row]:
  # Like `datasets`' json loader: either one JSON array of objects or JSON lines.
  text = path.read_text(encoding="utf-8-sig")
  if not text.lstrip().startswith("["):
    yield from _jsonl_rows(path)
    return
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
  for i, record in enumerate(records):
    where = Where(str(path), row=i)
    yield where, _object_or_message(record)


def _parquet_rows(path: pathlib.Path, header: None = None) -> Iterator[Row]:
  # Read with pyarrow (what `datasets` is built on) to stay in memory, without a builder cache.
  for i, record in enumerate(pq.read_table(path).to_pylist()):
    yield Where(str(path), row=i), record


def _saved_rows(path: pathlib.Path, split: str | None) -> Iterator[Row]:
  try:
    saved = datasets.load_from_disk(str(path))
  except FileNotFoundError as e:
    raise DataError(f"{path} is a folder but not a datasets save_to_disk folder ({e})") from None
  if isinstance(saved, datasets.DatasetDict):
    if split not in saved:
      raise DataError(f"{path} holds splits {list(saved)}; choose one with split=, got {split!r}")
    saved = saved[split]
  source = f"{path}[{split}]" if split else str(path)
  return ((Where(source, row=i), row) for i, row in enumerate(saved.to_list()))


# Normalisation: one source record -> the hub's columns, or the reason it cannot be used.

def _candidates(task: tasks_lib.Task, column: str,
                column_map: Mapping[str, str]) -> tuple[str, ...]:
  if column in column_map:
    return (column_map[column],)
  return (column,) + _ALIASES.get(task.name, {}).get(column, ())


def _label(task: tasks_lib.Task, value: Any) -> int | float | str:
  """The hub label for a source value, or a message saying why there is none."""
  if isinstance(value, bool) or value is None:
    return f"label {value!r} is not a label"
  if task.is_regression:
    try:
      score = float(value)
    except (TypeError, ValueError):
      return f"label {value!r} is not a number"
    return score if math.isfinite(score) else f"label {value!r} is not a finite number"
  if task.label_values:
    # A custom task's rows hold its own label values: "pos", 4, "4.0" (not label indices).
    text = str(int(value) if isinstance(value, float) and value.is_integer() else value).strip()
    if text in task.label_values:
      return task.label_values.index(text)
    return f"unknown label {value!r}; task {task.name} takes {list(task.label_values)}"
  if isinstance(value, str):
    text = value.strip()
    if text in task.label_names:
      return task.label_names.index(text)
    value = int(text) if text.lstrip("-").isdigit() else text
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, int) and 0 <= value < task.num_labels:
    return value
  return (f"unknown label {value!r}; task {task.name} takes 0..{task.num_labels - 1} or "
          f"{list(task.label_names)}")


def _normalise(task: tasks_lib.Task, record: dict[str, Any], column_map: Mapping[str, str],
               labelled: bool) -> dict[str, Any] | str:
  row: dict[str, Any] = {}
  for column in task.input_columns:
    names = _candidates(task, column, column_map)
    name = next((n for n in names if n in record), None)
    if name is None:
      return f"missing column {' / '.join(map(repr, names))} (for {column!r})"
    if not isinstance(record[name], str):
      return f"column {name!r} is {record[name]!r:.60}, not text"
    row[column] = record[name]
  if not labelled:
    row["label"] = -1.0 if task.is_regression else -1
    return row
  names = _candidates(task, "label", column_map)
  name = next((n for n in names if n in record), None)
  if name is None:
    return f"missing column {' / '.join(map(repr, names))} (for 'label')"
  label = _label(task, record[name])
  if isinstance(label, str):
    return label
  row["label"] = label
  return row


def _column_mismatch(task: tasks_lib.Task, source: str, record: dict[str, Any],
                     column_map: Mapping[str, str]) -> str | None:
  """Why `source` does not fit `task`, when its first row lacks an input column of the task: the
  file holds another task's data, or names its columns otherwise. One message, not one a row."""
  missing = [c for c in task.input_columns
             if not any(n in record for n in _candidates(task, c, column_map))]
  if not missing:
    return None
  one = len(missing) == 1
  return (f"{source}: missing {'column' if one else 'columns'} "
          f"{' and '.join(map(repr, missing))}, {'an input' if one else 'inputs'} of task "
          f"{task.name} (its inputs: {', '.join(task.input_columns)}; the file's columns: "
          f"{', '.join(map(str, record))}). Check that the file holds {task.name} data "
          "(data.task, --task); a data file of your own (data.source=file) maps its column "
          "names with data.column_map, e.g. {" + f"{missing[0]}: <its column>" + "}")


def _build(task: tasks_lib.Task, source: str, rows: Iterator[Row], column_map: Mapping[str, str],
           labelled: bool, strict: bool) -> tuple[datasets.Dataset, LoadReport]:
  unknown = sorted(set(column_map) - {*task.input_columns, "label"})
  if unknown:
    raise ValueError(f"column_map names {unknown}, which task {task.name} does not have; its "
                     f"columns: {[*task.input_columns, 'label']}")
  columns: dict[str, list[Any]] = {c: [] for c in (*task.input_columns, "label", "idx")}
  problems: list[SkippedRow] = []
  rows_read = 0
  first = mismatch = None     # the first record, whose columns say if the file fits the task
  for position, (where, record) in enumerate(rows):
    rows_read += 1
    if first is None and isinstance(record, dict):
      first = record
      mismatch = _column_mismatch(task, source, first, column_map)
      if strict and mismatch:
        raise DataError(mismatch)
    row = record if isinstance(record, str) else _normalise(task, record, column_map, labelled)
    if isinstance(row, str):
      problem = SkippedRow(where, row)
      if strict:
        raise DataError(f"{problem} (strict=True; drop strict to skip bad rows)")
      if len(problems) < _MAX_PROBLEMS_KEPT:
        problems.append(problem)
      continue
    row["idx"] = position
    for column, value in row.items():
      columns[column].append(value)
  kept = len(columns["idx"])
  if rows_read == 0:
    raise DataError(f"data file {source} has no data rows")
  if kept == 0 and mismatch:
    raise DataError(mismatch)
  if kept == 0:
    raise DataError(f"no usable rows in {source} (all {rows_read} skipped); first problems:\n  "
                    + "\n  ".join(map(str, problems[:5])))
  ds = datasets.Dataset.from_dict(columns, features=features(task))
  return ds, LoadReport(source=source, rows_read=rows_read, rows_kept=kept,
                        problems=tuple(problems))
