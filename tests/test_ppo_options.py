"""PPO options beyond the core step: gradient accumulation, a separate critic adapter, reusing
the rollout's log-probs and values, and the config files (the paper's preset above all)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.model import llama_config, lora, decoder as model, pretrained, prompts, sampling
from jax_nlu_ppo.rl import policy, ppo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_policy(critic_lora=False, lora_dropout=0.0, value_dropout=0.0, noise=0.05):
  llama = model.Llama(llama_config.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  pol = policy.make_policy(llama, lora.LoraConfig(rank=4, dropout=lora_dropout), value_dropout,
                           seed=0, critic_lora=critic_lora)
  graphdef, trainable, base = policy.split(pol)
  # Random (not fresh) adapters and value head, so every term has a gradient.
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(trainable))
  keys = jax.random.split(jax.random.key(3), len(leaves))
  noisy = [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.replace_by_pure_dict(trainable, jax.tree.unflatten(treedef, noisy))
  return graphdef, trainable, base


def random_batch(vocab, b=8, p=8, n=6, seed=1):
  ks = jax.random.split(jax.random.key(seed), 8)
  tokens = jax.random.randint(ks[0], (b, p + n), 3, vocab)
  mask = jnp.ones((b, p + n), jnp.int32).at[1, :3].set(0)
  response_mask = jnp.arange(n)[None] < jax.random.randint(ks[1], (b, 1), 1, n + 1)
  normal = lambda k: jax.random.normal(k, (b, n))
  return ppo.Batch(prompts.Prompts(tokens, mask), tokens[:, p:], response_mask, normal(ks[2]) - 3,
                   normal(ks[3]) - 3, normal(ks[4]), normal(ks[5]), normal(ks[6]))


def one_update(graphdef, trainable, base, batch, config, tx=optax.sgd(1.0)):
  state = ppo.PPOState(jnp.int32(0), trainable, tx.init(trainable), jnp.float32(0.2))
  step = jax.jit(lambda s, b, k: ppo.update_minibatch(s, graphdef, base, b, k, tx=tx,
                                                      config=config, temperature=1.0))
  return step(state, batch, jax.random.key(0))


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_is_the_same_step(steps):
  graphdef, trainable, base = tiny_policy()
  batch = random_batch(llama_config.LlamaConfig.tiny().vocab_size)
  whole, m_whole = one_update(graphdef, trainable, base, batch,
                              ppo.PPOConfig(minibatch_size=8, ratio_threshold=1e9))
  micro, m_micro = one_update(graphdef, trainable, base, batch,
                              ppo.PPOConfig(minibatch_size=8, gradient_accumulation_steps=steps,
                                            ratio_threshold=1e9))
  # Rows have different numbers of response tokens, so a plain average of micro-batch means
  # would differ; token-weighted accumulation must not.
  for a, b in zip(jax.tree.leaves(whole.trainable), jax.tree.leaves(micro.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for name in ("loss/total", "loss/policy", "loss/value", "policy/clipfrac", "ppo/grad_norm"):
    np.testing.assert_allclose(float(m_whole[name]), float(m_micro[name]), rtol=1e-5)
  assert float(m_whole["ppo/grad_norm"]) > 0


def test_accumulation_must_divide_the_minibatch():
  with pytest.raises(ValueError, match="gradient_accumulation_steps"):
    ppo.PPOConfig(minibatch_size=8, gradient_accumulation_steps=3)


def test_separate_critic_adapters():
  graphdef, trainable, base = tiny_policy(critic_lora=True)
  batch = random_batch(llama_config.LlamaConfig.tiny().vocab_size)
  outputs = lambda t: policy.response_outputs(policy.with_trainable(graphdef, base, t),
                                              batch.sequences, 8)
  state = nnx.to_pure_dict(trainable)
  moved = jax.tree.map(lambda x: x, state)
  moved["critic"] = jax.tree.map(lambda x: x + 1.0, moved["critic"])
  changed = jax.tree.map(lambda x: x, trainable)
  nnx.replace_by_pure_dict(changed, moved)
  a, b = outputs(trainable), outputs(changed)
  # The critic's adapters move the values, never the policy's logits.
  np.testing.assert_array_equal(np.asarray(a.logits_brv), np.asarray(b.logits_brv))
  assert np.abs(np.asarray(a.values_br) - np.asarray(b.values_br)).max() > 1e-3

  # With vf_coef alone (no policy term) the actor's adapters get no gradient, the critic's do.
  config = ppo.PPOConfig(minibatch_size=8, ratio_threshold=1e9)
  grads = jax.grad(lambda t: ppo.loss_fn(t, graphdef, base, batch, None, 0.2, config=config,
                                         temperature=1.0)[1][0]["loss/value"])(trainable)
  grads = nnx.to_pure_dict(grads)
  actor = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads["llama"])]
  critic = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads["critic"])]
  assert max(actor) == 0 and min(critic) > 0


def test_rollout_logprobs_and_values_are_the_experience_forward():
  """The KV-cached decode's log-probs and values equal a full forward over the sequence."""
  graphdef, trainable, base = tiny_policy(noise=0.1)
  vocab = llama_config.LlamaConfig.tiny().vocab_size
  prompt = jax.random.randint(jax.random.key(1), (4, 10), 3, vocab)
  prompt_mask = jnp.ones((4, 10), jnp.int32).at[1, :3].set(0).at[2, :6].set(0)
  sample_cfg = sampling.SamplingConfig(1.0)
  assert ppo.reuses_rollout(sample_cfg, critic_lora=False)
  assert not ppo.reuses_rollout(sampling.SamplingConfig(1.0, top_k=5), critic_lora=False)
  assert not ppo.reuses_rollout(sample_cfg, critic_lora=True)
  gen = jax.jit(lambda *a: ppo.rollout(*a, max_new_tokens=8, sampling=sample_cfg, eos_ids=(2,),
                                       pad_id=0), static_argnums=0)(
      graphdef, base, trainable, prompts.Prompts(prompt, prompt_mask), jax.random.key(0), 8)
  tokens = jnp.concatenate([prompt, gen.tokens_br], 1)
  mask = jnp.concatenate([prompt_mask, gen.mask_br.astype(jnp.int32)], 1)
  sequences = prompts.Prompts(tokens, mask)
  reused = ppo.experience(graphdef, base, trainable, trainable, sequences, gen,
                          temperature=1.0, reuse_rollout=True)
  recomputed = ppo.experience(graphdef, base, trainable, trainable, sequences, gen,
                              temperature=1.0, reuse_rollout=False)
  valid = np.asarray(gen.mask_br)
  for a, b in zip(reused, recomputed):
    a, b = np.asarray(a)[valid], np.asarray(b)[valid]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))
  assert np.abs(np.asarray(recomputed[1])[valid]).max() > 0   # the value head is not zero


def test_paper_preset_is_exact():
  for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
    config = config_lib.load_config(ROOT / "configs" / "paper" / f"{task}.yaml")
    assert config.data.task == task
  c = config
  assert (c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora) == (16, 32.0, 0.05, True)
  assert c.lora.targets == ("q_proj", "v_proj") and c.lora.scale == 8.0
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.schedule) == (
      "adafactor", 9e-6, "constant")
  assert c.optimizer.max_grad_norm is None and c.optimizer.warmup_steps == 0
  assert c.rollout.batch_size == 16 and c.ppo.ppo_epochs == 4
  assert (c.ppo.minibatch_size, c.ppo.gradient_accumulation_steps) == (16, 2)
  assert (c.ppo.kl.kind, c.ppo.kl.init_coef, c.ppo.kl.target, c.ppo.kl.horizon) == (
      "adaptive", 0.2, 6.0, 10000.0)
  assert (c.ppo.gamma, c.ppo.lam, c.ppo.cliprange, c.ppo.cliprange_value, c.ppo.vf_coef) == (
      1.0, 0.95, 0.2, 0.2, 0.1)
  assert c.ppo.kl_estimator == "k1" and c.ppo.whiten_advantages and c.ppo.ratio_threshold == 10
  assert (c.rollout.temperature, c.rollout.top_k, c.rollout.top_p) == (1.0, 0, 1.0)
  assert (c.rollout.min_new_tokens, c.rollout.max_new_tokens) == (12, 31)
  assert (c.reward.correct, c.reward.wrong, c.reward.unparsed) == (1.0, -1.0, -3.0)
  assert (c.reward.regression_max, c.reward.regression_unparsed, c.reward.lenient) == (
      2.5, -2.5, False)
  assert c.rollout.prompt_format == "paper" and c.value_dropout == 0.1 and c.epochs == 3


def test_every_shipped_config_loads():
  from jax_nlu_ppo.rl import reward_model, sft
  paths = sorted((ROOT / "configs").rglob("*.yaml"))
  assert len(paths) >= 10
  for path in paths:
    # A folder named sft/ holds SFT runs, reward_model/ reward models; the rest are PPO runs.
    kinds = {"sft": sft.SFTConfig, "reward_model": reward_model.RewardModelConfig}
    cls = next((kinds[p] for p in path.relative_to(ROOT / "configs").parts if p in kinds), None)
    config_lib.load_config(path, cls=cls or config_lib.TrainConfig)


def test_config_errors_name_the_key(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="ppo.cliprang"):
    config_lib.load_config(None, ["ppo.cliprang=0.1"])
  with pytest.raises(config_lib.ConfigError, match="lora.rank: expected int"):
    config_lib.load_config(None, ["lora.rank=eight"])
  with pytest.raises(config_lib.ConfigError, match="data.source: expected one of"):
    config_lib.load_config(None, ["data.source=web"])
  bad = tmp_path / "bad.yaml"
  bad.write_text("ppo:\n  minibatch_size: 5\n")
  with pytest.raises(config_lib.ConfigError, match=f"{bad}.*minibatch_size"):
    config_lib.load_config(bad)
  # A section given in part keeps the defaults of the rest.
  c = config_lib.load_config(None, ["data.split=validation"])
  assert (c.data.task, c.data.split) == ("sst2", "validation")


def _mixture_trainer(**ppo_options):
  """A PPO trainer on a mixture of SST-2 and RTE rows (tiny random model); its examples."""
  from jax_nlu_ppo.nlu import answer, data, tasks
  from jax_nlu_ppo.rl import trainer as trainer_lib
  from tests.test_ppo_core import random_llama, tiny_chat_tokenizer

  sst2 = [{"sentence": s, "label": i % 2, "idx": i, "task": "sst2"}
          for i, s in enumerate(["a gorgeous witty film", "dull and far too long"])]
  rte = [{"sentence1": "the cat sat", "sentence2": "a cat sat", "label": i % 2, "idx": i,
          "task": "rte"} for i in range(3)]
  examples = data.mix([sst2, rte], [1.0, 1.0], seed=0, size=16)
  texts = [m["content"] for ex in examples
           for m in tasks.build_prompt(tasks.get_task(ex["task"]), ex, "chat")]
  words = [w for t in ("sst2", "rte") for w in tasks.get_task(t).label_words]
  tokenizer = tiny_chat_tokenizer(texts + ["system user assistant", *words])
  cfg = llama_config.LlamaConfig.tiny(vocab_size=len(tokenizer), hidden_size=32,
                                      intermediate_size=64, head_dim=8)
  lm = pretrained.LanguageModel(cfg, *random_llama(cfg), tokenizer)
  mixture = tuple(data.MixtureComponent(data.DataConfig(task=t, split="train", source="hub"))
                  for t in ("sst2", "rte"))
  config = config_lib.TrainConfig(
      lora=lora.LoraConfig(rank=4, targets=("q_proj",)), mixture=mixture,
      ppo=ppo.PPOConfig(ppo_epochs=1, minibatch_size=8, **ppo_options),
      rollout=config_lib.RolloutConfig(batch_size=8, min_new_tokens=4, max_new_tokens=4),
      reward=answer.RewardConfig(lenient=True))
  return trainer_lib.PPOTrainer(config, lm=lm, train_examples=examples), examples


def test_multi_task_trainer_rewards_each_row_by_its_own_task():
  """A mixture's rows keep their task: prompt, extraction rule, reward and metrics."""
  from jax_nlu_ppo.nlu import answer, tasks
  trainer, examples = _mixture_trainer()
  config = trainer.config
  metrics = trainer.step()
  batch = examples[:8]
  assert {"env/accuracy/sst2", "env/accuracy/rte", "env/reward_mean/rte"} <= metrics.keys()

  # Independently: each response read with its own task's lenient rule.
  responses = trainer.last_responses()
  rewards = [answer.reward(answer.extract(r, tasks.get_task(ex["task"]).extraction_rule(True))
                           .label, ex["label"], regression=False, config=config.reward)
             for r, ex in zip(responses, batch)]
  assert len(set(rewards)) > 1, rewards   # some answers name a label word
  assert metrics["env/reward_mean"] == pytest.approx(np.mean(rewards))
  for name in ("sst2", "rte"):
    mine = [r for r, ex in zip(rewards, batch) if ex["task"] == name]
    assert metrics[f"env/reward_mean/{name}"] == pytest.approx(np.mean(mine))


@pytest.mark.parametrize("per_task", [False, True])
def test_advantages_whitened_per_task_or_over_the_batch(per_task):
  """ppo.whiten_per_task: each task's response tokens get mean 0 and (Bessel) variance 1 on
  their own; by default the whole batch does, and a task alone does not."""
  trainer, examples = _mixture_trainer(whiten_per_task=per_task)
  trainer.step()
  adv_br = np.asarray(trainer.last_batch.advantages_br, np.float64)
  mask_br = np.asarray(trainer.last_batch.response_mask_br, bool)
  task_b = np.array([ex["task"] for ex in examples[:8]])
  assert set(task_b) == {"sst2", "rte"}
  moments = {}
  for name, rows in [("all", np.ones(8, bool))] + [(t, task_b == t) for t in ("sst2", "rte")]:
    values = adv_br[rows][mask_br[rows]]
    moments[name] = (values.mean(), values.var(ddof=1))
  normalised = {name: np.allclose(m, (0.0, 1.0), atol=1e-4) for name, m in moments.items()}
  if per_task:
    assert normalised["sst2"] and normalised["rte"], moments
  else:
    assert normalised["all"] and not (normalised["sst2"] and normalised["rte"]), moments


def test_whiten_per_task_needs_gae_advantages():
  with pytest.raises(config_lib.ConfigError, match="ppo.whiten_per_task whitens GAE"):
    config_lib.load_config(None, ["ppo.whiten_per_task=true", "ppo.advantage=grpo",
                                  "ppo.group_size=2"])


def test_mixture_config_checks_its_tasks():
  with pytest.raises(config_lib.ConfigError, match="cannot read stsb's numbers"):
    config_lib.load_config(None, ["reward.extractor=token",
                                  "mixture=[{data: {task: sst2}}, {data: {task: stsb}}]"])
  with pytest.raises(config_lib.ConfigError, match="weight of task rte must be > 0"):
    config_lib.load_config(None, ["mixture=[{data: {task: rte}, weight: 0}]"])


def test_training_rows_too_long_for_the_context_are_skipped_and_counted(caplog):
  from jax_nlu_ppo.nlu import tasks
  from jax_nlu_ppo.rl import trainer as trainer_lib
  from tests.test_ppo_core import random_llama, tiny_chat_tokenizer

  examples = [{"sentence": "good film", "label": 1, "idx": 0},
              {"sentence": "bad " * 300, "label": 0, "idx": 1},
              {"sentence": "dull film", "label": 0, "idx": 2}]
  task = tasks.get_task("sst2")
  texts = [m["content"] for ex in examples for m in tasks.build_prompt(task, ex, "chat")]
  tokenizer = tiny_chat_tokenizer(texts + ["system user assistant"])
  cfg = llama_config.LlamaConfig.tiny(vocab_size=len(tokenizer), hidden_size=32,
                                      intermediate_size=64, head_dim=8,
                                      max_position_embeddings=256)
  lm = pretrained.LanguageModel(cfg, *random_llama(cfg), tokenizer)
  config = config_lib.TrainConfig(
      rollout=config_lib.RolloutConfig(batch_size=4, min_new_tokens=4, max_new_tokens=4),
      ppo=ppo.PPOConfig(minibatch_size=4))
  trainer = trainer_lib.PPOTrainer(config, lm=lm, train_examples=examples)
  got = trainer.next_examples(5)
  assert [ex["idx"] for ex in got] == [0, 2, 0, 2, 0]
  assert trainer.skipped_rows == 1      # reported once, not on every pass
  assert "skipping training row idx 1 of sst2" in caplog.text
