"""A reward function of the user's: loading, the checks on its values, and PPO runs that use it."""
import json
import math

import numpy as np
import pytest

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import answer
from jax_nlu_ppo.rl import reward_fn
from tests.test_ppo_core import tiny_trainer

ROWS = [{"sentence": "a", "label": 1, "idx": 7}, {"sentence": "b", "label": 0, "idx": 9}]

# Records what it was called with (in a JSON lines file beside it), and scores each response by
# its length in characters; raises on the call that `fail_on` names.
FUNCTIONS = '''
import json, pathlib
LOG = pathlib.Path(__file__).with_suffix(".calls.jsonl")
fail_on = None

def length(prompts, responses, labels, rows):
  calls = LOG.read_text().count("\\n") if LOG.exists() else 0
  if fail_on == calls:
    raise ValueError("scorer offline")
  with LOG.open("a") as f:
    f.write(json.dumps({"prompts": prompts, "responses": responses, "labels": labels,
                        "idx": [r["idx"] for r in rows]}) + "\\n")
  return [float(len(r)) for r in responses]

def failing_second(prompts, responses, labels, rows):
  global fail_on
  fail_on = 1
  return length(prompts, responses, labels, rows)
'''


@pytest.fixture
def functions_file(tmp_path):
  path = tmp_path / "my_rewards.py"
  path.write_text(FUNCTIONS)
  return path


def _calls(path):
  return [json.loads(line) for line in path.with_suffix(".calls.jsonl").read_text().splitlines()]


def test_loads_from_a_module_or_a_file(functions_file):
  assert reward_fn.load("math:hypot") is math.hypot
  fn = reward_fn.load(f"{functions_file}:length")
  assert fn(prompts=["p"], responses=["four"], labels=[1], rows=ROWS[:1]) == [4.0]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_x:f", "cannot import no_such_module_x"),
    ("math:no_such_name", "math has no function 'no_such_name'"),
    ("/nowhere/rewards.py:f", "no such file /nowhere/rewards.py"),
])
def test_a_function_that_cannot_be_loaded_is_named(spec, message):
  with pytest.raises(reward_fn.RewardFunctionError, match=message) as e:
    reward_fn.load(spec)
  assert spec in str(e.value)


def test_the_config_rejects_a_malformed_name_or_no_reward_at_all():
  with pytest.raises(config_lib.ConfigError, match="package.module:name"):
    config_lib.load_config(None, ["reward.function=just_a_name"])
  with pytest.raises(config_lib.ConfigError, match="label_weight=0 leaves no reward"):
    config_lib.load_config(None, ["reward.label_weight=0"])
  with pytest.raises(config_lib.ConfigError, match="function_weight must be a finite"):
    config_lib.load_config(None, ["reward.function=m:f", "reward.function_weight=.nan"])


@pytest.mark.parametrize("values, message", [
    ([1.0], "returned 1 values for 2 rows"),
    ([1.0, float("nan")], r"returned nan for row 1 \(idx 9\); rewards must be finite"),
    ([float("inf"), 0.0], r"returned inf for row 0 \(idx 7\)"),
    ([1.0, "high"], r"returned 'high' for row 1 \(idx 9\), not a number"),
    (3.0, "returned float, not a sequence of 2 numbers"),
])
def test_values_that_cannot_be_rewards_stop_with_the_function_and_row(values, message):
  with pytest.raises(reward_fn.RewardFunctionError, match=message) as e:
    reward_fn.score(lambda **_: values, "mine:f", ["p", "q"], ["x", "y"], [1, None], ROWS)
  assert "reward.function mine:f" in str(e.value)


def test_a_function_that_raises_is_named_with_its_batch():
  def broken(**_):
    raise KeyError("label")
  with pytest.raises(reward_fn.RewardFunctionError,
                     match=r"mine:f raised KeyError: 'label' \(on a batch of 2 rows, the first "
                           r"idx 7\)"):
    reward_fn.score(broken, "mine:f", ["p", "q"], ["x", "y"], [1, None], ROWS)


def test_good_values_come_back_as_float32():
  out = reward_fn.score(lambda **_: (np.float64(0.5), 2), "mine:f", ["p", "q"], ["x", "y"],
                        [1, None], ROWS)
  assert out.dtype == np.float32 and out.tolist() == [0.5, 2.0]


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_adds_the_weighted_function_to_the_label_reward(functions_file, advantage):
  """Each row's reward is 0.5 x its label reward + 0.25 x the function's value; the function sees
  the prompts the model answered, its decoded answers, the parsed labels and the data rows."""
  ppo = {"advantage": advantage, "group_size": 2} if advantage == "grpo" else {}
  trainer = tiny_trainer(reward={"function": f"{functions_file}:length", "label_weight": 0.5,
                                 "function_weight": 0.25}, ppo_options=ppo)
  metrics = trainer.step()
  call = _calls(functions_file)[-1]
  examples, specs, preds, scores = trainer.last_rows
  lengths = np.asarray([len(r) for r in trainer.last_responses()], np.float32)
  assert call["responses"] == trainer.last_responses()
  assert call["labels"] == list(preds) and call["idx"] == [ex["idx"] for ex in examples]
  assert all(ex["sentence"].split()[0] in p for ex, p in zip(examples, call["prompts"]))
  label = np.asarray([answer.reward(p, ex["label"], regression=False,
                                    config=answer.RewardConfig(lenient=True))
                      for p, ex in zip(preds, examples)], np.float32)
  np.testing.assert_allclose(scores, 0.5 * label + 0.25 * lengths, rtol=1e-6)
  assert metrics["env/reward_mean"] == pytest.approx(float(np.mean(0.5 * label + 0.25 * lengths)))
  assert metrics["env/function_reward_mean"] == pytest.approx(float(lengths.mean()))
  assert metrics["env/label_reward_mean"] == pytest.approx(float(label.mean()))


def test_a_failing_function_stops_the_run_and_keeps_what_was_saved(functions_file, tmp_path):
  """The function raises in the second iteration: training stops with its error, step 1's
  checkpoint and metrics stay, and a run with a working function continues from them."""
  run = tmp_path / "run"
  every_step = checkpoint_lib.CheckpointConfig(every_steps=1)
  trainer = tiny_trainer(str(run), reward={"function": f"{functions_file}:failing_second"},
                         checkpoint=every_step)
  with pytest.raises(reward_fn.RewardFunctionError, match="failing_second raised ValueError: "
                                                          "scorer offline"):
    trainer.train(steps=3)
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
  resumed = tiny_trainer(str(run), reward={"function": f"{functions_file}:length"},
                         checkpoint=every_step)
  assert resumed.iteration == 1
  assert [m["iteration"] for m in resumed.train(steps=1)] == [2]


def test_the_shipped_format_reward_reads_only_whether_a_label_was_parsed():
  fn = reward_fn.load("jax_nlu_ppo.rl.reward_fn:answer_format")
  values = reward_fn.score(fn, "answer_format", ["p"] * 3, [" Positive", " Negative or", ""],
                           [1, None, 0], [{"label": 0}] * 3)
  np.testing.assert_array_equal(values, np.float32([0, -3, 0]))
