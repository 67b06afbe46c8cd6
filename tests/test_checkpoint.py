"""Checkpoints: a PPO run stopped by SIGTERM and continued equals one never stopped; a damaged
latest step falls back to the one before; another adapter shape or base is refused; retention;
SFT resumes the same way.

The PPO runs are processes of their own (`tests/checkpoint_run.py`) sharing a persistent
compilation cache, so only the first pays for compiling.
"""
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo.model import lora
from jax_nlu_ppo.rl import sft
from tests import checkpoint_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Wall-clock and throughput metrics differ between any two runs, and a continued run compiles
# again in its first step; all other metrics must not differ.
TIMING = ("time/", "tokens/per_s", "jit/compilations")


def launch(output_dir, cache_dir, pause=0.0, kill_at=None) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.Popen([sys.executable, "-m", "tests.checkpoint_run", str(output_dir),
                           str(pause)] + ([str(kill_at)] if kill_at else []), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout=240) -> tuple[str, str]:
  out, err = process.communicate(timeout=timeout)
  assert process.returncode == 0, err[-3000:]
  return out, err


def steps_on_disk(run_dir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(run_dir) / "checkpoints").iterdir()
                if p.name.isdigit())


def metric_lines(run_dir) -> list[dict]:
  lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)}
          for line in lines]


def sample_lines(run_dir) -> list[dict]:
  return [json.loads(line)
          for line in (pathlib.Path(run_dir) / "samples.jsonl").read_text().splitlines()]


def flat(tree) -> dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def assert_same_arrays(a, b):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def files_of(run_dir) -> dict[str, bytes]:
  return {str(p.relative_to(run_dir)): p.read_bytes()
          for p in sorted(pathlib.Path(run_dir).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@dataclasses.dataclass
class Runs:
  reference: pathlib.Path       # never stopped: checkpoints 1..STEPS, one metrics line each
  stopped: pathlib.Path         # stopped by SIGTERM after its first checkpoint
  stopped_out: str
  stopped_err: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Runs:
  """Both runs at once (each compiles on its own core); a pause after each step of the second
  leaves time to stop it mid-way."""
  reference, stopped = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("stopped")
  reference_process = launch(reference, cache_dir)
  process = launch(stopped, cache_dir, pause=0.5)
  deadline = time.time() + 180
  while not (stopped / "checkpoints" / "1").exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  out, err = finish(process)
  finish(reference_process)
  assert steps_on_disk(reference) == list(range(1, checkpoint_run.STEPS + 1))
  return Runs(reference, stopped, out, err)


@pytest.fixture(scope="module")
def reference(runs) -> pathlib.Path:
  return runs.reference


@pytest.fixture(scope="module")
def lm():
  return checkpoint_run.tiny_lm()


def test_sigterm_saves_and_a_rerun_continues_exactly(runs, cache_dir, lm):
  run_dir = runs.stopped
  assert "SIGTERM" in runs.stopped_err and "checkpoint saved" in runs.stopped_err
  stopped = steps_on_disk(run_dir)
  assert 1 <= stopped[-1] < checkpoint_run.STEPS, stopped
  assert f"stopped at iteration {stopped[-1]}" in runs.stopped_out
  assert [m["iteration"] for m in metric_lines(run_dir)] == list(range(1, stopped[-1] + 1))

  out, _ = finish(launch(run_dir, cache_dir))
  assert f"stopped at iteration {checkpoint_run.STEPS}" in out
  assert steps_on_disk(run_dir) == list(range(1, checkpoint_run.STEPS + 1))
  # Every line once, each equal to the uninterrupted run's.
  assert metric_lines(run_dir) == metric_lines(runs.reference)
  assert sample_lines(run_dir) == sample_lines(runs.reference)

  continued = checkpoint_run.make_trainer(run_dir, lm=lm)
  never_stopped = checkpoint_run.make_trainer(runs.reference, lm=lm)
  assert continued.iteration == never_stopped.iteration == checkpoint_run.STEPS
  assert_same_arrays(continued.snapshot().arrays, never_stopped.snapshot().arrays)
  assert continued.snapshot().host == never_stopped.snapshot().host
  # Nothing left to run: train() completes the schedule, it does not start it again.
  assert continued.train() == []


def cut_short_metadata(run_dir, step: int):
  """Cuts step's array metadata file (local or in a bucket) to 100 bytes; returns its path."""
  damaged = run_dir / "checkpoints" / str(step) / "arrays" / "_METADATA"
  damaged.write_bytes(damaged.read_bytes()[:100])
  return damaged


def test_unreadable_latest_step_falls_back_to_the_one_before(reference, tmp_path, lm, caplog):
  last = checkpoint_run.STEPS
  run_dir = tmp_path / "run"
  shutil.copytree(reference, run_dir)
  damaged = cut_short_metadata(run_dir, last)

  trainer = checkpoint_run.make_trainer(run_dir, lm=lm)
  assert trainer.iteration == last - 1
  assert f"checkpoint step {last} does not read back ({damaged}" in caplog.text
  # The step before is exactly what the run saved there, and the damaged one is set aside.
  previous = checkpoint_run.make_trainer(reference, lm=lm).checkpointer.restore(
      last - 1, trainer.snapshot())
  assert_same_arrays(trainer.snapshot().arrays, previous.snapshot.arrays)
  assert trainer.snapshot().host == previous.snapshot.host
  assert steps_on_disk(run_dir) == list(range(1, last))
  assert (run_dir / checkpoint_lib.UNREADABLE_DIR / str(last) / "arrays").is_dir()
  assert [m["iteration"] for m in metric_lines(run_dir)] == list(range(1, last))


def test_an_interrupted_save_is_never_a_step(reference, tmp_path, lm):
  """Orbax writes into `<step>.orbax-checkpoint-tmp*` and renames when done: a save killed
  half-way leaves a folder that is neither restored nor kept."""
  run_dir = tmp_path / "run"
  shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns(str(checkpoint_run.STEPS)))
  partial = run_dir / "checkpoints" / f"{checkpoint_run.STEPS}.orbax-checkpoint-tmp-1234"
  shutil.copytree(reference / "checkpoints" / str(checkpoint_run.STEPS - 1), partial)
  shutil.rmtree(partial / "arrays")
  trainer = checkpoint_run.make_trainer(run_dir, lm=lm)
  assert trainer.iteration == checkpoint_run.STEPS - 1
  assert not partial.exists()


def test_a_run_killed_while_saving_continues_from_the_step_before(reference, cache_dir, tmp_path,
                                                                    lm):
  """SIGKILL half-way through writing step 3 (its arrays written, not its host state): steps 1
  and 2 are intact, the half-written step is no step, and the same command continues from 2 to
  the end, equal to the run never stopped."""
  run_dir = tmp_path / "run"
  process = launch(run_dir, cache_dir, kill_at=3)
  _, err = process.communicate(timeout=240)
  assert process.returncode == -signal.SIGKILL, err[-3000:]
  partial = run_dir / "checkpoints" / "3.orbax-checkpoint-tmp"
  assert partial.is_dir() and not (partial / "commit_success.txt").exists()
  assert steps_on_disk(run_dir) == [1, 2]
  assert (run_dir / "run.lock").exists()        # the killed run could not release it

  out, err = finish(launch(run_dir, cache_dir))
  assert f"{partial}: a save that did not finish" in err
  assert "taking over the lock of a run that is gone" in err
  assert f"stopped at iteration {checkpoint_run.STEPS}" in out
  assert steps_on_disk(run_dir) == list(range(1, checkpoint_run.STEPS + 1))
  assert metric_lines(run_dir) == metric_lines(reference)
  for step in (2, checkpoint_run.STEPS):
    ours = checkpoint_run.make_trainer(run_dir, lm=lm)
    theirs = checkpoint_run.make_trainer(reference, lm=lm)
    assert_same_arrays(ours.checkpointer.restore(step, ours.snapshot()).snapshot.arrays,
                       theirs.checkpointer.restore(step, theirs.snapshot()).snapshot.arrays)


def test_a_full_disk_at_a_save_stops_the_run_with_the_last_step_intact(tmp_path, lm,
                                                                       monkeypatch):
  """ENOSPC while Orbax writes step 3's arrays: one error that names the intact step 2, which
  the same command then continues from."""
  run_dir = tmp_path / "run"
  save = ocp.StandardCheckpointHandler.async_save

  def full_disk(self, directory, *args, **kwargs):
    if directory.parent.name.startswith("3."):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return save(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_disk)
  trainer = checkpoint_run.make_trainer(run_dir, lm=lm)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
    trainer.train()
  assert str(error.value) == (
      f"checkpoint step 3 could not be written to {run_dir / 'checkpoints'} (No space left on "
      "device); the latest complete step, 2, is intact: free space or fix the folder, then run "
      "the same command to continue from it")
  assert steps_on_disk(run_dir) == [1, 2]
  assert not (run_dir / "run.lock").exists()
  trainer.checkpointer.close()

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", save)
  continued = checkpoint_run.make_trainer(run_dir, lm=lm)
  assert continued.iteration == 2
  continued.train()
  assert steps_on_disk(run_dir) == list(range(1, checkpoint_run.STEPS + 1))


def test_another_adapter_shape_or_base_is_refused(reference, tmp_path, lm):
  before = files_of(reference)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"lora\.rank: 4 in the checkpoint, 8 in this run"):
    checkpoint_run.make_trainer(reference, lm=lm, rank=8)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"base model hidden_size: 32 in the checkpoint, 48 in this run"):
    checkpoint_run.make_trainer(reference, lm=checkpoint_run.tiny_lm(hidden_size=48))
  # Same shapes, other weights: the fingerprint tells them apart.
  other_weights = checkpoint_run.tiny_lm()
  other_weights.params = jax.tree.map(lambda x: x * 1.5, other_weights.params)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="base model weights differ"):
    checkpoint_run.make_trainer(reference, lm=other_weights)
  assert files_of(reference) == before


def tiny_snapshot(value: float) -> checkpoint_lib.Snapshot:
  return checkpoint_lib.Snapshot({"w": jnp.full((3,), value, jnp.float32)}, {"value": value})


@pytest.mark.parametrize("mode,async_save", [("max", False), ("min", True)])
def test_keep_last_k_and_the_best(tmp_path, mode, async_save):
  config = checkpoint_lib.CheckpointConfig(every_steps=1, keep=2, best_metric="score",
                                           best_mode=mode, async_save=async_save)
  checkpointer = checkpoint_lib.Checkpointer(
      tmp_path, config, {"config": {}, "base": {"name": "none", "fingerprint": 0.0}})
  scores = [0.3, 0.9, 0.1, 0.5, 0.4, 0.2]
  for step, score in enumerate(scores, 1):
    assert checkpointer.save(step, tiny_snapshot(score), {"score": score, "other": 0.0})
  checkpointer.wait()
  best = 2 if mode == "max" else 3
  assert checkpointer.steps() == [best, 5, 6]
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [best, 5, 6]
  restored = checkpointer.restore(best, tiny_snapshot(0.0))
  assert restored.snapshot.host == {"value": scores[best - 1]}
  np.testing.assert_array_equal(restored.snapshot.arrays["w"], np.full(3, scores[best - 1], np.float32))
  assert not checkpointer.save(6, tiny_snapshot(0.0), {"score": 0.0})   # never overwrites
  with pytest.raises(ValueError, match="best_metric 'score' is not a step metric"):
    checkpointer.save(7, tiny_snapshot(0.0), {"loss": 0.0})
  checkpointer.close()


@pytest.mark.parametrize("kind", ["sft", "reward_model"])
def test_sft_and_reward_model_resume_exactly(tmp_path, lm, kind):
  from jax_nlu_ppo.rl import reward_model
  config_cls, trainer_cls = {
      "sft": (sft.SFTConfig, sft.SFTTrainer),
      "reward_model": (reward_model.RewardModelConfig, reward_model.RewardModelTrainer)}[kind]

  def trainer(output_dir):
    config = config_cls(
        lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj")),
        batch_size=2, steps=4, output_dir=str(output_dir),
        checkpoint=checkpoint_lib.CheckpointConfig(every_steps=2))
    return trainer_cls(config, lm=lm, train_examples=checkpoint_run.EXAMPLES)

  whole = trainer(tmp_path / "whole")
  whole.train()
  assert steps_on_disk(tmp_path / "whole") == [2, 4]
  # Stopped after step 2, with step 3 done but not saved: its metrics line goes, it is redone.
  shutil.copytree(tmp_path / "whole", tmp_path / "cut",
                  ignore=lambda folder, names: ["4"] if folder.endswith("checkpoints") else [])
  with open(tmp_path / "whole" / "metrics.jsonl") as f:
    (tmp_path / "cut" / "metrics.jsonl").write_text("".join(f.readlines()[:3]))
  continued = trainer(tmp_path / "cut")
  assert continued.iteration == 2 and continued.position == 4
  continued._update = whole._update    # the same jitted step (equal configs): one compile less
  assert len(continued.train()) == 2
  assert_same_arrays(nnx.to_pure_dict(continued.state.trainable),
                     nnx.to_pure_dict(whole.state.trainable))
  assert_same_arrays(continued.state.opt_state, whole.state.opt_state)
  assert metric_lines(tmp_path / "cut") == metric_lines(tmp_path / "whole")


def test_stop_signal_sets_a_flag_and_restores_the_handlers():
  from jax_nlu_ppo.rl import run_loop
  before = signal.getsignal(signal.SIGINT)
  with run_loop.StopSignal() as stop:
    assert not stop.reached()
    os.kill(os.getpid(), signal.SIGINT)        # Ctrl-C: no KeyboardInterrupt, a request to stop
    assert stop.received == "SIGINT" and stop.reached()
    with pytest.raises(KeyboardInterrupt):     # a second Ctrl-C stops at once
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------------------------
# Preemption of a two-process run (gloo on this machine), as a pod's maintenance event does it.

def _launch_two(run_dir, cache_dir, out, hold=0) -> list[subprocess.Popen]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")])),
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env.pop("XLA_FLAGS", None)
  return [subprocess.Popen([sys.executable, "-m", "tests.multihost_checkpoint_run", str(i), "2",
                            port, str(run_dir), str(hold), str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _finish_two(processes, timeout=300) -> list[str]:
  outs = [p.communicate(timeout=timeout) for p in processes]
  for i, (p, (out, err)) in enumerate(zip(processes, outs)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return [out for out, _ in outs]


def _stop_two(run_dir, cache_dir, out, hold: int, signalled: list[int]) -> int:
  """Runs both processes to step `hold`, where they wait while those in `signalled` get
  SIGTERM; returns the step both stopped at (checked to be one of the next two)."""
  gate = pathlib.Path(f"{out}.gate")
  shutil.rmtree(gate, ignore_errors=True)
  gate.mkdir()
  processes = _launch_two(run_dir, cache_dir, out, hold)
  deadline = time.time() + 240
  while not all((gate / f"holding.{i}").exists() for i in range(2)):
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.1)
  for i in signalled:
    processes[i].send_signal(signal.SIGTERM)
  time.sleep(2)                            # the notice reaches the coordination service
  (gate / "release").touch()
  stopped = {int(line.split()[-1]) for text in _finish_two(processes) for line in
             text.splitlines() if "stopped at iteration" in line}
  assert len(stopped) == 1, stopped        # every process saved and stopped after the same step
  step = stopped.pop()
  assert hold <= step <= hold + 1, (hold, step)
  return step


def test_two_processes_preempted_together_or_one_alone_continue_exactly(tmp_path, cache_dir):
  reference, run_dir = tmp_path / "reference", tmp_path / "run"
  _finish_two(_launch_two(reference, cache_dir, tmp_path / "reference.npz"))
  # SIGTERM to every process, then (continued) to process 1 alone: the others learn of it
  # through JAX's preemption sync point and stop after the same step.
  first = _stop_two(run_dir, cache_dir, tmp_path / "stopped.npz", 1, signalled=[0, 1])
  assert steps_on_disk(run_dir)[-1] == first
  second = _stop_two(run_dir, cache_dir, tmp_path / "stopped.npz", first + 1, signalled=[1])
  assert second < checkpoint_run.STEPS and steps_on_disk(run_dir)[-1] == second
  outs = _finish_two(_launch_two(run_dir, cache_dir, tmp_path / "continued.npz"))
  assert f"process 0 started at iteration {second}" in outs[0]

  assert steps_on_disk(run_dir) == steps_on_disk(reference)
  assert metric_lines(run_dir) == metric_lines(reference)
  continued, never_stopped = np.load(tmp_path / "continued.npz"), np.load(tmp_path / "reference.npz")
  assert sorted(continued) == sorted(never_stopped)
  for name in never_stopped:
    np.testing.assert_array_equal(continued[name], never_stopped[name], err_msg=name)
