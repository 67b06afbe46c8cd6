"""scripts/seed_tables.py on results files laid out as `jax-nlu-ppo eval --skip-done` writes
them for scripts/results.sh."""
import json

import numpy as np
from scipy import stats

from tests.conftest import load_script

N = 40


def _entry(model, set_name, correct, shots=0, shot_seed=0, unparsed=0.0):
  predictions = [{"idx": i, "label": i % 2, "prediction": i % 2 if ok else 1 - i % 2}
                 for i, ok in enumerate(correct)]
  return {"model": model, "set": set_name, "unparsed_rate": unparsed,
          "cell": {"shots": shots, "shot_seed": shot_seed}, "predictions": predictions}


def test_main_table_means_seed_intervals_and_paired_differences(tmp_path):
  module = load_script("seed_tables")
  rng = np.random.default_rng(0)
  sft = (rng.random((3, N)) < 0.6)
  ppo = (rng.random((3, N)) < 0.8)
  base = (rng.random(N) < 0.3)
  dev, ood = "sst2 validation", "sst2 tweeteval_sentiment_test.jsonl"
  entries = [_entry("smollm2-135m-instruct", dev, base, unparsed=0.5)]
  entries += [_entry(f"runs/main/sft_seed{s}", dev, sft[s]) for s in range(3)]
  entries += [_entry(f"runs/main/ppo_seed{s}", dev, ppo[s]) for s in range(3)]
  (tmp_path / "main").mkdir()
  (tmp_path / "main" / "eval_dev.json").write_text(json.dumps({"evaluations": entries}))
  (tmp_path / "main" / "eval_ood.json").write_text(json.dumps({"evaluations": [
      _entry(f"runs/main/ppo_seed{s}", ood, ppo[s][::-1]) for s in range(2)]}))
  text, cells, _ = module.main_tables(tmp_path)
  main_table = text.split("Transfer")[0]
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in main_table.splitlines()
          if line.startswith("| ") and "---" not in line}
  # PPO's dev cell: mean, Student-t over the 3 seeds (NumPy/SciPy by hand), min..max.
  accs = ppo.mean(axis=1)
  half = stats.t.ppf(0.975, 2) * accs.std(ddof=1) / np.sqrt(3)
  assert rows["PPO"][1] == (f"{accs.mean():.3f} [{accs.mean() - half:.3f}, "
                            f"{accs.mean() + half:.3f}] ({accs.min():.3f}..{accs.max():.3f}) n=3")
  # PPO minus SFT: per-sentence seed means differenced, bootstrapped over the sentences.
  d = ppo.mean(axis=0) - sft.mean(axis=0)
  draws = np.random.default_rng(0).integers(0, N, size=(10_000, N))
  lo, hi = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
  assert rows["PPO"][2] == f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
  assert rows["zero-shot"][1] == f"{base.mean():.3f} n=1" and rows["zero-shot"][4] == "50% |"
  # The transfer table has PPO (two seeds) on TweetEval and nothing to compare it with.
  transfer = [line for line in text.splitlines() if line.startswith("| PPO |")][-1]
  assert transfer.split(" | ")[1].endswith("n=2") and transfer.split(" | ")[2] == "-"
  module.plot(cells, list(cells.order), str(tmp_path / "main.png"))
  assert (tmp_path / "main.png").stat().st_size > 0


def test_models_scored_on_other_examples_are_refused(tmp_path):
  module = load_script("seed_tables")
  (tmp_path / "main").mkdir()
  entries = [_entry("runs/main/sft_seed0", "sst2 validation", [True] * N),
             _entry("runs/main/ppo_seed0", "sst2 validation", [True] * (N - 1))]
  (tmp_path / "main" / "eval_dev.json").write_text(json.dumps({"evaluations": entries}))
  try:
    module.main_tables(tmp_path)
  except ValueError as e:
    assert "ppo_seed0 on sst2 validation: scored other examples" in str(e)
  else:
    raise AssertionError("no error")
