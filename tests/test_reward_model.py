"""The learned reward model on tiny random models: scores against transformers (the base's hidden
states, and the exported sequence classifier), the losses and ranking metrics against NumPy,
learning, reading a run back, and scoring PPO's rollouts inside the trainer."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.rl import reward_model as rm
from jax_nlu_ppo.runs import export, reader
from tests.test_sft import EXAMPLES, LORA, ROOT, RTE, TOO_LONG, UNLABELLED, tiny  # noqa: F401


def make_trainer(lm, examples=EXAMPLES, **overrides):
  config = rm.RewardModelConfig(lora=LORA, **({"batch_size": 4} | overrides))
  return rm.RewardModelTrainer(config, lm=lm, train_examples=examples)


def perturbed(trainer, seed=0, scale=0.05):
  """The trainer's adapters and head set to random values (B != 0, a kernel that is not zero),
  so that a score that ignored them, or the adapters, would differ."""
  rng = np.random.default_rng(seed)
  pure = nnx.to_pure_dict(trainer.state.trainable)
  pure = jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), pure)
  pure["value_head"]["bias"] = np.zeros((), np.float32)
  nnx.replace_by_pure_dict(trainer.state.trainable, pure)
  return pure


def hf_last_hidden(torch_model, ids):
  with torch.no_grad():
    out = torch_model.model(torch.tensor([ids]))
  return out.last_hidden_state[0, -1].numpy()


def test_fresh_adapters_score_the_base_hidden_state_of_the_answers_last_token(tiny):
  """Reference: transformers' final hidden state at the answer's last token (fresh adapters are
  the base), dotted with the head in NumPy."""
  lm, torch_model = tiny
  trainer = make_trainer(lm)
  kernel = np.random.default_rng(1).standard_normal(lm.config.hidden_size).astype(np.float32)
  pure = nnx.to_pure_dict(trainer.state.trainable)
  pure["value_head"]["kernel"] = kernel
  nnx.replace_by_pure_dict(trainer.state.trainable, pure)
  rows = [trainer.encode(i) for i in range(len(EXAMPLES))]
  ours = trainer.scores(rows)
  eos = set(lm.eos_ids())
  for (prompt, answers, _), row in zip(rows, ours):
    assert len(answers) == 2 and all(a and a[-1] not in eos for a in answers)
    want = [hf_last_hidden(torch_model, prompt + a) @ kernel for a in answers]
    np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-4)


def test_exported_classifier_scores_as_ours_in_transformers(tiny, tmp_path):
  lm, _ = tiny
  trainer = make_trainer(lm, [*EXAMPLES, RTE])
  perturbed(trainer)
  rows = [trainer.encode(i) for i in range(len(EXAMPLES))]
  ours = trainer.scores(rows)
  folder = export.export_reward_model(lm, trainer.state.trainable, LORA, str(tmp_path / "rm"))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
  assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
  # Left-padded, as a batch of (prompt, answer) texts is scored in transformers.
  seqs = [prompt + a for prompt, answers, _ in rows for a in answers]
  width = max(map(len, seqs))
  pad = hf.config.pad_token_id
  ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
  mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
  with torch.no_grad():
    theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
  np.testing.assert_allclose(ours.reshape(-1), theirs, atol=1e-4, rtol=0)
  assert np.ptp(theirs) > 1e-2      # scores that differ, so a shifted index would show


def test_a_head_with_a_bias_is_not_exported_as_a_classifier(tiny, tmp_path):
  lm, _ = tiny
  trainer = make_trainer(lm)
  pure = perturbed(trainer)
  pure["value_head"]["bias"] = np.float32(0.5)
  with pytest.raises(export.ExportError, match="bias"):
    export.export_reward_model(lm, pure, LORA, str(tmp_path / "rm"))
  assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize("loss", rm.LOSSES)
def test_losses_and_pair_metrics_equal_numpy(loss):
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((5, 3)).astype(np.float32)
  gold = np.array([0, 2, 1, 1, 0])
  out = jax.jit(rm.loss_sums, static_argnums=2)(jnp.asarray(scores), jnp.asarray(gold), loss)
  sig = lambda x: 1 / (1 + np.exp(-x))
  pairs = [(b, j) for b in range(5) for j in range(3) if j != gold[b]]
  margins = np.array([scores[b, gold[b]] - scores[b, j] for b, j in pairs])
  if loss == "bradley_terry":
    want = -np.log(sig(margins)).mean()
  else:
    y = np.arange(3)[None, :] == gold[:, None]
    want = -(y * np.log(sig(scores)) + (~y) * np.log(1 - sig(scores))).mean()
  count = float(out.count)
  np.testing.assert_allclose(float(out.loss) / count, want, rtol=1e-5)
  np.testing.assert_allclose(float(out.reported["accuracy"]) / count, (margins > 0).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(float(out.reported["margin"]) / count, margins.mean(), rtol=1e-5)


def test_ranking_metrics_against_brute_force():
  rng = np.random.default_rng(3)
  scores = np.round(rng.standard_normal((40, 3)), 1)       # rounded: ties happen
  gold = rng.integers(0, 3, 40)
  got = rm.ranking_metrics(scores, gold)
  right = [scores[i, gold[i]] for i in range(40)]
  wrong = [scores[i, j] for i in range(40) for j in range(3) if j != gold[i]]
  auc = np.mean([1.0 if r > w else 0.5 if r == w else 0.0
                 for r, w in itertools.product(right, wrong)])
  assert got["auc"] == pytest.approx(auc, abs=1e-12)
  assert got["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == gold))
  pair = [scores[i, gold[i]] > scores[i, j] for i in range(40) for j in range(3) if j != gold[i]]
  assert got["pairwise_accuracy"] == pytest.approx(np.mean(pair))
  assert got["count"] == 40


def test_config_refuses_what_a_reward_model_cannot_rank():
  with pytest.raises(config_lib.ConfigError, match="scores, not classes"):
    rm.RewardModelConfig(data=rm.RewardModelConfig().data.__class__(task="stsb"))
  with pytest.raises(config_lib.ConfigError, match="loss must be one of"):
    rm.RewardModelConfig(loss="hinge")


def test_learns_to_rank_the_gold_answer_and_reads_back(tiny, tmp_path):
  lm, _ = tiny
  out = tmp_path / "rm_run"
  config = rm.RewardModelConfig(lora=LORA, batch_size=4, gradient_accumulation_steps=2,
                                steps=24, output_dir=str(out),
                                optimizer=rm.RewardModelConfig().optimizer.__class__(
                                    learning_rate=3e-3))
  trainer = rm.RewardModelTrainer(config, lm=lm,
                                  train_examples=[*EXAMPLES, UNLABELLED, TOO_LONG])
  before = trainer.evaluate(EXAMPLES)
  history = trainer.train()
  after = trainer.evaluate([*EXAMPLES, UNLABELLED])
  assert history[-1]["rm/loss"] < 0.5 * history[0]["rm/loss"]
  assert after.metrics["pairwise_accuracy"] == 1.0 > before.metrics["pairwise_accuracy"]
  assert after.metrics["count"] == len(EXAMPLES) and after.skipped[0]["why"] == "unlabelled"
  assert trainer.skipped == {len(EXAMPLES), len(EXAMPLES) + 1}
  from jax_nlu_ppo.tools import report
  reported = report.read_run(out)
  assert reported.label == "rm_run (reward_model, sst2)"
  assert reported.metrics() == ["rm/loss", "rm/accuracy", "rm/margin"]
  # Read back as a reward model, at its last step, scoring as the trainer did.
  run = reader.load_run(out, lm=lm)
  assert isinstance(run.trainer, rm.RewardModelTrainer) and run.step == 24
  rows = [trainer.encode(i) for i in range(len(EXAMPLES))]
  np.testing.assert_array_equal(run.trainer.scores(rows), trainer.scores(rows))


@pytest.fixture(scope="module")
def rm_run(tiny, tmp_path_factory):
  """A reward model's run folder (a few steps, so its adapters are not the base)."""
  lm, _ = tiny
  out = tmp_path_factory.mktemp("rm") / "run"
  config = rm.RewardModelConfig(lora=LORA, batch_size=4, steps=3, output_dir=str(out))
  rm.RewardModelTrainer(config, lm=lm, train_examples=EXAMPLES).train()
  return out


def ppo_trainer(lm, **reward):
  from jax_nlu_ppo.nlu import answer
  from jax_nlu_ppo.rl import ppo
  from jax_nlu_ppo.rl import trainer as trainer_lib
  config = config_lib.TrainConfig(
      lora=LORA, ppo=ppo.PPOConfig(minibatch_size=2),
      rollout=config_lib.RolloutConfig(batch_size=4, min_new_tokens=3, max_new_tokens=5),
      reward=answer.RewardConfig(lenient=True, **reward))
  return trainer_lib.PPOTrainer(config, lm=lm, train_examples=EXAMPLES)


def test_ppo_rewards_are_the_reward_models_scores_of_its_rollouts(tiny, rm_run, tmp_path):
  """Reference: the exported classifier's backbone and score layer in transformers, on each
  row's prompt and response ids (the EOS ending a response left out)."""
  lm, _ = tiny
  trainer = ppo_trainer(lm, model=str(rm_run), label_weight=0.5, model_weight=2.0)
  metrics = trainer.step()
  examples, _, _, rewards = trainer.last_rows
  model_scores = trainer.last_reward_parts["model"]
  np.testing.assert_allclose(rewards, 0.5 * trainer.last_reward_parts["label"]
                             + 2.0 * model_scores, rtol=1e-6)
  assert metrics["env/model_reward_mean"] == pytest.approx(float(model_scores.mean()))
  run = reader.load_run(rm_run, lm=lm)     # the run's config names the embedded model
  folder = export.export_reward_model(lm, run.trainable, LORA, str(tmp_path / "rm_hf"))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
  gen = trainer.last_generation
  eos = set(lm.eos_ids())
  for row, example in enumerate(examples):
    response = [int(t) for t, m in zip(gen.tokens_br[row], gen.mask_br[row])
                if m and int(t) not in eos]
    ids = trainer._prompt_ids(example) + response
    with torch.no_grad():
      hidden = hf.model(torch.tensor([ids])).last_hidden_state[0, -1]
      want = hf.score(hidden)[0].item()
    assert model_scores[row] == pytest.approx(want, abs=1e-4)
  assert np.ptp(model_scores) > 0


def test_reward_model_errors_name_the_folder_before_loading(tiny, rm_run, tmp_path):
  lm, _ = tiny
  with pytest.raises(ValueError, match="not a run folder of `jax-nlu-ppo reward-model`"):
    ppo_trainer(lm, model=str(tmp_path / "nowhere"), label_weight=0)
  sft_run = tmp_path / "sft"
  from jax_nlu_ppo.rl import sft
  sft.SFTTrainer(sft.SFTConfig(lora=LORA, batch_size=4, steps=1, output_dir=str(sft_run)),
                 lm=lm, train_examples=EXAMPLES).train()
  with pytest.raises(ValueError, match="is a SFT run, not a reward model"):
    ppo_trainer(lm, model=str(sft_run), label_weight=0)
  with pytest.raises(ValueError, match="trained on prompt_format 'chat'"):
    from jax_nlu_ppo.nlu import answer
    from jax_nlu_ppo.rl import ppo
    from jax_nlu_ppo.rl import trainer as trainer_lib
    config = config_lib.TrainConfig(
        lora=LORA, ppo=ppo.PPOConfig(minibatch_size=2),
        rollout=config_lib.RolloutConfig(batch_size=4, prompt_format="paper"),
        reward=answer.RewardConfig(model=str(rm_run)))
    trainer_lib.PPOTrainer(config, lm=lm, train_examples=EXAMPLES)


def test_command_reports_a_bad_config_in_one_line(capsys):
  from jax_nlu_ppo import cli
  code = cli.main(["reward-model", "--config", str(ROOT / "configs/reward_model/sst2_cpu.yaml"),
                   "--set", "loss=hinge", "--compile-cache", "off"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert err[0].startswith("jax-nlu-ppo reward-model: error: ")
  assert "sst2_cpu.yaml: loss must be one of bradley_terry, pointwise, got 'hinge'" in err[0]
