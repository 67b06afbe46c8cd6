"""Reading a finished (or stopped) run back: its config, base model and trained adapters.

A run folder is what `train` / `sft` / `reward-model` write under `output_dir` (`checkpoints/<step>/...`); a
checkpoint is one of its step folders. Export and evaluation of a run go through `load_run`.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import orbax.checkpoint as ocp

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.rl import reward_model
from jax_nlu_ppo.rl import run_loop
from jax_nlu_ppo.rl import sft
from jax_nlu_ppo.rl import trainer as trainer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedRun:
  """A run at one checkpoint step; `trainer` holds its state (no training data loaded)."""
  config: Any            # TrainConfig, SFTConfig or RewardModelConfig, as the run resolved it
  step: int
  trainer: Any           # PPOTrainer, SFTTrainer or RewardModelTrainer

  @property
  def trainable(self):
    return self.trainer.state.trainable

  @property
  def lm(self) -> pretrained.LanguageModel:
    return self.trainer.lm


def _locate(path: pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """(the run's checkpoints folder, a step or None for the latest)."""
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent, int(path.name)
  raise checkpoint_lib.CheckpointReadError(
      f"{path} is neither a run folder (with checkpoints/) nor a checkpoint step folder "
      "(RUN/checkpoints/<step>)")


def load_run(path: str | pathlib.Path, lm: pretrained.LanguageModel | None = None) -> LoadedRun:
  """The run at `path` (a run folder: its latest good step; or a step folder), with its base.

  The base is loaded as the run's config names it unless `lm` is given; the checkpoint's
  description of the base must match it (else `CheckpointMismatchError`).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise checkpoint_lib.CheckpointReadError(f"{path} does not exist")
  directory, step = _locate(path)
  manager = ocp.CheckpointManager(directory.absolute(),
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
  values = dict(run["config"])
  # Rebuilt without its output folder: reading a run must not touch it.
  values["output_dir"] = None
  if reward_model.is_reward_model_config(values):
    cls, trainer_cls = reward_model.RewardModelConfig, reward_model.RewardModelTrainer
  elif "ppo" in values:
    cls, trainer_cls = config_lib.TrainConfig, trainer_lib.PPOTrainer
  else:
    cls, trainer_cls = sft.SFTConfig, sft.SFTTrainer
  config = config_lib.from_dict(cls, values)
  if lm is None:
    lm = pretrained.load_pretrained(config.model.name, config.model.dtype,
                                    config.model.gguf_file, kernels=config.model.kernels)
  # A placeholder row: the trainers want training data, and reading a run needs none.
  placeholder = [{"label": 0}]
  trainer = trainer_cls(config, lm=lm, train_examples=placeholder)
  checkpointer = checkpoint_lib.Checkpointer(directory, config.checkpoint,
                                             run_loop.run_description(config, lm))
  try:
    if step is None:
      restored = checkpointer.restore_latest(trainer.snapshot())
    else:
      restored = checkpointer.restore(step, trainer.snapshot())
  finally:
    checkpointer.close()
  trainer.load_snapshot(restored.snapshot)
  return LoadedRun(config, restored.step, trainer)


def load_model(path: str, dtype: str = "float32", gguf_file: str | None = None,
               batch_size: int = 32) -> pretrained.LanguageModel:
  """A model by name or path (`pretrained.load_pretrained`); a run folder or checkpoint gives
  its trained policy."""
  candidate = pathlib.Path(path)
  if (candidate / "checkpoints").is_dir() or candidate.parent.name == "checkpoints":
    run = load_run(candidate)
    log.info("evaluating %s at step %d", path, run.step)
    lm = run.trainer.policy_model()
    lm.batch_size = batch_size
    return lm
  return pretrained.load_pretrained(path, dtype, gguf_file, batch_size=batch_size)
