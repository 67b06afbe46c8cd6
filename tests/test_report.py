"""Reports: plots and report.md of synthetic PPO and SFT runs, checked against NumPy; bad input
named in one line; a tiny PPO run leaves config.yaml (which loads back) and samples.jsonl."""
import json
import logging
import re

import numpy as np
import pytest

from jax_nlu_ppo import cli
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo import report
from tests import checkpoint_run

PPO_KEYS = ("env/reward_mean", "env/accuracy", "objective/kl", "loss/value", "policy/clipfrac")
SFT_KEYS = ("sft/loss", "sft/grad_norm")


def write_run(folder, keys, steps, seed):
  """A metrics.jsonl of random values; returns them as {key: array over steps}."""
  rng = np.random.default_rng(seed)
  values = {key: rng.normal(size=steps) for key in keys}
  folder.mkdir(parents=True)
  with open(folder / "metrics.jsonl", "w") as f:
    for i in range(steps):
      f.write(json.dumps({"iteration": i + 1, "time/step": 0.1,
                          **{k: float(v[i]) for k, v in values.items()}}) + "\n")
  return values


def table_rows(section: str) -> dict[str, list[str]]:
  return {cells[0]: cells[1:] for line in section.splitlines() if line.startswith("| ")
          for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_report_plots_and_summarises_both_runs(tmp_path):
  ppo = write_run(tmp_path / "ppo_run", PPO_KEYS, steps=12, seed=0)
  sft = write_run(tmp_path / "sft_run", SFT_KEYS, steps=7, seed=1)
  (tmp_path / "sft_run" / "config.yaml").write_text(
      "data:\n  task: sst2\nbatch_size: 4\n")
  out = tmp_path / "out"
  assert cli.main(["report", str(tmp_path / "ppo_run"), str(tmp_path / "sft_run"),
                   "--output", str(out)]) == 0

  assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = (out / "report.md").read_text()
  assert "![metrics](metrics.png)" in text
  ppo_part, sft_part, final = re.split(r"^## ", text, flags=re.M)[1:]
  assert ppo_part.startswith("ppo_run\n") and "12 steps" in ppo_part
  assert sft_part.startswith("sft_run (sft, sst2)\n") and "7 steps" in sft_part
  for part, values in ((ppo_part, ppo), (sft_part, sft)):
    rows = table_rows(part)
    shown = [k for k in values if k in report.METRICS]
    assert [k for k in rows if k != "metric"] == shown   # sft/grad_norm is not a reported one
    for key in shown:
      first, last = (float(x) for x in rows[key])
      np.testing.assert_allclose([first, last], [values[key][:5].mean(), values[key][-5:].mean()],
                                 rtol=1e-3, atol=1e-4, err_msg=key)
  final_rows = table_rows(final)
  assert final_rows["metric"] == ["ppo_run", "sft_run (sft, sst2)"]
  np.testing.assert_allclose(float(final_rows["objective/kl"][0]), ppo["objective/kl"][-5:].mean(),
                             rtol=1e-3, atol=1e-4)
  assert final_rows["objective/kl"][1] == "" and final_rows["sft/loss"][0] == ""


def test_malformed_line_is_named_and_skipped(tmp_path, caplog):
  write_run(tmp_path / "run", ("sft/loss",), steps=3, seed=0)
  with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
    f.write('{"iteration": 4, "sft/lo')      # a line cut short by a kill
  with caplog.at_level(logging.WARNING):
    run = report.read_run(tmp_path / "run")
  assert len(run.lines) == 3
  assert f"{tmp_path / 'run' / 'metrics.jsonl'} line 4: skipped" in caplog.text


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such run folder"),
    (lambda d: d.mkdir(), "no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("\n")), "no metrics lines"),
])
def test_bad_run_folder_is_one_line_error(tmp_path, capsys, setup, message):
  run = tmp_path / "run"
  setup(run)
  assert cli.main(["report", str(run), "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("jax-nlu-ppo report: error:") and message in err
  assert not (tmp_path / "out").exists()


def test_ppo_run_writes_config_and_samples(tmp_path):
  trainer = checkpoint_run.make_trainer(tmp_path, enabled=False)
  trainer.train(steps=2)
  assert config_lib.load_config(tmp_path / "config.yaml") == trainer.config
  samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert [s["iteration"] for s in samples] == [1] * 4 + [2] * 4
  examples = {ex["sentence"]: ex["label"] for ex in checkpoint_run.EXAMPLES}
  for sample in samples:
    assert sample["gold"] == examples[sample["prompt"]]
    assert isinstance(sample["response"], str) and isinstance(sample["reward"], float)
    assert sample["label"] in (None, 0, 1)
