"""`jax-nlu-ppo eval` with several models and data sets: one results file, one table, and a call
that continues an interrupted or growing table."""
import json

import pytest

from jax_nlu_ppo import cli
from tests.test_cli import SST2_ROWS, save_chat_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """Two tiny models (different weights, one tokenizer) and two SST-2-style files."""
  root = tmp_path_factory.mktemp("grid")
  models = []
  for seed in (0, 1):
    save_chat_model(root / f"model{seed}", seed)
    models.append(str(root / f"model{seed}"))
  data = []
  for name, part in (("first.jsonl", SST2_ROWS[:5]), ("second.jsonl", SST2_ROWS[3:])):
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in part))
    data.append(str(path))
  return root, models, data


def _eval(*args):
  return cli.main(["eval", "--task", "sst2", "--max-new-tokens", "3", *args])


def _flags(option, values):
  return [x for v in values for x in (option, v)]


def test_models_by_sets_in_one_file_and_table(workspace, capsys):
  root, models, data = workspace
  out, table = root / "grid.json", root / "grid.md"
  assert _eval(*_flags("--model", models), *_flags("--data", data), "--output", str(out),
               "--table", str(table)) == 0
  entries = json.loads(out.read_text())["evaluations"]
  assert [(e["model"], e["set"]) for e in entries] == [
      (m, f"sst2 {name}") for m in models for name in ("first.jsonl", "second.jsonl")]
  assert [e["n"] for e in entries] == [5, 5, 5, 5]
  # Each cell is what scoring that model on that file alone gives.
  for e in entries:
    alone = root / "alone.json"
    assert _eval("--model", e["model"], "--data", e["cell"]["data"], "--output",
                 str(alone)) == 0
    single = json.loads(alone.read_text())
    assert [p["response"] for p in e["predictions"]] == [
        p["response"] for p in single["predictions"]]
    assert e["accuracy"] == single["accuracy"] and e["intervals_95"] == single["intervals_95"]
  text = table.read_text()
  assert text.count(f"| {models[1]} | sst2 second.jsonl | 5 |") == 1
  assert len(text.splitlines()) == 2 + 4
  assert text.strip() in capsys.readouterr().out


def test_skip_done_scores_only_new_cells_and_keeps_the_rest(workspace, monkeypatch):
  root, models, data = workspace
  out = root / "growing.json"
  loaded = []
  real_load = cli._load_model

  def counting_load(args, model, *rest):
    loaded.append(model)
    return real_load(args, model, *rest)
  monkeypatch.setattr(cli, "_load_model", counting_load)
  assert _eval("--model", models[0], "--data", data[0], "--output", str(out), "--skip-done") == 0
  first = json.loads(out.read_text())["evaluations"]
  assert loaded == [models[0]] and len(first) == 1
  # A second model and a second file: only the three new cells load models; the old one stays.
  assert _eval(*_flags("--model", models), *_flags("--data", data), "--output", str(out),
               "--skip-done") == 0
  assert loaded == [models[0], models[0], models[1]]
  grown = json.loads(out.read_text())["evaluations"]
  assert len(grown) == 4 and grown[0] == first[0]
  # Another setting is another cell, added beside the others (a 2-shot seed, say).
  assert _eval("--model", models[1], "--data", data[0], "--shots", "2", "--shot-data", data[1],
               "--output", str(out), "--skip-done") == 0
  after = json.loads(out.read_text())["evaluations"]
  assert len(after) == 5 and after[:4] == grown and after[4]["cell"]["shots"] == 2
  # Everything done: no model loads at all.
  assert _eval(*_flags("--model", models), *_flags("--data", data), "--output", str(out),
               "--skip-done") == 0
  assert len(loaded) == 4


def test_skip_done_reads_a_setting_an_older_file_lacks_as_its_default(workspace, monkeypatch):
  root, models, data = workspace
  out = root / "older.json"
  assert _eval("--model", models[0], "--data", data[0], "--output", str(out), "--skip-done") == 0
  older = json.loads(out.read_text())
  for setting in ("offset", "loglik_normalize"):   # as if written before these existed
    del older["evaluations"][0]["cell"][setting]
  out.write_text(json.dumps(older))
  class Loaded(Exception):
    pass

  def refuse(args, model, *rest):
    raise Loaded(model)
  monkeypatch.setattr(cli, "_load_model", refuse)
  assert _eval("--model", models[0], "--data", data[0], "--output", str(out), "--skip-done") == 0
  assert json.loads(out.read_text()) == older
  # Another value than the default is another cell: the model is loaded to score it.
  with pytest.raises(Loaded):
    _eval("--model", models[0], "--data", data[0], "--offset", "1", "--output", str(out),
          "--skip-done")


def test_an_interrupted_call_keeps_the_models_scored(workspace, monkeypatch):
  root, models, data = workspace
  out = root / "interrupted.json"
  real_load = cli._load_model

  def failing_second(args, model, *rest):
    if model == models[1]:
      raise KeyboardInterrupt
    return real_load(args, model, *rest)
  monkeypatch.setattr(cli, "_load_model", failing_second)
  with pytest.raises(KeyboardInterrupt):
    _eval(*_flags("--model", models), "--data", data[0], "--output", str(out))
  assert [e["model"] for e in json.loads(out.read_text())["evaluations"]] == [models[0]]


def test_skip_done_refuses_a_file_it_did_not_write(workspace, capsys, monkeypatch):
  root, models, data = workspace
  single = root / "single.json"
  single.write_text(json.dumps({"task": "sst2", "accuracy": 0.5}))
  monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("loaded a model"))
  assert _eval("--model", models[0], "--data", data[0], "--output", str(single),
               "--skip-done") == 2
  assert f"{single}: not a results file of several evaluations" in capsys.readouterr().err


def test_offset_scores_rows_after_the_first_n(workspace):
  root, models, data = workspace
  out = root / "offset.json"
  # first.jsonl holds rows idx 0..4 in file order: held out after the first 3, at most 2.
  assert _eval("--model", models[0], "--data", data[0], "--offset", "3", "--limit", "5",
               "--output", str(out)) == 0
  result = json.loads(out.read_text())
  assert [p["idx"] for p in result["predictions"]] == [3, 4] and result["offset"] == 3


def test_the_second_model_of_one_shape_compiles_nothing(workspace, monkeypatch):
  from jax_nlu_ppo import compiles
  root, models, data = workspace
  counts = []
  real_load = cli._load_model

  def counting_load(args, model, *rest):
    counts.append(compiles.count())
    return real_load(args, model, *rest)
  monkeypatch.setattr(cli, "_load_model", counting_load)
  # A limit no other test uses: the first model compiles its shapes afresh.
  assert _eval(*_flags("--model", models), "--data", data[1], "--limit", "3",
               "--max-new-tokens", "4", "--output", str(root / "compiles.json")) == 0
  first_model = counts[1] - counts[0]
  assert first_model > 0 and compiles.count() == counts[1], (first_model, compiles.count())
