"""What the PPO and SFT trainers share: training rows in, the step loop with its metrics file,
checkpoints and stop signals, and the adapted model out for generation, evaluation and perplexity."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
from typing import Any, Callable, Protocol, Sequence

import jax
import yaml
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo import run_lock
from jax_nlu_ppo import storage
from jax_nlu_ppo import tracking
from jax_nlu_ppo.nlu import data as data_lib
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.rl import peft_adapter
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo import sharding as sharding_lib

log = logging.getLogger(__name__)

Metrics = dict[str, float]

# The files of a run folder beside checkpoints/ (read back by `report`).
CONFIG_FILE, METRICS_FILE, SAMPLES_FILE = "config.yaml", "metrics.jsonl", "samples.jsonl"
EVAL_DIR = "eval"
TENSORBOARD_DIR = tracking.TENSORBOARD_DIR


def process_rows(config, local_batch: int,
                 train_examples: Sequence[dict[str, Any]] | None = None
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(every training row, this process's block of every global batch of `local_batch` rows per
  process): `train_examples`, or the rows `config.data` / `config.mixture` name, read before
  any model is loaded, so that a data problem is reported without waiting for one. Skipped bad
  rows are reported, never hidden."""
  if train_examples is not None:
    rows = list(train_examples)
  elif config.mixture:       # a weighted mixture, each row tagged with its task
    rows, reports = data_lib.load_mixture(config.mixture, seed=config.seed)
    for report in reports:
      if report.rows_skipped:
        log.warning(report.summary())
  else:
    rows = data_lib.load_rows(config.data)
  return rows, data_lib.deal(rows, local_batch, jax.process_count(), jax.process_index())


def starting_point(mesh: sharding_lib.LogicalMesh, config, lm=None, initial_trainable=None
                   ) -> tuple[pretrained.LanguageModel, Any]:
  """The base model on `mesh` (`lm`, or `config.model` loaded), checked to split over it, and
  the trainable values a run starts from: `initial_trainable`, else `config.model.adapter`'s,
  else None (fresh adapters).

  A run that continues from its checkpoints does not read `model.adapter`: the checkpoint holds
  the policy and the KL reference (a step that does not read back is an error, never a fresh
  start), so the adapter folder may have moved since.
  """
  model, adapter = config.model, config.model.adapter if initial_trainable is None else None
  if adapter and has_saved_steps(config):
    log.info("model.adapter %s is not read: the run continues from its checkpoint", adapter)
    adapter = None
  if adapter:
    peft_adapter.check_initial_adapter(adapter, config)
  lm = lm or pretrained.load_pretrained(model.name, model.dtype, model.gguf_file, mesh=mesh,
                                        kernels=model.kernels)
  sharding_lib.check_model(mesh, lm.config)
  if adapter:
    _, initial_trainable = peft_adapter.load_peft_adapter(adapter, lm)
  return lm, initial_trainable


def has_saved_steps(config) -> bool:
  """Whether the run folder holds checkpoint steps that `open_checkpoints` will continue from."""
  if config.output_dir is None or not config.checkpoint.enabled:
    return False
  folder = storage.path(config.output_dir) / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def task_of(example: dict[str, Any], train_tasks: Sequence[str]) -> str:
  """A row's task spec: its `task` key (mixtures), else the run's single training task."""
  return example.get("task") or train_tasks[0]


def total_steps(steps: int, epochs: float | None, num_rows: int, batch_size: int) -> int:
  """`steps`, or the steps that make `epochs` passes over `num_rows` rows."""
  if epochs is None:
    return steps
  return math.ceil(epochs * num_rows / batch_size)


class Resumable(Protocol):
  """A trainer the loop can run, checkpoint and restore (`PPOTrainer`, `SFTTrainer`)."""
  iteration: int
  config: Any
  skipped_metric: str      # the step metric that is 1 when every update of the step was skipped

  def step(self) -> Metrics: ...

  def snapshot(self) -> checkpoint_lib.Snapshot: ...

  def load_snapshot(self, snapshot: checkpoint_lib.Snapshot) -> None: ...


class RunawayLossError(RuntimeError):
  """Too many iterations in a row skipped every update (a non-finite loss or gradient)."""


def run_description(config, lm: pretrained.LanguageModel) -> dict[str, Any]:
  """What every checkpoint of a run records and a restore checks: its config and its base."""
  return {"config": config_lib.to_dict(config),
          "base": checkpoint_lib.describe_base(config.model.name, lm)}


def open_checkpoints(trainer: Resumable, config, lm: pretrained.LanguageModel
                     ) -> checkpoint_lib.Checkpointer | None:
  """The run folder's checkpoints (None without `output_dir` or with checkpoints off), with
  `trainer` moved to the latest step that reads back, and metrics.jsonl and samples.jsonl cut to
  that step."""
  if config.output_dir is None or not config.checkpoint.enabled:
    return None
  out_dir = storage.path(config.output_dir)
  checkpointer = checkpoint_lib.Checkpointer(out_dir / "checkpoints", config.checkpoint,
                                             run_description(config, lm))
  restored = checkpointer.restore_latest(trainer.snapshot())
  if restored is not None:
    trainer.load_snapshot(restored.snapshot)
    log.info("continuing from checkpoint step %d in %s", restored.step, checkpointer.directory)
  if jax.process_index() == 0:
    for name in (METRICS_FILE, SAMPLES_FILE):
      truncate_jsonl(out_dir / name, trainer.iteration)
  return checkpointer


def truncate_jsonl(path: storage.Path, iteration: int) -> None:
  """Drops the lines of iterations after `iteration` (and a line cut short by a kill), so that
  iterations redone after a restore are not written twice."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)

  def kept(line: str) -> bool:
    try:
      return json.loads(line)["iteration"] <= iteration
    except (ValueError, KeyError, TypeError):
      return False

  keep = [line for line in lines if kept(line)]
  if len(keep) < len(lines):
    log.info("%s: dropping %d lines after iteration %d", path.name, len(lines) - len(keep),
             iteration)
    storage.write_text(path, "".join(keep))


def run_kind(config: dict[str, Any]) -> str:
  """"ppo", "sft" or "reward_model": which trainer wrote a run, from its saved config (only
  TrainConfig has `ppo`, only RewardModelConfig a `loss`)."""
  if "ppo" in config:
    return "ppo"
  return "reward_model" if "loss" in config else "sft"


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """A run folder's checkpoints as `saved_run` found them: where, which step (None: the latest
  good one), and the config the run resolved (a dict)."""
  directory: storage.Path
  step: int | None
  config: dict[str, Any]


def locate_run(path: storage.PathLike) -> tuple[storage.Path, int | None]:
  """(the checkpoints folder, the step or None for the latest) of a run folder or step folder;
  nothing is read."""
  path = storage.path(path)
  if not path.exists():
    raise checkpoint_lib.CheckpointReadError(f"{path} does not exist")
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent, int(path.name)
  raise checkpoint_lib.CheckpointReadError(
      f"{path} is neither a run folder (with checkpoints/) nor a checkpoint step folder "
      "(RUN/checkpoints/<step>)")


def saved_run(path: storage.PathLike) -> SavedRun:
  """The run at `path`: a run folder (with checkpoints/) or one of its step folders
  (RUN/checkpoints/<step>); its config is read from the newest complete step."""
  directory, step = locate_run(path)
  manager = ocp.CheckpointManager(storage.absolute(directory),
                                  item_handlers={"run": ocp.JsonCheckpointHandler()})
  steps = sorted(manager.all_steps())
  if not steps:
    raise checkpoint_lib.CheckpointReadError(f"{directory} holds no complete checkpoint step")
  if step is not None and step not in steps:
    raise checkpoint_lib.CheckpointReadError(
        f"{path}: no complete step {step} (complete steps: {steps})")
  run = manager.restore(step if step is not None else steps[-1],
                        args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
  manager.close()
  return SavedRun(directory, step, dict(run["config"]))


def restore_saved(saved: SavedRun, config_cls, trainer_cls,
                  lm: pretrained.LanguageModel | None = None,
                  mesh: sharding_lib.LogicalMesh | None = None) -> tuple[Any, int]:
  """(a `trainer_cls` at the saved step, on `mesh` (default: the one its config builds), that
  step). The base is loaded as the run's config names it unless `lm` is given; the checkpoint's
  description of the base must match it (else `CheckpointMismatchError`). The trainer has no
  training data and no output folder: reading a run must not touch it."""
  fields = {**saved.config, "output_dir": None}
  # The checkpoint holds the KL reference: the adapter the run started from is not read again.
  fields["model"] = {**fields.get("model", {}), "adapter": None}
  config = config_lib.from_dict(config_cls, fields)
  if lm is None:
    lm = pretrained.load_pretrained(config.model.name, config.model.dtype,
                                    config.model.gguf_file, kernels=config.model.kernels)
  trainer = trainer_cls(config, lm=lm, train_examples=[{"label": 0}],   # a placeholder row
                        mesh=mesh)
  checkpointer = checkpoint_lib.Checkpointer(saved.directory, config.checkpoint,
                                             run_description(config, lm))
  try:
    if saved.step is None:
      restored = checkpointer.restore_latest(trainer.snapshot())
    else:
      restored = checkpointer.restore(saved.step, trainer.snapshot())
  finally:
    checkpointer.close()
  trainer.load_snapshot(restored.snapshot)
  return trainer, restored.step


class StopSignal:
  """SIGTERM or SIGINT (Ctrl-C) while training: the step in progress finishes, a checkpoint is
  saved and `train` returns. A second SIGINT stops at once (KeyboardInterrupt).

  With several processes JAX's distributed runtime owns SIGTERM, and its preemption sync point
  makes every host stop after the same step; no handler is installed there.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}
    self._steps = 0

  def __enter__(self) -> StopSignal:
    # Handlers can only be set from the main thread; elsewhere signals keep their handlers.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    log.warning("%s: finishing this step, then saving a checkpoint and stopping", self.received)

  def reached(self) -> bool:
    """Whether to stop after the step just done; called by every process at every step."""
    self._steps += 1
    if jax.process_count() > 1:
      # Steps are counted from this process's start, not the run's: JAX's sync point starts at
      # 1, so a resumed run that heard of a preemption before its first count would never stop.
      try:
        return multihost_utils.reached_preemption_sync_point(self._steps)
      except RuntimeError:     # JAX's preemption service is off: nothing to sync on
        return False
    return self.received is not None


class PeriodicEval:
  """The policy scored on the run's `eval_data`: before the first step of a fresh run (the
  zero-shot point, unless `eval_before` is off), every `eval_every` steps and after the last.

  Scores join that step's metrics as `eval/<metric>` (metrics.jsonl, TensorBoard, checkpoint
  ranking; the starting point is a line of step 0); each evaluation's predictions go to
  `eval/step_<N>.json` in the run folder.
  """

  def __init__(self, data: data_lib.DataConfig, every: int, out_dir: storage.Path | None):
    self.rows, self.report = data_lib.load_checked(data)
    self.task, self.every, self.out_dir = data.task, every, out_dir
    if not self.rows:
      raise ValueError(f"eval_data ({data.task} {data.split}) has no rows")

  def due(self, iteration: int) -> bool:
    return self.every > 0 and iteration % self.every == 0

  def __call__(self, trainer) -> Metrics:
    result = trainer.evaluate(self.rows, self.task)
    result.data_report = self.report
    if self.out_dir is not None:
      evaluate_lib.write_json([result], self.out_dir / EVAL_DIR /
                              f"step_{trainer.iteration:06d}.json")
    log.info("eval after step %d: %s", trainer.iteration, result.summary())
    return {f"{checkpoint_lib.EVAL_PREFIX}{name}": float(value)
            for name, value in result.metrics.items() if name != "count"}


def eval_scores(line: Metrics) -> Metrics:
  """The `PeriodicEval` scores of a metrics line, without their prefix (e.g. {"accuracy": ...})."""
  prefix = checkpoint_lib.EVAL_PREFIX
  return {k[len(prefix):]: v for k, v in line.items() if k.startswith(prefix)}


def run_steps(trainer: Resumable, steps: int, output_dir: str | None,
              on_step: Callable[[Metrics], None] | None = None,
              checkpointer: checkpoint_lib.Checkpointer | None = None,
              samples: Callable[[], list[dict[str, Any]]] | None = None) -> list[Metrics]:
  """Calls `trainer.step` `steps` times, or until SIGTERM/SIGINT (see `StopSignal`).

  Each step's metrics go to `on_step` and a line of `output_dir/metrics.jsonl`, its numbers as
  TensorBoard scalars in `output_dir/tensorboard/` (tag: the metric name, step: the iteration)
  and to W&B with `config.logging.wandb` (`tracking.Trackers`), and
  the rows of `samples()` (a few generations) to `output_dir/samples.jsonl` (appended, so a
  continued run extends its files; written by process 0 only, with the resolved config as
  config.yaml). With `eval_data` in the trainer's config, `PeriodicEval` scores the policy.
  `checkpointer` saves every `every_steps` iterations, on a stop signal and after the last step.
  `config.max_skipped_steps` iterations in a row whose every update was skipped (a non-finite
  loss or gradient) stop the run with `RunawayLossError`; their periodic saves are left out, so
  the latest checkpoint holds the last iteration that updated. `run_lock.RunLock` holds the
  folder meanwhile. Returns the lines written to metrics.jsonl: each step's metrics, after the
  starting evaluation's line (step 0) when there is one.
  """
  # Held before anything is written: a second run on this folder stops instead of mixing in.
  with run_lock.RunLock(output_dir) if output_dir else contextlib.nullcontext():
    return _steps(trainer, steps, output_dir, on_step, checkpointer, samples)


def _steps(trainer: Resumable, steps: int, output_dir: str | None,
           on_step: Callable[[Metrics], None] | None,
           checkpointer: checkpoint_lib.Checkpointer | None,
           samples: Callable[[], list[dict[str, Any]]] | None) -> list[Metrics]:
  out_dir = storage.path(output_dir) if output_dir and jax.process_index() == 0 else None
  trackers = contextlib.nullcontext()
  if out_dir is not None:
    storage.mkdir(out_dir)
    # Rewritten on resume: a continued run is the same run, with the same config.
    resolved = config_lib.to_dict(trainer.config)
    storage.write_text(out_dir / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
    trackers = tracking.Trackers(out_dir, trainer.config.logging, resolved,
                                 first_step=trainer.iteration + 1)
  history = []
  metrics = None
  config = trainer.config
  skipped_in_a_row = 0
  evaluator = (PeriodicEval(config.eval_data, config.eval_every, out_dir)
               if config.eval_data is not None and steps > 0 else None)
  with StopSignal() as stop, trackers as scalars:
    if evaluator is not None and trainer.iteration == 0 and config.eval_before:
      start = {"iteration": 0, **evaluator(trainer)}
      history.append(start)
      if out_dir is not None:
        storage.append_jsonl(out_dir / METRICS_FILE, [start])
        scalars.write(start, 0)
    for i in range(steps):
      metrics = trainer.step()
      skipped_in_a_row = skipped_in_a_row + 1 if metrics[trainer.skipped_metric] >= 1 else 0
      stopping = stop.reached()
      # Not when stopping: a preempted host has seconds to save, not minutes to evaluate.
      if evaluator is not None and not stopping and (
          i == steps - 1 or evaluator.due(trainer.iteration)):
        metrics |= evaluator(trainer)
      history.append(metrics)
      if on_step is not None:
        on_step(metrics)
      if out_dir is not None:
        storage.append_jsonl(out_dir / METRICS_FILE, [metrics])
        scalars.write(metrics, trainer.iteration)
        if samples is not None:
          storage.append_jsonl(out_dir / SAMPLES_FILE, samples())
      if 0 < config.max_skipped_steps <= skipped_in_a_row:
        raise _runaway(trainer, skipped_in_a_row, checkpointer)
      if checkpointer is not None and (stopping or (checkpointer.due(trainer.iteration)
                                                    and not skipped_in_a_row)):
        checkpointer.save(trainer.iteration, trainer.snapshot(), metrics)
      if stopping:
        log.warning("stopped after iteration %d%s", trainer.iteration,
                    "; checkpoint saved" if checkpointer is not None else "")
        break
    if checkpointer is not None:
      if metrics is not None:
        checkpointer.save(trainer.iteration, trainer.snapshot(), metrics)
      checkpointer.wait()
  return history


def _runaway(trainer: Resumable, skipped: int,
             checkpointer: checkpoint_lib.Checkpointer | None) -> RunawayLossError:
  """The error that stops a run whose updates keep being skipped; saves in flight finish."""
  last = trainer.iteration
  where = "no checkpoint was saved"
  if checkpointer is not None:
    checkpointer.wait()
    steps = checkpointer.steps()
    where = (f"its latest checkpoint, step {steps[-1]}, is from before them and is kept; fix the "
             "cause and run the same command to continue from it" if steps else
             "no checkpoint was saved before them")
  return RunawayLossError(
      f"iterations {last - skipped + 1}..{last}: every update was skipped ({skipped} iterations in "
      f"a row, max_skipped_steps={trainer.config.max_skipped_steps}): the loss or its gradient is "
      f"not finite (the step metric {trainer.skipped_metric} in metrics.jsonl). Lower "
      f"optimizer.learning_rate or look for bad rewards or data; {where}. "
      "max_skipped_steps=0 never stops.")


def adapted_model(lm: pretrained.LanguageModel, graphdef, base, trainable,
                  mesh=None) -> pretrained.LanguageModel:
  """The base model with `trainable`'s adapters on, as a `LanguageModel` (shares the base);
  generating over `mesh` (default: `lm`'s)."""
  policy = policy_lib.with_trainable(graphdef, base, trainable)
  llama_graphdef, params = nnx.split(policy.llama)
  return pretrained.LanguageModel(lm.config, llama_graphdef, params, lm.tokenizer, lm.dtype,
                                  lm.batch_size, mesh or lm.mesh, lm.batch_tokens)


def evaluate_model(lm: pretrained.LanguageModel, examples: Sequence[dict[str, Any]],
                   train_tasks: Sequence[str], prompt_format: str, task: str | None = None,
                   **eval_options) -> evaluate_lib.EvalResult:
  """Greedy answers of `lm` to one task's examples, scored; `task` defaults to the examples'
  `task` key, else the run's first training task."""
  spec = task or (task_of(examples[0], train_tasks) if examples else train_tasks[0])
  config = evaluate_lib.EvalConfig(prompt_format=prompt_format, **eval_options)
  return evaluate_lib.evaluate_model(lm, spec, examples, config)
