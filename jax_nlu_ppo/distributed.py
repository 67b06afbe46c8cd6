"""Several processes, one run: start-up, and moving batches between hosts and the global mesh.

Every process runs the same command. Each holds its own block of every batch (its prompts, its
answers, its rewards); jitted steps see global arrays over the whole mesh. A single process is
the special case where the local block is the whole batch, so the trainer has one code path.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_nlu_ppo import sharding as sharding_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins the others (`jax.distributed.initialize`).

  With `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id` are
  required: GPU clusters without a scheduler JAX knows, and tests. Without it, a Cloud TPU pod
  slice (or SLURM / Open MPI job) is detected and joined automatically; a lone machine runs as
  one process.
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    if self.coordinator_address is None:
      if self.num_processes is not None or self.process_id is not None:
        raise ValueError("--num-processes and --process-id need --coordinator-address")
      return
    if self.num_processes is None or self.process_id is None:
      raise ValueError("--coordinator-address needs --num-processes and --process-id")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"--process-id must lie in 0..{self.num_processes - 1}, "
                       f"got {self.process_id}")


def _on_multihost_tpu() -> bool:
  # Cloud TPU VMs list every worker of the slice; one name means a single-host TPU.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(config: DistributedConfig = DistributedConfig()) -> None:
  """Joins the other processes of the run; call before anything touches a JAX device."""
  if jax.distributed.is_initialized():
    return
  if config.coordinator_address is not None:
    if config.num_processes > 1 and os.environ.get("JAX_PLATFORMS", "") == "cpu":
      # CPU devices of different processes talk through gloo (tests, CPU-only clusters).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id)
  elif _on_multihost_tpu() or "SLURM_JOB_ID" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def per_process(size: int, what: str) -> int:
  """`size` rows of a global batch split evenly over the processes: this process's share."""
  if size % jax.process_count():
    raise sharding_lib.ShardingError(
        f"{what} ({size}) must be divisible by the number of processes "
        f"({jax.process_count()}): each process takes an equal share")
  return size // jax.process_count()


def is_primary() -> bool:
  """Process 0 writes what should exist once: logs, metrics, plots."""
  return jax.process_index() == 0


def global_batch(local: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """This process's rows, joined with the others' along axis 0 in process order."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows of `x` (split along axis 0) that this process's devices hold, in order.

  The inverse of `global_batch`: each process reads back exactly the rows it contributed.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)   # replicas hold the same rows
  rows = np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])
  if len(rows) * jax.process_count() != x.shape[0]:
    raise ValueError(f"this process holds {len(rows)} of {x.shape[0]} rows; the mesh must split "
                     "the batch evenly over processes (put the batch rule's axes across hosts)")
  return rows


def all_rows(x) -> np.ndarray:
  """Every process's rows of `x` (a global array, or this process's NumPy rows), on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def max_over_processes(value: int) -> int:
  """The largest `value` of any process (e.g. a prompt length every host must pad to)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.asarray([value]))))


def shared_over_processes(prefix: Sequence[int], multiple: int) -> int:
  """How many first tokens of `prefix` every process's `prefix` begins with, rounded down to a
  multiple of `multiple` (e.g. the prompt start all rows of the global batch share)."""
  if jax.process_count() == 1:
    return len(prefix)
  n = -max_over_processes(-len(prefix))
  if n == 0:
    return 0
  # Every process compares the same gathered rows, so all reach the same answer.
  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(prefix[:n], np.int32)))
  agree = (gathered == gathered[0]).all(axis=0)
  return (n if agree.all() else int(np.argmin(agree))) // multiple * multiple
