"""Reading a finished (or stopped) run back: its config, base model and trained adapters.

A run folder is what `train`, `sft` and `reward-model` write under `output_dir`
(`checkpoints/<step>/...`); a checkpoint is one of its step folders. Export and evaluation of a
run go through `load_run`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo import storage
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


def load_run(path: storage.PathLike, lm: pretrained.LanguageModel | None = None) -> LoadedRun:
  """The run at `path` (a run folder: its latest good step; or a step folder), with its base.

  The base is loaded as the run's config names it unless `lm` is given; the checkpoint's
  description of the base must match it (else `CheckpointMismatchError`).
  """
  saved = run_loop.saved_run(path)
  cls, trainer_cls = {
      "ppo": (config_lib.TrainConfig, trainer_lib.PPOTrainer),
      "sft": (sft.SFTConfig, sft.SFTTrainer),
      "reward_model": (reward_model.RewardModelConfig, reward_model.RewardModelTrainer),
  }[run_loop.run_kind(saved.config)]
  trainer, step = run_loop.restore_saved(saved, cls, trainer_cls, lm)
  return LoadedRun(trainer.config, step, trainer)


def load_model(path: str, dtype: str = "float32", gguf_file: str | None = None,
               batch_size: int = 32) -> pretrained.LanguageModel:
  """A model by name or path (`pretrained.load_pretrained`); a run folder or checkpoint gives
  its trained policy (either may be in a bucket, `gs://...`)."""
  candidate = storage.path(path)
  if (candidate / "checkpoints").is_dir() or candidate.parent.name == "checkpoints":
    run = load_run(candidate)
    log.info("evaluating %s at step %d", path, run.step)
    lm = run.trainer.policy_model()
    lm.batch_size = batch_size
    return lm
  return pretrained.load_pretrained(path, dtype, gguf_file, batch_size=batch_size)
