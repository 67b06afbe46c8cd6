"""data.label_noise: a seeded fraction of the training labels flipped to another label."""
import csv
import logging

import datasets
import numpy as np
import pytest

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import data


def _file(tmp_path, task: str, labels) -> str:
  """A data file of `task` with made-up text, one row per label (-1: unlabelled)."""
  path = tmp_path / f"{task}.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    if task == "mnli":
      writer.writerow(["premise", "hypothesis", "label", "idx"])
      writer.writerows([f"premise {i}", f"hypothesis {i}", label, 100 + i]
                       for i, label in enumerate(labels))
    else:
      writer.writerow(["sentence", "label", "idx"])
      writer.writerows([f"sentence {i}", label, 100 + i] for i, label in enumerate(labels))
  return str(path)


def _labels(path, task, **noise):
  ds, _ = data.load(data.DataConfig(task=task, source="file", path=path, **noise))
  return np.asarray(ds["label"]), np.asarray(ds["idx"])


def test_flips_the_seeded_fraction_to_other_labels(tmp_path, caplog):
  labels = [0, 1, 2] * 40
  path = _file(tmp_path, "mnli", labels)
  clean, idx = _labels(path, "mnli")
  with caplog.at_level(logging.DEBUG, logger="jax_nlu_ppo.nlu.data"):
    noisy, noisy_idx = _labels(path, "mnli", label_noise=0.25, label_noise_seed=3)
  assert (idx == noisy_idx).all()
  changed = np.flatnonzero(clean != noisy)
  assert len(changed) == 30                     # round(0.25 x 120 rows)
  assert (clean[changed] >= 0).all() and set(noisy[changed]) <= {0, 1, 2}
  # Each flipped row got one of the two other labels, both of them occurring.
  moves = {(int(a), int(b)) for a, b in zip(clean[changed], noisy[changed])}
  assert all(a != b for a, b in moves) and len(moves) >= 5
  # The flipped rows, logged: the first 20 in the warning, all of them at DEBUG level.
  warning, debug = [r for r in caplog.records if "label_noise" in r.getMessage()]
  assert warning.levelname == "WARNING" and "30 of 120 labels of mnli train flipped" in (
      warning.getMessage())
  assert sorted(eval(debug.getMessage().split("idx ")[1])) == sorted(idx[changed].tolist())
  # The same seed flips the same rows; another seed others; no noise, none.
  assert (_labels(path, "mnli", label_noise=0.25, label_noise_seed=3)[0] == noisy).all()
  other = _labels(path, "mnli", label_noise=0.25, label_noise_seed=4)[0]
  assert set(np.flatnonzero(other != clean)) != set(changed)
  assert (_labels(path, "mnli", label_noise=0.0)[0] == clean).all()


def test_unlabelled_rows_keep_their_mark():
  ds = datasets.Dataset.from_dict({"label": [0, 1, -1, -1, 1, 0, -1, 1]})
  noisy, flipped = data.flip_labels(ds, 0.6, seed=0, num_labels=2)
  assert len(flipped) == 3 and all(ds["label"][i] >= 0 for i in flipped)   # round(0.6 x 5)
  assert [noisy["label"][i] for i in (2, 3, 6)] == [-1, -1, -1]
  assert sum(a != b for a, b in zip(ds["label"], noisy["label"])) == 3


def test_binary_labels_swap_and_shuffle_comes_first(tmp_path):
  path = _file(tmp_path, "sst2", [0, 1] * 50)
  clean, idx = _labels(path, "sst2", shuffle_seed=1, limit=40)
  noisy, noisy_idx = _labels(path, "sst2", shuffle_seed=1, limit=40, label_noise=0.5)
  assert (idx == noisy_idx).all()
  changed = clean != noisy
  assert changed.sum() == 20 and (noisy[changed] == 1 - clean[changed]).all()


def test_noise_is_refused_where_it_has_no_meaning():
  with pytest.raises(ValueError, match=r"label_noise must be a fraction in \[0, 1\]"):
    data.DataConfig(task="sst2", label_noise=1.5)
  with pytest.raises(ValueError, match="stsb's labels are scores"):
    data.DataConfig(task="stsb", label_noise=0.2)
  with pytest.raises(config_lib.ConfigError, match="eval_data.label_noise must be 0"):
    config_lib.load_config(None, ["eval_data.task=sst2", "eval_data.label_noise=0.1"])


def test_a_reward_model_trains_on_the_same_flipped_rows(tmp_path):
  from jax_nlu_ppo.rl import reward_model, run_loop
  path = _file(tmp_path, "sst2", [0, 1] * 20)
  noise = {"label_noise": 0.4, "label_noise_seed": 3}
  config = reward_model.RewardModelConfig(
      data=data.DataConfig(task="sst2", source="file", path=path, **noise))
  rows, _ = run_loop.process_rows(config, 4)
  np.testing.assert_array_equal([r["label"] for r in rows], _labels(path, "sst2", **noise)[0])
  assert sum(r["label"] != i % 2 for i, r in enumerate(rows)) == 16


def test_offset_holds_out_the_rows_a_limit_read(tmp_path):
  path = _file(tmp_path, "sst2", [0, 1] * 20)
  read = lambda **cut: list(data.load(data.DataConfig(task="sst2", source="file", path=path,
                                                      shuffle_seed=5, **cut))[0]["idx"])
  every = read()
  assert read(limit=12) == every[:12]
  assert read(offset=12) == every[12:]
  assert read(offset=12, limit=5) == every[12:17]
  assert read(offset=40) == []
  with pytest.raises(ValueError, match="data.offset must be"):
    data.DataConfig(task="sst2", offset=-1)
