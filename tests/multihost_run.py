"""A PPO run on a tiny model as one process of several (or as the single-process reference):

    python -m tests.multihost_run PROCESS_ID NUM_PROCESSES PORT RUN_DIR OUTPUT.npz [RESTORE_DIR]

Each process has 2 fake CPU devices; with NUM_PROCESSES=1 the one process has 4, so both runs
use the same 4-device mesh. First a reward model trains two steps (RUN_DIR_rm), then PPO runs
rewarded by the labels and by that reward model. Process 0 saves the metrics and the trained
adapters of both; with RESTORE_DIR the reference also reads back the latest checkpoint of that
(multi-process) run.
"""
import os
import sys

NUM_PROCESSES = int(sys.argv[2])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                           f"device_count={4 // NUM_PROCESSES}")
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jax_nlu_ppo import checkpoint as checkpoint_lib  # noqa: E402
from jax_nlu_ppo import distributed  # noqa: E402
from jax_nlu_ppo import sharding  # noqa: E402
from jax_nlu_ppo.model import lora  # noqa: E402
from jax_nlu_ppo.rl import reward_model  # noqa: E402
from jax_nlu_ppo.rl import trainer as trainer_lib  # noqa: E402
from tests.sharded_ppo_run import EXAMPLES, make_config, tiny_lm  # noqa: E402


def trained(trainer) -> dict[str, np.ndarray]:
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(trainer.state.trainable):
    out[jax.tree_util.keystr(path)] = np.asarray(multihost_utils.process_allgather(x, tiled=True)
                                                 if not x.is_fully_addressable else x)
  return out


def train_reward_model(folder: str, lm) -> dict[str, np.ndarray]:
  """Two reward-model steps over all processes; its losses and adapters."""
  config = reward_model.RewardModelConfig(
      lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1), batch_size=16,
      gradient_accumulation_steps=2, steps=2, mesh=sharding.MeshConfig(fsdp=-1),
      output_dir=folder)
  trainer = reward_model.RewardModelTrainer(config, lm=lm, train_examples=EXAMPLES)
  history = trainer.train()
  return ({"rm/loss": np.asarray([m["rm/loss"] for m in history])} |
          {f"rm/param/{k}": v for k, v in trained(trainer).items()})


def main(argv) -> int:
  process_id, port, run_dir, output = int(argv[1]), argv[3], argv[4], argv[5]
  if NUM_PROCESSES > 1:
    distributed.initialize(distributed.DistributedConfig(f"127.0.0.1:{port}", NUM_PROCESSES,
                                                         process_id))
  results = train_reward_model(run_dir + "_rm", tiny_lm())
  config = make_config(dict(fsdp=-1))
  config = dataclasses.replace(
      config, output_dir=run_dir, checkpoint=checkpoint_lib.CheckpointConfig(every_steps=100),
      reward=dataclasses.replace(config.reward, model=run_dir + "_rm", model_weight=0.5))
  trainer = trainer_lib.PPOTrainer(config, lm=tiny_lm(), train_examples=EXAMPLES)
  history = trainer.train()
  results |= {f"metric/{k}": np.asarray([m[k] for m in history], np.float64)
              for k in history[0] if not k.startswith(("time/", "jit/")) and k != "tokens/per_s"}
  results |= {f"param/{k}": v for k, v in trained(trainer).items()}
  # Every process evaluates the same rows and gets every answer.
  responses = [p["response"] for p in trainer.evaluate(EXAMPLES[:13]).predictions]
  results["eval/responses"] = np.asarray(responses)
  digests = distributed.all_rows(np.asarray([zlib.crc32("\n".join(responses).encode())]))
  results["eval/agree"] = len(digests) == NUM_PROCESSES and np.all(digests == digests[0])
  if len(argv) > 6:
    restored = trainer_lib.PPOTrainer(dataclasses.replace(config, output_dir=argv[6]),
                                      lm=tiny_lm(), train_examples=EXAMPLES)
    results["restored_iteration"] = np.asarray(restored.iteration)
    results |= {f"restored/{k}": v for k, v in trained(restored).items()}
  if distributed.is_primary():
    np.savez(output, **results)
  print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
