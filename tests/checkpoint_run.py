"""A PPO run on a tiny random model, as a process of its own, for `test_checkpoint` to stop with
SIGTERM and continue:

    python -m tests.checkpoint_run OUTPUT_DIR [SECONDS_TO_SLEEP_AFTER_EACH_STEP [KILL_AT]]

With KILL_AT the process kills itself (SIGKILL) while saving that step: after Orbax has written
its arrays, before its host state.

The model, tokenizer and rows are drawn from fixed seeds, so every process builds the same run.
"""
import os
import signal
import sys
import time

import orbax.checkpoint as ocp

from jax_nlu_ppo import checkpoint as checkpoint_lib
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.nlu import answer, tasks
from jax_nlu_ppo.model import lora, pretrained
from jax_nlu_ppo.rl import ppo
from jax_nlu_ppo.rl import trainer as trainer_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig
from tests.test_ppo_core import random_llama, tiny_chat_tokenizer

SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast is superb",
             "a tedious mess", "warm, funny and smart"]
EXAMPLES = [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(SENTENCES)]
STEPS = 6


def tiny_lm(hidden_size: int = 32) -> pretrained.LanguageModel:
  task = tasks.get_task("sst2")
  texts = [m["content"] for ex in EXAMPLES for m in tasks.build_prompt(task, ex, "chat")]
  tokenizer = tiny_chat_tokenizer(texts + ["system user assistant", *task.label_words])
  config = LlamaConfig.tiny(vocab_size=len(tokenizer), hidden_size=hidden_size,
                            intermediate_size=2 * hidden_size, head_dim=8)
  return pretrained.LanguageModel(config, *random_llama(config), tokenizer)


def make_config(output_dir, rank: int = 4, **checkpoint) -> config_lib.TrainConfig:
  """Dropout on (adapters and value head), so the restored key matters; a checkpoint each step."""
  return config_lib.TrainConfig(
      lora=lora.LoraConfig(rank=rank, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj")),
      ppo=ppo.PPOConfig(ppo_epochs=2, minibatch_size=4),
      rollout=config_lib.RolloutConfig(batch_size=4, min_new_tokens=3, max_new_tokens=5),
      reward=answer.RewardConfig(lenient=True), steps=STEPS, output_dir=str(output_dir),
      checkpoint=checkpoint_lib.CheckpointConfig(**({"every_steps": 1, "keep": 10} | checkpoint)))


def make_trainer(output_dir, lm=None, **overrides) -> trainer_lib.PPOTrainer:
  return trainer_lib.PPOTrainer(make_config(output_dir, **overrides), lm=lm or tiny_lm(),
                                train_examples=EXAMPLES)


def kill_while_saving(step: int) -> None:
  """A crash at a known point of a save: Orbax's write of `step`'s host state kills the process."""
  save = ocp.JsonCheckpointHandler.async_save

  def async_save(self, directory, *args, **kwargs):
    if directory.parent.name.startswith(f"{step}.") and directory.name.startswith("host"):
      os.kill(os.getpid(), signal.SIGKILL)
    return save(self, directory, *args, **kwargs)
  ocp.JsonCheckpointHandler.async_save = async_save


def main(argv) -> int:
  output_dir, pause = argv[1], float(argv[2]) if len(argv) > 2 else 0.0
  if len(argv) > 3:
    kill_while_saving(int(argv[3]))
  trainer = make_trainer(output_dir)
  trainer.train(on_step=lambda m: time.sleep(pause))
  print(f"stopped at iteration {trainer.iteration}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
