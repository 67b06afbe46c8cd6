"""Checkpoints of a training run with Orbax: everything a run needs to continue exactly.

Step `s` (the trainer's iteration) is the folder `output_dir/checkpoints/s` with three items:

    arrays  the trainer's device state: adapters and value head, optimiser state, update step,
            KL coefficient, KL reference, the PRNG key as key data (`StandardSave`);
    host    the host side: data position, iteration, NumPy generator state (JSON);
    run     the resolved config and a description of the frozen base (JSON).

The frozen base is not saved: the config names it, and on restore the description must match the
base that was loaded, and the LoRA settings the run's, or the restore fails naming what differs.

Orbax writes a step into a temporary folder and renames it once complete, so an interrupted save
never replaces a good one. A complete step that no longer reads back (a truncated or damaged
file) is moved aside on restore with a warning naming the step and file, and the step before it
is used.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jax_nlu_ppo import storage

log = logging.getLogger(__name__)

UNREADABLE_DIR = "checkpoints.unreadable"
# Config keys a continued run may change without changing what it continues.
_FREE_KEYS = ("output_dir", "steps", "epochs", "checkpoint")


class CheckpointMismatchError(ValueError):
  """A checkpoint made for another base model or adapter shape than this run's."""


class CheckpointReadError(RuntimeError):
  """No checkpoint step of a run folder reads back."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint step could not be written (a full disk, a folder gone read-only)."""


# Metrics of the periodic evaluation on `eval_data` (run_loop) carry this prefix.
EVAL_PREFIX = "eval/"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Saving to `output_dir/checkpoints/<iteration>`; a run whose folder has one continues it.

  A step is saved every `every_steps` iterations, at the end of `train`, and when SIGTERM or
  SIGINT stops training. The latest `keep` steps stay, and with `best_metric` (a step metric
  such as `env/reward_mean` or `sft/loss`) also the best one by it.
  """
  enabled: bool = True              # with output_dir set
  every_steps: int = 0              # 0: only at the end of training (and on a stop signal)
  keep: int = 3
  best_metric: str | None = None
  best_mode: str = "max"            # "max" or "min" of best_metric
  async_save: bool = False          # write in the background while training goes on

  def __post_init__(self):
    if self.every_steps < 0:
      raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
    if self.keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")
    if self.best_mode not in ("max", "min"):
      raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {self.best_mode!r}")


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """What a checkpoint holds of a trainer: a pytree of arrays and JSON-able host state."""
  arrays: Any
  host: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  snapshot: Snapshot
  run: dict[str, Any]


def describe_base(name: str, lm) -> dict[str, Any]:
  """The frozen base as a checkpoint records it: name, dtype, size, shapes, and a fingerprint
  (the summed magnitudes of each tensor's first values) that tells same-shaped weights apart."""
  c = lm.config
  leaves = jax.tree.leaves(lm.params)
  fingerprint = sum(float(jnp.abs(x.reshape(-1)[:256].astype(jnp.float32)).sum())
                    for x in leaves)
  return {"name": name, "dtype": jnp.dtype(lm.dtype).name,
          "num_params": int(sum(x.size for x in leaves)), "vocab_size": c.vocab_size,
          "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
          "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
          "head_dim": c.head_dim, "fingerprint": fingerprint}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'lora.rank': 8, ...} of nested dicts (lists kept whole)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
  return out


def _differences(saved: dict, current: dict) -> list[str]:
  saved, current = _flat(saved), _flat(current)
  return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} in this run"
          for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """Raises `CheckpointMismatchError` naming each difference of base model or adapters.

  A different base name alone (a moved folder) is a warning: the shapes and fingerprint decide.
  Other config changes are allowed and listed in a warning.
  """
  base = {k: v for k, v in saved["base"].items() if k != "name"}
  now = {k: v for k, v in current["base"].items() if k != "name"}
  fingerprints = base.pop("fingerprint"), now.pop("fingerprint")
  problems = [f"base model {d}" for d in _differences(base, now)]
  if abs(fingerprints[0] - fingerprints[1]) > 1e-5 * max(abs(fingerprints[0]), 1.0):
    problems.append(f"base model weights differ (fingerprint {fingerprints[0]:.6g} in the "
                    f"checkpoint, {fingerprints[1]:.6g} in this run)")
  adapters = ("lora", "critic_lora")
  problems += _differences({k: saved["config"].get(k) for k in adapters},
                           {k: current["config"].get(k) for k in adapters})
  if problems:
    raise CheckpointMismatchError(
        f"{where} was made for another model or adapter shape than this run's: "
        + "; ".join(problems) + ". Use the checkpoint's settings, or another output_dir.")
  if saved["base"]["name"] != current["base"]["name"]:
    log.warning("%s was made from base model %r, this run loads %r (same shapes and weights)",
                where, saved["base"]["name"], current["base"]["name"])
  changed = _differences({k: v for k, v in saved["config"].items() if k not in _FREE_KEYS},
                         {k: v for k, v in current["config"].items() if k not in _FREE_KEYS})
  if changed:
    log.warning("continuing %s with a changed config: %s", where, "; ".join(changed))


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'state/trainable/.../a/value': (shape, dtype)} of arrays or Orbax array metadata."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          (tuple(x.shape), jnp.dtype(x.dtype).name) for path, x in leaves}


def _unreadable_file(step_dir: storage.Path, error: BaseException) -> str:
  """The file behind a failed restore: named by the error, else the first JSON that no longer
  parses, else the step folder."""
  if getattr(error, "filename", None):
    return str(error.filename)
  files = [f for f in re.findall(r'local file "([^"]+)"', str(error)) if not f.endswith("/")]
  if files:
    return files[-1]
  for path in storage.files_under(step_dir):
    try:
      with path.open("rb") as f:
        if f.read(1) != b"{":
          continue
      json.loads(path.read_text())
    except (ValueError, OSError):
      return str(path)
  return str(step_dir)


class Checkpointer:
  """An Orbax `CheckpointManager` over `directory`, saving and restoring `Snapshot`s.

  `run` (the resolved config and `describe_base`) goes with every step and is checked on restore.
  """

  def __init__(self, directory: storage.PathLike, config: CheckpointConfig,
               run: dict[str, Any]):
    self.directory = storage.absolute(directory)
    self.config = config
    self.run = run
    policies = [ocp.checkpoint_managers.LatestN(config.keep)]
    if config.best_metric is not None:
      name = config.best_metric
      # BestN sorts ascending and keeps the tail: reversed, the tail is the minimum.
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[name], reverse=config.best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=config.async_save, cleanup_tmp_directories=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    if jax.process_index() == 0:
      for partial in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
        log.warning("%s: a save that did not finish (the run stopped while writing it); it is "
                    "not a step and is removed", partial)
    # Handlers named up front: a manager that only knows item names reads no array metadata.
    handlers = {"arrays": ocp.StandardCheckpointHandler(), "host": ocp.JsonCheckpointHandler(),
                "run": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def due(self, step: int) -> bool:
    """Whether `step` is one of the every-`every_steps` saves."""
    return self.config.every_steps > 0 and step % self.config.every_steps == 0

  def save(self, step: int, snapshot: Snapshot, metrics: dict[str, float]) -> bool:
    """Saves `snapshot` as `step` unless that step exists; `metrics` rank it for `best_metric`."""
    if step in self.manager.all_steps():
      return False
    tracked = None
    name = self.config.best_metric
    if name is not None:
      if name in metrics:
        tracked = {name: float(metrics[name])}
      elif name.startswith(EVAL_PREFIX):
        # A step saved without an evaluation (a stop signal, a save between evaluations) is
        # kept as the latest but never ranks as the best.
        tracked = {name: float("-inf") if self.config.best_mode == "max" else float("inf")}
      else:
        raise ValueError(f"checkpoint.best_metric {name!r} is not a step metric; choose one of "
                         f"{', '.join(sorted(metrics))} (or an eval/ metric with eval_data)")
    try:
      self.manager.save(step, metrics=tracked, force=True, args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(snapshot.arrays), host=ocp.args.JsonSave(snapshot.host),
          run=ocp.args.JsonSave(self.run)))
    except OSError as e:
      raise self._write_error(step, e) from e
    return True

  def wait(self) -> None:
    """Blocks until an asynchronous save is on disk."""
    try:
      self.manager.wait_until_finished()
    except OSError as e:
      raise self._write_error(None, e) from e

  def _write_error(self, step: int | None, error: OSError) -> CheckpointWriteError:
    complete = [s for s in self.steps() if s != step]
    kept = (f"the latest complete step, {complete[-1]}, is intact: free space or fix the folder, "
            "then run the same command to continue from it" if complete else
            "no earlier step was saved")
    return CheckpointWriteError(
        f"checkpoint step {step if step is not None else '(asynchronous)'} could not be written "
        f"to {self.directory} ({error.strerror or error}); {kept}")

  def close(self) -> None:
    self.manager.close()

  def restore(self, step: int, target: Snapshot) -> Restored:
    """Step `step`, checked against this run and shaped like `target`.

    Raises `CheckpointMismatchError` for another base or adapter shape; any other error means
    the step does not read back.
    """
    where = f"checkpoint step {step} in {self.directory}"
    run = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    check_compatible(run, self.run, where)
    saved, wanted = _shapes(self.manager.item_metadata(step)["arrays"]), _shapes(target.arrays)
    if saved != wanted:
      differ = [f"{k}: {saved.get(k)} in the checkpoint, {wanted.get(k)} in this run"
                for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
      raise CheckpointMismatchError(f"{where} holds other arrays than this run's (another "
                                    f"optimizer or trainer?): {'; '.join(differ[:5])}")
    out = self.manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target.arrays), host=ocp.args.JsonRestore()))
    return Restored(step, Snapshot(out["arrays"], out["host"]), run)

  def restore_latest(self, target: Snapshot) -> Restored | None:
    """The newest step that reads back (None if there is none yet).

    Newer steps that do not read back are moved to `UNREADABLE_DIR` beside `directory`, so the
    continued run can save those steps again; if no step reads back, `CheckpointReadError`.
    """
    unreadable = []
    for step in reversed(self.steps()):
      try:
        restored = self.restore(step, target)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and TensorStore raise many types for a damaged file; any of them means unreadable.
        where = _unreadable_file(self.directory / str(step), e)
        log.warning("checkpoint step %d does not read back (%s: %s: %s); trying the step "
                    "before it", step, where, type(e).__name__, str(e).splitlines()[0][:200])
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      return restored
    if unreadable:
      raise CheckpointReadError(f"no checkpoint step in {self.directory} reads back (tried "
                                f"{', '.join(map(str, unreadable))}); see the warnings above")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / UNREADABLE_DIR
      storage.mkdir(aside)
      for step in steps:
        dest = aside / str(step)
        n = 1
        while dest.exists():
          dest, n = aside / f"{step}.{n}", n + 1
        storage.move(self.directory / str(step), dest)
        log.warning("moved unreadable checkpoint step %d to %s", step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jax_nlu_ppo checkpoint set aside")
    self.manager.reload()
