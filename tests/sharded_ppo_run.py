"""PPO iterations of a tiny model on several meshes of 8 fake CPU devices, as a process of its
own (the device count is fixed when JAX starts):

    python -m tests.sharded_ppo_run OUTPUT.npz

For each mesh (and one device as the reference) it saves the metrics, the trained adapters and
value head, and the partition spec of a few arrays, for `test_sharding` to compare.
"""
import dataclasses
import os
import sys
import tempfile

if "device_count" not in os.environ.get("XLA_FLAGS", ""):   # multihost_run sets its own
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jax_nlu_ppo.nlu import answer, tasks
from jax_nlu_ppo.model import lora, pretrained
from jax_nlu_ppo.rl import ppo, sft
from jax_nlu_ppo import sharding  # noqa: E402
from jax_nlu_ppo import config as config_lib  # noqa: E402
from jax_nlu_ppo.rl import trainer as trainer_lib  # noqa: E402
from jax_nlu_ppo.model.llama_config import LlamaConfig  # noqa: E402
from tests.test_ppo_core import random_llama, tiny_chat_tokenizer  # noqa: E402

SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast is superb",
             "a tedious mess", "warm, funny and smart", "flat characters", "pure joy",
             "an hour too long"]
# One global batch (16 prompts) of rows, so that every process of `multihost_run` has its block.
EXAMPLES = [{"sentence": s, "label": i % 3 % 2, "idx": i} for i, s in enumerate(SENTENCES * 2)]
MESHES = {"one_device": None, "data8": dict(data=8, fsdp=1), "fsdp8": dict(fsdp=8),
          "tensor2_fsdp4": dict(fsdp=4, tensor=2), "data2_fsdp2_tensor2": dict(data=2, fsdp=2,
                                                                                tensor=2)}
STEPS = 2
# Prompts of very different lengths (every other one long, in the same words), so that each
# block's shorter half skips padding (`PromptLayout.skip`); one iteration, for its metrics.
LONG = " ".join(SENTENCES * 2)
LAYOUT_EXAMPLES = [dict(ex, sentence=f"{ex['sentence']}; {LONG}") if i % 2 else ex
                   for i, ex in enumerate(EXAMPLES)]
LAYOUT_MESHES = ("one_device", "data8", "tensor2_fsdp4")


def tiny_lm() -> pretrained.LanguageModel:
  task = tasks.get_task("sst2")
  texts = [m["content"] for ex in EXAMPLES for m in tasks.build_prompt(task, ex, "chat")]
  texts += ["system user assistant", *task.label_words]
  tokenizer = tiny_chat_tokenizer(texts)
  # A vocabulary the tensor axis splits evenly.
  fill = -len(tokenizer) % 8
  tokenizer = tiny_chat_tokenizer(texts + [f"filler{i}" for i in range(fill)])
  config = LlamaConfig.tiny(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            head_dim=8)
  return pretrained.LanguageModel(config, *random_llama(config), tokenizer)


def make_config(mesh: dict, minibatch: int = 8, steps: int = STEPS,
                sort: bool = False) -> config_lib.TrainConfig:
  # Value-head dropout on: its masks must not depend on the mesh either (adapter dropout's are
  # checked by the SFT runs). Adapter dropout off, so that the update runs the prompts' shared
  # prefix once, as rollout and experience do.
  return config_lib.TrainConfig(
      lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj",
                                                                     "up_proj")),
      ppo=ppo.PPOConfig(ppo_epochs=2, minibatch_size=minibatch),
      rollout=config_lib.RolloutConfig(batch_size=16, min_new_tokens=3, max_new_tokens=5,
                                       sort_by_length=sort),
      reward=answer.RewardConfig(lenient=True), steps=steps,
      mesh=sharding.MeshConfig(**(mesh or dict(fsdp=1))))


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in
          jax.tree_util.tree_leaves_with_path(tree)}


def spec(x) -> str:
  return str(tuple(x.sharding.spec))


def run_layout(name: str, mesh: dict | None, lm) -> dict[str, np.ndarray]:
  """One iteration on `LAYOUT_EXAMPLES`, in minibatches of 16 ([short | long] in each of 8
  blocks): its metrics."""
  return train(name, mesh, lm, make_config(mesh, minibatch=16, steps=1, sort=True),
               LAYOUT_EXAMPLES)[0]


def train(name: str, mesh: dict | None, lm, config, examples):
  devices = jax.devices()[:1] if mesh is None else jax.devices()
  trainer = trainer_lib.PPOTrainer(config, lm=lm, train_examples=examples,
                                   mesh=sharding.LogicalMesh.create(config.mesh, devices))
  history = trainer.train()
  return {f"{name}/metric/{k}": np.asarray([m[k] for m in history], np.float64)
          for k in history[0] if not k.startswith(("time/", "jit/")) and k != "tokens/per_s"
          }, trainer


def run(name: str, mesh: dict | None, lm) -> dict[str, np.ndarray]:
  out, trainer = train(name, mesh, lm, make_config(mesh), EXAMPLES)
  out |= {f"{name}/param/{k}": v for k, v in flat(trainer.state.trainable).items()}
  # Greedy evaluation of the trained policy, batches split over the mesh (13 rows: the last
  # batch is padded).
  result = trainer.evaluate(EXAMPLES[:13])
  out[f"{name}/eval/responses"] = np.asarray([p["response"] for p in result.predictions])
  layer = trainer.base["llama"]["layers"]["self_attn"]
  adapter = trainer.state.trainable["llama"]["layers"]["self_attn"]["q_proj"]["adapter"]
  mu_a = next(x for path, x in jax.tree_util.tree_leaves_with_path(trainer.state.opt_state)
              if ".mu" in jax.tree_util.keystr(path) and "['q_proj']['adapter']['a']"
              in jax.tree_util.keystr(path))
  arrays = {"embed_tokens": trainer.base["llama"]["embed_tokens"],
            "q_kernel": layer["q_proj"]["kernel"], "k_kernel": layer["k_proj"]["kernel"],
            "o_kernel": layer["o_proj"]["kernel"],
            "down_kernel": trainer.base["llama"]["layers"]["mlp"]["down_proj"]["kernel"],
            "lora_a": adapter["a"], "lora_b": adapter["b"],
            "value_kernel": trainer.state.trainable["value_head"]["kernel"],
            "adam_mu_lora_a": mu_a, "batch_tokens": trainer.last_batch.sequences.ids_bt,
            "batch_advantages": trainer.last_batch.advantages_br}
  out |= {f"{name}/spec/{k}": np.asarray(spec(v)) for k, v in arrays.items()}
  return out


def run_sft(name: str, mesh: dict | None, lm) -> dict[str, np.ndarray]:
  """Two SFT steps (the baseline shares the mesh machinery)."""
  devices = jax.devices()[:1] if mesh is None else jax.devices()
  config = sft.SFTConfig(lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1), batch_size=16,
                         gradient_accumulation_steps=2, steps=2,
                         mesh=sharding.MeshConfig(**(mesh or dict(fsdp=1))))
  trainer = sft.SFTTrainer(config, lm=lm, train_examples=EXAMPLES,
                           mesh=sharding.LogicalMesh.create(config.mesh, devices))
  history = trainer.train()
  out = {f"sft_{name}/metric/sft/loss": np.asarray([m["sft/loss"] for m in history])}
  out |= {f"sft_{name}/param/{k}": v for k, v in flat(trainer.state.trainable).items()}
  out[f"sft_{name}/spec/lora_a"] = np.asarray(spec(
      trainer.state.trainable["llama"]["layers"]["mlp"]["up_proj"]["adapter"]["a"]))
  return out


def run_reward_model(name: str, mesh: dict | None, lm, folder: str) -> dict[str, np.ndarray]:
  """Two reward-model steps, its held-out scores, then a PPO iteration rewarded by it alone."""
  from jax_nlu_ppo.rl import reward_model
  devices = jax.devices()[:1] if mesh is None else jax.devices()
  mesh_config = sharding.MeshConfig(**(mesh or dict(fsdp=1)))
  config = reward_model.RewardModelConfig(
      lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1), batch_size=16,
      gradient_accumulation_steps=2, steps=2, mesh=mesh_config,
      output_dir=os.path.join(folder, name))
  trainer = reward_model.RewardModelTrainer(
      config, lm=lm, train_examples=EXAMPLES,
      mesh=sharding.LogicalMesh.create(config.mesh, devices))
  history = trainer.train()
  out = {f"rm_{name}/metric/rm/loss": np.asarray([m["rm/loss"] for m in history]),
         f"rm_{name}/metric/scores": trainer.scores([trainer.encode(i) for i in range(13)])}
  ppo_config = dataclasses.replace(make_config(mesh, steps=1), reward=answer.RewardConfig(
      lenient=True, label_weight=0.0, model=config.output_dir))
  ppo_trainer = trainer_lib.PPOTrainer(ppo_config, lm=lm, train_examples=EXAMPLES,
                                       mesh=sharding.LogicalMesh.create(ppo_config.mesh, devices))
  ppo_trainer.step()
  out[f"rm_{name}/metric/ppo_rewards"] = np.asarray(ppo_trainer.last_rows[3])
  out[f"rm_{name}/spec/scorer_lora_a"] = np.asarray(spec(
      ppo_trainer.reward_model.trainable["llama"]["layers"]["self_attn"]["q_proj"]["adapter"]
      ["a"]))
  return out


def main(argv) -> int:
  # The layout runs sort their rows in 8 blocks, as the 8-way meshes do by themselves, so that
  # all see the same rows in the same order (the 4-way meshes hold two blocks a shard).
  trainer_lib.PPOTrainer._sort_blocks = lambda self: 8
  lm = tiny_lm()
  results = {}
  for name, mesh in MESHES.items():
    results |= run(name, mesh, lm)
    print(f"{name}: done", flush=True)
  for name in LAYOUT_MESHES:
    results |= run_layout(f"layout_{name}", MESHES[name], lm)
  for name in ("one_device", "data2_fsdp2_tensor2"):
    results |= run_sft(name, MESHES[name], lm)
  with tempfile.TemporaryDirectory() as folder:
    for name in ("one_device", "data2_fsdp2_tensor2"):
      results |= run_reward_model(name, MESHES[name], lm, folder)
  np.savez(argv[1], **results)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
