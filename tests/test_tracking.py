"""Weights & Biases logging (offline mode): the same numbers as metrics.jsonl and TensorBoard,
and a continued run continues its W&B run. The offline run file is read back record by record
(LevelDB log blocks of W&B's protobuf `Record`s), independently of our writer."""
import dataclasses
import json
import struct
import time

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from jax_nlu_ppo import config as config_lib  # noqa: E402
from jax_nlu_ppo import tracking  # noqa: E402
from jax_nlu_ppo.nlu import data as data_lib  # noqa: E402
from jax_nlu_ppo.rl import run_loop  # noqa: E402
from tests.test_run_loop import StandIn  # noqa: E402

BLOCK = 32768          # LevelDB log format: 32 KiB blocks of chunks with 7-byte headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
  raw = path.read_bytes()
  assert raw[:4] == b":W&B"
  records, pending, pos = [], b"", 7
  while pos + 7 <= len(raw):
    if BLOCK - pos % BLOCK < 7:          # a block's tail too short for a header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
    chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == FULL:
      records.append(chunk)
    elif kind == FIRST:
      pending = chunk
    elif kind in (MIDDLE, LAST):
      pending += chunk
      if kind == LAST:
        records.append(pending)
  out = []
  for data in records:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(data)
    out.append(record)
  return out


def logged(wandb_dir):
  """{run id: (the run record, [history rows without W&B's own keys])} of every offline run."""
  runs = {}
  for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
    # W&B's service writes the file after `finish` returns: wait for the run's exit record.
    deadline = time.time() + 60
    while "exit" not in [r.WhichOneof("record_type") for r in wandb_records(path)]:
      assert time.time() < deadline, f"{path} has no exit record"
      time.sleep(0.2)
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows = [{key: json.loads(item.value_json) for item in r.history.item
             if not (key := item.key or "/".join(item.nested_key)).startswith("_")}
            for r in records if r.WhichOneof("record_type") == "history"]
    previous = runs.get(run.run_id, (run, []))[1]
    runs[run.run_id] = (run, previous + rows)
  return runs


def test_wandb_gets_the_metrics_and_a_continued_run_continues(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  rows = tmp_path / "dev.jsonl"
  rows.write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n"
                          for i in range(3)))
  config = config_lib.TrainConfig(
      eval_data=data_lib.DataConfig(task="sst2", source="file", path=str(rows)), eval_every=2,
      logging=tracking.LoggingConfig(tracking.WandbConfig(project="nlu", tags=("sst2", "ppo"),
                                                          mode="offline")))
  out = tmp_path / "run"
  run_loop.run_steps(StandIn(config), steps=3, output_dir=str(out))
  # Stopped after 3; the continued run redoes nothing and logs 4 and 5 to the same W&B run.
  continued = StandIn(dataclasses.replace(config, eval_before=False))
  continued.iteration = 3
  run_loop.run_steps(continued, steps=2, output_dir=str(out))

  runs = logged(tmp_path)
  run_id = (out / tracking.RUN_ID_FILE).read_text().strip()
  assert list(runs) == [run_id]
  run, history = runs[run_id]
  assert (run.project, run.display_name, list(run.tags)) == ("nlu", "run", ["sst2", "ppo"])
  config_logged = {item.key: json.loads(item.value_json) for item in run.config.update}
  assert config_logged["logging"]["wandb"]["project"] == "nlu"
  lines = [json.loads(x) for x in (out / run_loop.METRICS_FILE).read_text().splitlines()]
  expected = [{"iteration": line["iteration"], **tracking.scalars(line)} for line in lines]
  assert history == expected
  assert [row["iteration"] for row in history] == [0, 1, 2, 3, 4, 5]
  assert "eval/accuracy" in history[0] and "eval/accuracy" in history[2]


def test_a_missing_wandb_package_is_named_before_training(monkeypatch):
  monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError,
                     match=r'logging.wandb is set .* pip install "jax_nlu_ppo\[wandb\]"'):
    tracking.check(tracking.LoggingConfig(tracking.WandbConfig(project="nlu")))
  tracking.check(tracking.LoggingConfig())       # nothing configured: nothing needed
  with pytest.raises(ValueError, match="logging.wandb.mode must be one of"):
    tracking.WandbConfig(project="nlu", mode="sometimes")
