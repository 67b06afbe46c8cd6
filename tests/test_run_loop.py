"""run_loop.run_steps' evaluation schedule, with a stand-in trainer: which steps are scored
and where the scores land, without a model."""
import json

import pytest

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import data as data_lib
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.rl import run_loop


class StandIn:
  """What run_steps needs of a trainer: a config, an iteration count, step and evaluate."""

  def __init__(self, config):
    self.config, self.iteration, self.scored_at = config, 0, []

  def step(self):
    self.iteration += 1
    return {"iteration": self.iteration, "loss": 1.0 / self.iteration}

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
