"""One run at a time in a run folder, and a folder it can write: a lock file that names its
holder.

While a run trains, its process 0 holds `RUN_DIR/run.lock` (host, pid, start time, process
count), created atomically and touched every `HEARTBEAT_S` seconds. A second run that finds it
stops before loading anything, with an error naming the holder, unless the holder is gone: on
this host, its process has exited; on another host, the lock has not been touched for `STALE_S`
seconds. A stale lock (a killed run's) is taken over with a warning. The other processes of a
multi-host run share process 0's lock and learn its verdict from it.

In a bucket (`gs://`) the lock is an object uploaded on the precondition that none exists
(`ifGenerationMatch=0`), and refreshed by uploading it again: the same rules hold there.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_nlu_ppo import storage

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0     # ten missed heartbeats: a run on another host is taken to be gone


class RunFolderError(RuntimeError):
  """The run folder cannot be used for this run."""


class RunFolderLockedError(RunFolderError):
  """The run folder is held by another live run."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: str       # ISO time, UTC
  processes: int

  @classmethod
  def this_process(cls) -> Holder:
    return cls(socket.gethostname(), os.getpid(),
               datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               jax.process_count())

  def describe(self) -> str:
    processes = f", {self.processes} processes" if self.processes > 1 else ""
    return f"host {self.host}, pid {self.pid}, started {self.started}{processes}"


def _read(path: storage.Path) -> Holder | None:
  """The lock's holder, or None if the file is gone or unreadable (a crash mid-write)."""
  try:
    return Holder(**json.loads(path.read_text()))
  except (FileNotFoundError, ValueError, TypeError):
    return None


def _gone(holder: Holder | None, path: storage.Path) -> str | None:
  """Why the lock's holder is no longer running, or None if it may be."""
  if holder is None:
    return "its lock file is unreadable"
  if holder.host == socket.gethostname():
    if holder.pid == os.getpid():
      return None       # another trainer of this very process
    try:
      os.kill(holder.pid, 0)
    except ProcessLookupError:
      return "that process no longer exists"
    except PermissionError:     # alive, another user's
      return None
    return None
  try:
    idle = time.time() - storage.mtime(path)
  except FileNotFoundError:
    return "its lock is gone"
  return f"its lock was last refreshed {idle:.0f} s ago" if idle > STALE_S else None


def _locked_error(run_dir: storage.Path, holder: Holder) -> RunFolderLockedError:
  return RunFolderLockedError(
      f"{run_dir} is in use by another run ({holder.describe()}); wait for it to finish or stop "
      f"it, or choose another output_dir. If that run is gone, delete {run_dir / LOCK_FILE}")


def _agreed(error: RunFolderError | None, run_dir: storage.Path) -> None:
  """Raises on every process when process 0 (which alone reads the lock) found a problem."""
  if jax.process_count() > 1:
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = RunFolderError(f"process 0 cannot use {run_dir} for this run (its log says why)")
  if error is not None:
    raise error


def _writable(run_dir: storage.Path) -> RunFolderError | None:
  reason = storage.unwritable(run_dir / LOCK_FILE)
  if reason is None:
    return None
  return RunFolderError(f"output_dir {run_dir}: cannot write there ({reason}); choose another "
                        "folder or fix its permissions")


def check(run_dir: str | os.PathLike | None) -> None:
  """Fails at once, before a trainer loads or restores anything, if `run_dir` cannot be written
  or a live run holds it."""
  if run_dir is None:
    return
  run_dir = storage.path(run_dir)
  error = None
  if jax.process_index() == 0:
    path = run_dir / LOCK_FILE
    holder = _read(path) if path.exists() else None
    if path.exists() and _gone(holder, path) is None:
      error = _locked_error(run_dir, holder)
    else:
      error = _writable(run_dir)
  _agreed(error, run_dir)


class RunLock:
  """Holds `run_dir` for a run while it trains (`with RunLock(run_dir): ...`)."""

  def __init__(self, run_dir: str | os.PathLike):
    self.run_dir = storage.path(run_dir)
    self.path = self.run_dir / LOCK_FILE
    self.holder: Holder | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def __enter__(self) -> RunLock:
    error = None
    if jax.process_index() == 0:
      error = _writable(self.run_dir)
      try:
        if error is None:
          self._acquire()
      except RunFolderError as e:
        error = e
    _agreed(error, self.run_dir)
    if self.holder is not None:
      self._heartbeat = threading.Thread(target=self._beat, name="run-lock", daemon=True)
      self._heartbeat.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    if self.holder is not None and _read(self.path) == self.holder:
      self.path.unlink(missing_ok=True)
    self.holder = None

  def _acquire(self) -> None:
    holder = Holder.this_process()
    for _ in range(2):
      try:
        storage.create_new(self.path, json.dumps(dataclasses.asdict(holder)))
      except FileExistsError:
        other = _read(self.path)
        reason = _gone(other, self.path)
        if reason is None:
          raise _locked_error(self.run_dir, other) from None
        log.warning("%s: taking over the lock of a run that is gone (%s: %s)", self.path,
                    other.describe() if other else "holder unknown", reason)
        self.path.unlink(missing_ok=True)
        continue
      self.holder = holder
      return
    raise _locked_error(self.run_dir, _read(self.path) or holder)

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        storage.touch(self.path)
      except FileNotFoundError:
        log.warning("%s was deleted while this run holds it", self.path)
        return
