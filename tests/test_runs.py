"""Reading a run back (for export and evaluation): the latest or a chosen checkpoint step."""
import jax
import numpy as np
import pytest

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import cli
from jax_nlu_ppo.runs import export
from jax_nlu_ppo.rl import peft_adapter
from jax_nlu_ppo.runs import reader as runs
from tests.checkpoint_run import make_trainer, tiny_lm


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_load_run_reads_the_latest_or_a_chosen_step_and_exports(tmp_path):
  lm = tiny_lm()
  trainer = make_trainer(tmp_path / "run", lm=lm)
  trainer.train(steps=2)
  trainer.checkpointer.wait()
  final = leaves(trainer.state.trainable)

  run = runs.load_run(tmp_path / "run", lm=lm)
  assert run.step == 2 and run.config.lora.rank == 4 and run.config.output_dir is None
  for a, b in zip(leaves(run.trainable), final):
    np.testing.assert_array_equal(a, b)
  first = runs.load_run(tmp_path / "run" / "checkpoints" / "1", lm=lm)
  assert first.step == 1
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(first.trainable), final))

  # The run's adapters survive a PEFT export and reload exactly.
  folder = export.export_peft(run.lm, run.trainable, run.config.lora, tmp_path / "peft")
  lora, trainable = peft_adapter.load_peft_adapter(folder, lm)
  assert lora == run.config.lora
  for a, b in zip(leaves(trainable), final):
    np.testing.assert_array_equal(a, b)


def test_bad_run_paths_are_one_line_errors(tmp_path, capsys):
  with pytest.raises(checkpoint_lib.CheckpointReadError, match="neither a run folder"):
    runs.load_run(tmp_path)
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(checkpoint_lib.CheckpointReadError, match="no complete checkpoint"):
    runs.load_run(tmp_path / "run")
  assert cli.main(["export", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
  assert "does not exist" in capsys.readouterr().err
