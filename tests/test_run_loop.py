"""run_loop.run_steps' evaluation schedule, with a stand-in trainer: which steps are scored
and where the scores land, without a model."""
import json

import numpy as np
import pytest

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import data as data_lib
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.rl import run_loop


class StandIn:
  """What run_steps needs of a trainer: a config, an iteration count, step and evaluate (and
  snapshots to checkpoint); the iterations in `skip` skip every update."""
  skipped_metric = "standin/skipped"

  def __init__(self, config, skip=()):
    self.config, self.iteration, self.scored_at, self.skip = config, 0, [], set(skip)

  def step(self):
    self.iteration += 1
    return {"iteration": self.iteration, "loss": 1.0 / self.iteration,
            self.skipped_metric: float(self.iteration in self.skip)}

  def snapshot(self):
    return checkpoint_lib.Snapshot({"x": np.full(2, self.iteration, np.float32)},
                                   {"iteration": self.iteration})

  def evaluate(self, rows, task):
    self.scored_at.append(self.iteration)
    return evaluate_lib.EvalResult(task, {"accuracy": self.iteration / 10, "count": len(rows)},
                                   [{} for _ in rows], None, lenient=True)


@pytest.mark.parametrize("eval_before, scored_at", [(True, [0, 2, 3]), (False, [2, 3])])
def test_eval_schedule(tmp_path, eval_before, scored_at):
  rows = tmp_path / "dev.jsonl"
  rows.write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n"
                          for i in range(3)))
  config = config_lib.TrainConfig(
      eval_data=data_lib.DataConfig(task="sst2", source="file", path=str(rows)),
      eval_every=2, eval_before=eval_before)
  trainer = StandIn(config)
  history = run_loop.run_steps(trainer, steps=3, output_dir=str(tmp_path / "run"))

  assert trainer.scored_at == scored_at
  lines = [json.loads(x) for x in (tmp_path / "run" / run_loop.METRICS_FILE).read_text()
           .splitlines()]
  assert lines == history
  # A step-0 line only for the starting evaluation; each score joins its step's line.
  assert [line["iteration"] for line in lines] == ([0] if eval_before else []) + [1, 2, 3]
  assert {line["iteration"]: line["eval/accuracy"] for line in lines
          if "eval/accuracy" in line} == {step: step / 10 for step in scored_at}
  assert sorted(p.name for p in (tmp_path / "run" / run_loop.EVAL_DIR).iterdir()) == [
      f"step_{step:06d}.json" for step in scored_at]


def test_iterations_that_skip_every_update_stop_the_run_and_are_not_saved(tmp_path):
  config = config_lib.TrainConfig(max_skipped_steps=3)
  # Iterations 2 and 3 skip (two in a row: the run goes on), then 5, 6 and 7 (three: it stops).
  trainer = StandIn(config, skip={2, 3, 5, 6, 7})
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints",
                                             checkpoint_lib.CheckpointConfig(every_steps=1, keep=9),
                                             {"config": {}})
  with pytest.raises(run_loop.RunawayLossError) as error:
    run_loop.run_steps(trainer, steps=10, output_dir=str(tmp_path / "run"),
                       checkpointer=checkpointer)
  message = str(error.value)
  assert "iterations 5..7" in message and "step 4" in message and "learning_rate" in message
  # Saved: the iterations that updated, none of those that skipped; nothing after the stop.
  assert checkpointer.steps() == [1, 4]
  lines = (tmp_path / "run" / run_loop.METRICS_FILE).read_text().splitlines()
  assert [json.loads(x)["iteration"] for x in lines] == list(range(1, 8))


@pytest.mark.parametrize("limit", [0, 4])
def test_a_shorter_run_of_skips_or_no_limit_trains_on(tmp_path, limit):
  trainer = StandIn(config_lib.TrainConfig(max_skipped_steps=limit), skip={2, 3, 4})
  history = run_loop.run_steps(trainer, steps=6, output_dir=None)
  assert [m["iteration"] for m in history] == list(range(1, 7))


def test_max_skipped_steps_must_not_be_negative():
  with pytest.raises(config_lib.ConfigError, match="max_skipped_steps must be >= 0"):
    config_lib.TrainConfig(max_skipped_steps=-1)
