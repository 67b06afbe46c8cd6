"""One run per run folder (`run_lock`): a live holder stops a second run before it loads
anything, a killed run's lock is taken over, and the lock goes when the run ends."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo import run_lock
from jax_nlu_ppo.rl import run_loop
from tests.test_run_loop import StandIn

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from jax_nlu_ppo import run_lock
lock = run_lock.RunLock(sys.argv[1]).__enter__()
print("held", flush=True)
if sys.argv[2] == "die":
  import os, signal
  os.kill(os.getpid(), signal.SIGKILL)     # a crash: the lock stays behind
time.sleep(600)
"""


def _holder(folder: pathlib.Path, how: str) -> subprocess.Popen:
  """A process of its own that takes the folder's lock (as a run's process 0 does)."""
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), how], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.stdout.readline().strip() == "held"
  return process


def test_a_second_train_on_a_held_folder_stops_before_loading_and_names_the_holder(tmp_path):
  holder = _holder(tmp_path, "live")
  try:
    done = subprocess.run(
        [sys.executable, "-m", "jax_nlu_ppo", "train", "--config", "configs/demo/sst2_cpu.yaml",
         "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  finally:
    holder.kill()
    holder.wait()
  assert done.returncode == 2, done.stderr[-2000:]
  error = done.stderr.strip().splitlines()[-1]
  assert error.startswith("jax-nlu-ppo train: error: ")
  assert f"pid {holder.pid}" in error and socket.gethostname() in error and "started 20" in error
  assert "loaded" not in done.stderr        # stopped before the model was loaded
  # Nothing of the holder's folder was touched.
  assert sorted(p.name for p in tmp_path.iterdir()) == [run_lock.LOCK_FILE]


def test_a_killed_runs_lock_is_taken_over_with_a_warning_and_released(tmp_path, caplog):
  holder = _holder(tmp_path, "die")
  assert holder.wait(timeout=60) == -signal.SIGKILL
  assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == holder.pid
  history = run_loop.run_steps(StandIn(config_lib.TrainConfig()), steps=2,
                               output_dir=str(tmp_path))
  assert len(history) == 2
  assert any("taking over the lock" in r.message and f"pid {holder.pid}" in r.message and
             "no longer exists" in r.message for r in caplog.records)
  assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_run_holds_the_folder_while_it_trains_and_frees_it_on_an_error(tmp_path):
  seen = []

  def on_step(metrics):
    # Mid-run, as another trainer in this process or another process would find it.
    with pytest.raises(run_lock.RunFolderLockedError, match=f"pid {os.getpid()}"):
      run_lock.check(tmp_path)
    seen.append(json.loads((tmp_path / run_lock.LOCK_FILE).read_text()))
    raise RuntimeError("the run fails")

  with pytest.raises(RuntimeError, match="the run fails"):
    run_loop.run_steps(StandIn(config_lib.TrainConfig()), steps=3, output_dir=str(tmp_path),
                       on_step=on_step)
  assert seen[0]["host"] == socket.gethostname() and seen[0]["processes"] == 1
  assert not (tmp_path / run_lock.LOCK_FILE).exists()
  run_lock.check(tmp_path)           # free again


@pytest.mark.parametrize("idle_s, taken", [(60, False), (run_lock.STALE_S + 60, True)])
def test_a_lock_from_another_host_is_stale_only_once_it_stops_being_refreshed(tmp_path, idle_s,
                                                                                 taken):
  lock = tmp_path / run_lock.LOCK_FILE
  lock.write_text(json.dumps({"host": "another-host", "pid": 1, "started": "2026-01-01T00:00:00",
                              "processes": 4}))
  then = time.time() - idle_s
  os.utime(lock, (then, then))
  if taken:
    with run_lock.RunLock(tmp_path) as held:
      assert json.loads(lock.read_text())["pid"] == os.getpid() == held.holder.pid
    assert not lock.exists()
  else:
    with pytest.raises(run_lock.RunFolderLockedError,
                       match="host another-host, pid 1, started 2026-01-01T00:00:00, 4 processes"):
      run_lock.RunLock(tmp_path).__enter__()
    assert json.loads(lock.read_text())["host"] == "another-host"     # left as it was


def test_a_folder_that_cannot_be_written_stops_the_run_before_loading(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  done = subprocess.run(
      [sys.executable, "-m", "jax_nlu_ppo", "train", "--config", "configs/demo/sst2_cpu.yaml",
       "--output-dir", str(blocker / "run")], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines()[-1] == (
      f"jax-nlu-ppo train: error: output_dir {blocker / 'run'}: cannot write there (Not a "
      "directory); choose another folder or fix its permissions")
  assert "loaded" not in done.stderr
