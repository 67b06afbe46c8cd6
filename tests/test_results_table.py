"""scripts/results_table.py on a folder laid out as scripts/reproduce.sh leaves it."""
import json
import pathlib

from tests.conftest import load_script


def _module():
  return load_script("results_table")


def _write(path: pathlib.Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value))


def _run(path: pathlib.Path, final: dict) -> None:
  path.mkdir(parents=True)
  lines = [{"iteration": 0, "eval/accuracy": 0.1}, {"iteration": 1, "loss": 2.0},
           {"iteration": 2, **{f"eval/{k}": v for k, v in final.items()}}]
  (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_table_and_plot(tmp_path):
  out = tmp_path / "reproduce"
  # Gold labels 0, 1, 1, 1: one label for every example scores at best 0.75.
  _write(out / "sst2/eval_0shot.json", {"accuracy": 0.2, "unparsed_rate": 0.5, "predictions": [
      {"label": gold, "prediction": None} for gold in (0, 1, 1, 1)]})
  _write(out / "sst2/eval_4shot.json", {"accuracy": 0.6, "unparsed_rate": 0.0})
  _run(out / "sst2/sft_seed0", {"accuracy": 0.7, "unparsed_rate": 0.0})
  _run(out / "sst2/sft_seed1", {"accuracy": 0.8, "unparsed_rate": 0.1})
  _run(out / "sst2/ppo_seed0", {"accuracy": 0.9, "unparsed_rate": 0.0})
  _write(out / "sst2/perplexity_base.json", {"perplexity": 10.0})
  _write(out / "sst2/perplexity_ppo_seed0.json", {"perplexity": 10.5})
  _write(out / "mrpc/eval_0shot.json", {"f1": 0.0, "accuracy": 0.1, "unparsed_rate": 0.8})
  _write(out / "multitask/ppo_seed0/eval_mrpc.json", {"f1": 0.75, "unparsed_rate": 0.0})
  (out / "wall_times.tsv").write_text("sst2 0-shot\t99\nsst2 PPO seed 0\t1176\n")

  module = _module()
  found = module.scores(out)
  constants = {name: module.constant_answer(name, cells) for name, cells in found.items()}
  text = module.table(out, found, constants)
  rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
  # The task's official metric (MRPC: F1), seeds as mean (min..max), unparsed rates averaged.
  assert rows["| sst2 (accuracy)"] == (
      "| sst2 (accuracy) | 0.200 [50%] | 0.600 [0%] | 0.750 (0.700..0.800) [5%] | 0.900 [0%] "
      "| not run |")
  assert rows["| mrpc (f1)"] == "| mrpc (f1) | 0.000 [80%] | not run | not run | not run | 0.750 [0%] |"
  assert rows["| sst2"] == "| sst2 | 10.00 |  | 10.50 |"
  assert "| sst2 PPO seed 0 | 1176 |" in text
  assert "Best constant answer: sst2 0.750\n" in text

  module.plot(found, constants, tmp_path / "scores.png")
  assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
