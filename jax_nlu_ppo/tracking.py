"""Where a run's numbers go besides metrics.jsonl: TensorBoard event files in the run folder,
always, and Weights & Biases when configured:

    logging:
      wandb: {project: nlu-rl, name: sst2-ppo, tags: [sst2, ppo]}

Both get the same scalars (each step's metrics and eval scores) against `iteration`, from
process 0 only. The W&B run id is kept in the run folder, so a run continued after a stop
continues its W&B run. `wandb` is an optional dependency
(`pip install "jax_nlu_ppo[wandb]"`); W&B's own settings (`WANDB_MODE=offline`, `WANDB_DIR`,
`WANDB_API_KEY`) apply as usual.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import uuid
from typing import Any

import tensorboardX

from jax_nlu_ppo import storage

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
RUN_ID_FILE = "wandb_run_id"
MODES = ("online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  project: str
  name: str | None = None             # default: the run folder's name
  tags: tuple[str, ...] = ()
  entity: str | None = None           # default: the API key's user
  mode: str | None = None             # online, offline or disabled; default: WANDB_MODE, online

  def __post_init__(self):
    if not self.project:
      raise ValueError("logging.wandb.project must name a W&B project")
    if self.mode is not None and self.mode not in MODES:
      raise ValueError(f"logging.wandb.mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  wandb: WandbConfig | None = None


def check(config: LoggingConfig) -> None:
  """Before the model loads: a configured tracker whose package is missing is an error."""
  if config.wandb is not None and importlib.util.find_spec("wandb") is None:
    raise ValueError("logging.wandb is set but the wandb package is not installed: "
                     'pip install "jax_nlu_ppo[wandb]" (or remove logging.wandb)')


class WandbRun:
  """A W&B run for a run folder: started (or continued) on creation, finished by `close`."""

  def __init__(self, config: WandbConfig, out_dir: storage.Path, resolved: dict[str, Any]):
    import wandb
    id_file = out_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:16]
    self.run = wandb.init(project=config.project, entity=config.entity,
                          name=config.name or out_dir.name, tags=list(config.tags),
                          mode=config.mode, config=resolved, id=run_id, resume="allow")
    storage.write_text(id_file, run_id + "\n")
    # Steps redone after a resume log again: `iteration` as the x axis need not increase.
    self.run.define_metric("iteration")
    self.run.define_metric("*", step_metric="iteration")
    log.info("W&B run %s (project %s)", run_id, config.project)

  def write(self, scalars: dict[str, float], step: int) -> None:
    self.run.log({"iteration": step, **scalars})

  def close(self, failed: bool = False) -> None:
    self.run.finish(exit_code=1 if failed else 0)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
  # `iteration` is the step axis itself; bools would plot as 0/1 noise.
  return {name: value for name, value in metrics.items()
          if name != "iteration" and isinstance(value, (int, float))
          and not isinstance(value, bool)}


class Trackers:
  """TensorBoard (and W&B, with `logging.wandb`) for the run folder `out_dir`; a context
  manager. `first_step` > 1 (a continued run) makes TensorBoard hide the old event files'
  steps from there on, which are about to be redone, as metrics.jsonl is truncated."""

  def __init__(self, out_dir: storage.Path, config: LoggingConfig, resolved: dict[str, Any],
               first_step: int = 1):
    self.tensorboard = tensorboardX.SummaryWriter(str(out_dir / TENSORBOARD_DIR),
                                                  purge_step=first_step if first_step > 1 else None)
    self.wandb = WandbRun(config.wandb, out_dir, resolved) if config.wandb else None

  def write(self, metrics: dict[str, Any], step: int) -> None:
    values = scalars(metrics)
    for name, value in values.items():
      self.tensorboard.add_scalar(name, value, step)
    # Flushed every step, so a kill loses no more than metrics.jsonl does.
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.write(values, step)

  def __enter__(self) -> Trackers:
    return self

  def __exit__(self, exc_type, *exc) -> None:
    self.tensorboard.close()
    if self.wandb is not None:
      self.wandb.close(failed=exc_type is not None)
