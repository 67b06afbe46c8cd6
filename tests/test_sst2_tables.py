"""scripts/sst2_tables.py on run folders laid out as scripts/label_noise.sh and
scripts/reward_model.sh leave them."""
import json
import math
import pathlib

import numpy as np

from tests.conftest import load_script


def _module():
  return load_script("sst2_tables")


def _run(path: pathlib.Path, correct: list[bool], unparsed: float = 0.0) -> None:
  """A finished run whose dev answers are right where `correct` says (gold labels alternate)."""
  path.mkdir(parents=True)
  (path / "done").touch()
  predictions = [{"idx": i, "label": i % 2, "prediction": i % 2 if ok else 1 - i % 2}
                 for i, ok in enumerate(correct)]
  (path / "dev_full.json").write_text(json.dumps({"unparsed_rate": unparsed,
                                                  "predictions": predictions}))


def test_interval_of_an_accuracy_is_the_binomial_one():
  module = _module()
  n, p = 872, 0.8
  correct = np.zeros((1, n))
  correct[0, :round(p * n)] = 1
  low, high = module.Sentences(list(range(n))).interval(correct)
  half = 1.96 * math.sqrt(p * (1 - p) / n)    # the normal approximation, independent of ours
  np.testing.assert_allclose([low, high], [p - half, p + half], atol=0.004)


def test_label_noise_table(tmp_path):
  module = _module()
  n = 400
  right = lambda k: [i < k for i in range(n)]        # the first k answers right
  _run(tmp_path / "noise_0/sft_seed0", right(300))
  _run(tmp_path / "noise_0/sft_seed1", right(320))
  _run(tmp_path / "noise_0/ppo_seed0", right(340))
  _run(tmp_path / "noise_0/ppo_seed1", right(340))
  _run(tmp_path / "noise_0.2/sft_seed0", right(300))
  _run(tmp_path / "noise_0.2/sft_seed1", right(320))
  _run(tmp_path / "noise_0.2/ppo_seed0", right(200), unparsed=0.25)
  (tmp_path / "noise_0.2/ppo_seed1").mkdir()            # unfinished: left out
  rows = {line.split(" | ")[0]: line.split(" | ")
          for line in module.label_noise(tmp_path).splitlines()}
  clean, noisy = rows["| 0"], rows["| 0.2"]
  assert clean[1].startswith("0.775 (0.750..0.800) [")
  assert clean[2].startswith("0.850 (0.850..0.850) [")
  assert clean[3].startswith("+0.075 [")
  # SFT's answers did not change: its change is exactly 0, interval included.
  assert noisy[4] == "+0.000 [+0.000, +0.000]"
  # PPO seed 0 lost 140 of 400 sentences, seed 1 unfinished: one pair, -0.35.
  assert noisy[5].startswith("-0.350 [")
  assert noisy[6].startswith("-0.350 [")
  low, high = map(float, noisy[6].split("[")[1].rstrip("]").split(","))
  assert low < -0.35 < high
  assert noisy[7:9] == ["2 / 1", "0% / 25% |"]


def test_reward_model_table(tmp_path):
  module = _module()
  _run(tmp_path / "gold/ppo_seed0", [True] * 8 + [False] * 2)
  _run(tmp_path / "rm/ppo_rm_seed0", [False] * 10, unparsed=1.0)
  eval_dir = tmp_path / "rm/rm_seed0/eval"
  eval_dir.mkdir(parents=True)
  (tmp_path / "rm/rm_seed0/done").touch()
  (eval_dir / "step_000030.json").write_text(json.dumps({"auc": 0.9, "predictions": [
      {"idx": i, "label": 1, "prediction": int(i < 6)} for i in range(10)]}))
  text = module.reward_model(tmp_path / "rm", tmp_path / "gold")
  assert "accuracy 0.600 [" in text and "AUC 0.900 (0.900..0.900)" in text
  rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines()}
  assert rows["| gold label"][2].startswith("0.800 [")
  assert rows["| reward model"][2] == "0.000 [0.000, 0.000]"
  assert rows["| reward model"][3].startswith("-0.800 [")
  assert rows["| reward model + answer format"][2:4] == ["-", ""]
