"""Reports: plots and report.md of synthetic PPO and SFT runs, checked against NumPy; bad input
named in one line; a tiny PPO run leaves config.yaml (which loads back), samples.jsonl and
TensorBoard scalars equal to metrics.jsonl; the CLI's step progress bar."""
import io
import json
import logging
import re
import struct
import sys

import numpy as np
import pytest

from jax_nlu_ppo import cli
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.tools import report
from jax_nlu_ppo.rl import run_loop
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


def test_seeds_of_one_config_are_one_curve_mean_and_band(tmp_path):
  config = "data:\n  task: sst2\nppo:\n  cliprange: {clip}\nseed: {seed}\noutput_dir: {dir}\n"
  values = []
  for seed in range(3):
    folder = tmp_path / f"ppo_seed{seed}"
    # Seed 2 logged one step fewer: the group's curve keeps the steps every seed logged.
    values.append(write_run(folder, PPO_KEYS, steps=10 if seed < 2 else 9, seed=seed))
    (folder / "config.yaml").write_text(config.format(clip=0.2, seed=seed, dir=folder))
  other = tmp_path / "clip_seed0"
  write_run(other, PPO_KEYS, steps=10, seed=5)
  other.joinpath("config.yaml").write_text(config.format(clip=0.4, seed=0, dir=other))
  runs = [report.read_run(tmp_path / f"ppo_seed{s}") for s in range(3)]
  groups = report.group_seeds([runs[0], report.read_run(other), runs[1], runs[2]])
  assert [g.label for g in groups] == ["ppo (ppo, sst2), seeds 0, 1, 2", "clip_seed0 (ppo, sst2)"]
  group = groups[0]
  kl_sn = np.stack([v["objective/kl"][:9] for v in values])
  steps, mean = group.series("objective/kl")
  np.testing.assert_array_equal(steps, np.arange(1, 10))
  np.testing.assert_allclose(mean, kl_sn.mean(axis=0))
  band_steps, low, high = group.band("objective/kl")
  np.testing.assert_allclose([low, high], [kl_sn.min(axis=0), kl_sn.max(axis=0)])
  assert report.read_run(other).band("objective/kl") is None

  out = tmp_path / "out"
  assert cli.main(["report", *(str(tmp_path / f"ppo_seed{s}") for s in range(3)), str(other),
                   "--output", str(out), "--group-seeds"]) == 0
  final = table_rows(re.split(r"^## ", (out / "report.md").read_text(), flags=re.M)[-1])
  assert final["metric"] == ["ppo (ppo, sst2), seeds 0, 1, 2", "clip_seed0 (ppo, sst2)"]
  finals = [v["objective/kl"][-5:].mean() for v in values]
  shown = re.fullmatch(r"(\S+) \((\S+)\.\.(\S+)\)", final["objective/kl"][0]).groups()
  np.testing.assert_allclose([float(x) for x in shown],
                             [kl_sn[:, -5:].mean(), min(finals), max(finals)], rtol=1e-3)


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


def read_scalars(folder) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the event files in `folder`, read as TFRecords (length, its CRC,
  the Event proto, its CRC), since TensorBoard itself is not a dependency."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_ppo_run_writes_tensorboard_scalars(tmp_path):
  trainer = checkpoint_run.make_trainer(tmp_path, enabled=False)
  trainer.train(steps=2)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  scalars = read_scalars(tmp_path / run_loop.TENSORBOARD_DIR)
  assert "iteration" not in scalars
  for tag in ("env/reward_mean", "objective/kl", "tokens/per_s"):
    expected = {line["iteration"]: line[tag] for line in lines}
    assert scalars[tag].keys() == {1, 2}
    np.testing.assert_allclose([scalars[tag][i] for i in (1, 2)], [expected[i] for i in (1, 2)],
                               rtol=1e-6, err_msg=tag)


class FakeTrainer:
  total_steps, iteration = 3, 1     # a continued run: the bar starts at 1

  def train(self, on_step):
    for reward in (0.5, 0.75):
      self.iteration += 1
      on_step({"iteration": self.iteration, "env/reward_mean": reward, "tokens/per_s": 1000.0})


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_step_progress_bar_on_terminal_log_lines_otherwise(monkeypatch, caplog):
  terminal = Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  assert cli._run_trainer(FakeTrainer(), lambda m: f"line {m['iteration']}") == 0
  shown = terminal.getvalue()
  assert "3/3" in shown and "reward=0.75" in shown and "tok/s=1e+03" in shown
  assert "line" not in shown and "kl=" not in shown

  monkeypatch.setattr(sys, "stderr", io.StringIO())
  with caplog.at_level(logging.INFO, logger="jax_nlu_ppo"):
    cli._run_trainer(FakeTrainer(), lambda m: f"line {m['iteration']}")
  assert [r.message for r in caplog.records] == ["line 2", "line 3"]
