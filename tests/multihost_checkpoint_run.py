"""`checkpoint_run`'s PPO run as one process of several, for `test_checkpoint` to preempt:

    python -m tests.multihost_checkpoint_run PROCESS_ID NUM_PROCESSES PORT RUN_DIR HOLD OUT.npz

Each process has 4 / NUM_PROCESSES fake CPU devices (one 4-device mesh in all). HOLD > 0: after
step HOLD, before it asks whether to stop, each process writes `OUT.gate/holding.<id>` and waits
for `OUT.gate/release`, so the test's SIGTERM reaches it at a known step. Process 0 prints the
iteration it stopped at and writes the trained adapters to OUT.npz.
"""
import os
import sys

NUM_PROCESSES = int(sys.argv[2])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                           f"device_count={4 // NUM_PROCESSES}")
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from jax_nlu_ppo import distributed  # noqa: E402
from jax_nlu_ppo import sharding  # noqa: E402
from jax_nlu_ppo.rl import trainer as trainer_lib  # noqa: E402
from tests import checkpoint_run  # noqa: E402
from tests.multihost_run import trained  # noqa: E402


def main(argv) -> int:
  process_id, port, run_dir, hold, out = int(argv[1]), argv[3], argv[4], int(argv[5]), argv[6]
  distributed.initialize(distributed.DistributedConfig(f"127.0.0.1:{port}", NUM_PROCESSES,
                                                       process_id))
  config = dataclasses.replace(checkpoint_run.make_config(run_dir),
                               mesh=sharding.MeshConfig(fsdp=-1))
  trainer = trainer_lib.PPOTrainer(config, lm=checkpoint_run.tiny_lm(),
                                   train_examples=checkpoint_run.EXAMPLES * 2)
  print(f"process {process_id} started at iteration {trainer.iteration}", flush=True)
  if hold:
    step, gate = trainer.step, pathlib.Path(out + ".gate")

    def held_step():
      metrics = step()
      if trainer.iteration == hold:
        (gate / f"holding.{process_id}").touch()
        while not (gate / "release").exists():
          time.sleep(0.05)
      return metrics
    trainer.step = held_step
  trainer.train()
  params = trained(trainer)
  if distributed.is_primary():
    np.savez(out, **params)
  print(f"process {process_id} stopped at iteration {trainer.iteration}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
