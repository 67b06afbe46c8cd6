"""SFT on tiny random models: targets, the loss against transformers, accumulation, learning.

The embedded model's tokenizer checks the targets once (slow: ~8 s to load); its learning on
real SST-2 is `scripts/sft_learning.py`'s to show, a run of minutes on a CPU.
"""
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import jax_nlu_ppo
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.nlu import perplexity as perplexity_lib
from jax_nlu_ppo.rl import ppo, sft
from jax_nlu_ppo.model import pretrained, prompts as prompt_layout
from jax_nlu_ppo.nlu import tasks
from tests.test_perplexity import save_tiny_with_tokenizer
from tests.test_ppo_core import assert_same_function

ROOT = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast is superb",
             "a tedious mess", "warm, funny and smart", "nothing works here",
             "one of the year's best", "flat, lifeless and loud"]
EXAMPLES = [{"sentence": s, "label": 1 - i % 2, "idx": i} for i, s in enumerate(SENTENCES)]
RTE = {"task": "rte", "sentence1": "A man is sleeping.", "sentence2": "Nobody sleeps.",
       "label": 1, "idx": 100}
UNLABELLED = {"sentence": "no gold answer", "label": -1, "idx": 101}
TOO_LONG = {"sentence": "long " * 400, "label": 0, "idx": 102}
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                           targets=("q_proj", "v_proj", "down_proj"))

_target_nll = jax.jit(sft.target_nll, static_argnums=1)


def corpus():
  """Every text the tiny tokenizer must spell compactly: prompts, answers, the template's words."""
  texts = []
  for ex in [*EXAMPLES, RTE]:
    task = tasks.get_task(ex.get("task", "sst2"))
    for fmt in ("chat", "paper", "plain"):
      prompt = tasks.build_prompt(task, ex, fmt)
      texts += [prompt] if fmt == "paper" else [m["content"] for m in prompt]
      texts += [sft.answer_text(task, label, fmt) for label in range(task.num_labels)]
  return texts + ["system user assistant"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(lm, torch model): a random HF LLaMA with a BPE tokenizer, loaded by our loader."""
  folder = tmp_path_factory.mktemp("tiny_sft")
  # Weights 5x transformers' default scale: logits then span enough for the answer to be learnt.
  torch_model, _ = save_tiny_with_tokenizer(folder, corpus(), vocab_size=600,
                                            initializer_range=0.1)
  return jax_nlu_ppo.load_pretrained(str(folder), batch_size=4), torch_model


def make_trainer(lm, examples=EXAMPLES, **overrides):
  config = sft.SFTConfig(lora=LORA, **({"batch_size": 4} | overrides))
  return sft.SFTTrainer(config, lm=lm, train_examples=examples)


def flat(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))
  return {"/".join(str(k.key) for k in path): np.array(x) for path, x in leaves}


@pytest.mark.parametrize("fmt", ["chat", "paper", "plain"])
def test_only_the_gold_answer_is_a_target(tiny, fmt):
  lm, _ = tiny
  tok = lm.tokenizer
  trainer = make_trainer(lm, [*EXAMPLES, RTE], prompt_format=fmt)
  rows = [trainer.encode(i) for i in range(len(EXAMPLES) + 1)]
  batch = sft.make_batch(rows, lm.pad_id)
  tokens, mask, target_mask = map(np.asarray, (batch.tokens_bt, batch.mask_bt,
                                               batch.target_mask_br))
  prompt_len = tokens.shape[1] - target_mask.shape[1]
  assert prompt_len == prompt_layout.bucket_length(max(len(p) for p, _ in rows))
  assert target_mask.shape[1] == 8                     # answers are short: the smallest bucket
  for row, ex in enumerate([*EXAMPLES, RTE]):
    task = tasks.get_task(ex.get("task", "sst2"))
    word = task.answer_word(ex["label"])
    answer = tokens[row, prompt_len:][target_mask[row].astype(bool)]
    reply = word if fmt == "plain" else f" {word} </Judgement>"
    assert tok.decode(answer) == f"{reply}<|im_end|>"
    # Everything before the target is exactly the prompt that PPO and evaluation feed.
    prompt = tokens[row, :prompt_len][mask[row, :prompt_len].astype(bool)]
    chat = fmt != "paper"
    np.testing.assert_array_equal(
        prompt, pretrained.render_prompt(tok, tasks.build_prompt(task, ex, fmt), chat))
    if chat:
      # Prompt + target spell the template's finished turn, up to its EOS.
      messages = tasks.build_prompt(task, ex, fmt)
      if fmt == "chat":
        messages = messages[:-1]
      content = f"<Judgement> {word} </Judgement>" if fmt == "chat" else word
      messages.append({"role": "assistant", "content": content})
      closed = tok.apply_chat_template(messages, tokenize=False)
      end = closed.index("<|im_end|>", len(tok.decode(prompt))) + len("<|im_end|>")
      assert tok.decode([*prompt, *answer]) == closed[:end]
    else:
      assert tok.decode([*prompt, *answer], skip_special_tokens=False).startswith("<s>System:")
    assert ("Hypothesis:" in tok.decode(prompt)) == (ex is RTE)


def test_unusable_examples_are_skipped_and_named(tiny, caplog):
  lm, _ = tiny
  trainer = make_trainer(lm, [UNLABELLED, EXAMPLES[0], TOO_LONG, EXAMPLES[1]], batch_size=2)
  with caplog.at_level(logging.WARNING, logger="jax_nlu_ppo.rl.sft"):
    rows = trainer.next_rows(4)
  assert len(rows) == 4 and trainer.skipped == {0, 2} and trainer.position == 8
  text = caplog.text
  assert "training example 0 (idx 101)" in text and "unlabelled" in text
  assert "training example 2 (idx 102)" in text and "max_position_embeddings (256)" in text
  with pytest.raises(ValueError, match="has a label"):
    make_trainer(lm, [UNLABELLED])


def test_mixture_rows_keep_their_task(tiny, tmp_path):
  from jax_nlu_ppo.nlu import data
  lm, _ = tiny
  components = []
  for name, rows in (("sst2", EXAMPLES), ("rte", [RTE])):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "task"})
                              for r in rows))
    components.append(data.MixtureComponent(data.DataConfig(task=name, source="file",
                                                            path=str(path))))
  config = sft.SFTConfig(lora=LORA, mixture=tuple(components), batch_size=4)
  assert config.train_tasks == ("sst2", "rte")
  trainer = sft.SFTTrainer(config, lm=lm)
  tasks_seen = {trainer.task_of(ex) for ex in trainer.train_examples}
  assert tasks_seen == {"sst2", "rte"}
  for index, ex in enumerate(trainer.train_examples):
    prompt, target = trainer.encode(index)
    word = tasks.get_task(trainer.task_of(ex)).answer_word(ex["label"])
    assert ("Hypothesis:" in lm.tokenizer.decode(prompt)) == (ex["task"] == "rte")
    assert lm.tokenizer.decode(target) == f" {word} </Judgement><|im_end|>"


def test_fresh_adapter_loss_is_the_base_model_nll_in_transformers(tiny):
  lm, torch_model = tiny
  trainer = make_trainer(lm, [*EXAMPLES, RTE])
  rows = [trainer.encode(i) for i in (0, 3, 8, 5)]        # prompts of different lengths
  assert len({len(p) for p, _ in rows}) > 1
  ours = _target_nll(trainer.state.trainable, trainer.graphdef, trainer.base,
                     sft.make_batch(rows, lm.pad_id))
  total, count = 0.0, 0
  with torch.no_grad():
    for prompt, target in rows:
      ids = torch.tensor([[*prompt, *target]])
      logp = torch.log_softmax(torch_model(input_ids=ids).logits[0].double(), -1)
      positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
      total -= float(logp[positions, torch.tensor(target)].sum())
      count += len(target)
  assert int(ours.tokens) == count
  assert float(ours.mean()) == pytest.approx(total / count, rel=1e-5)
  # Hence "before training" figures may come from `policy_model()`: it is the base exactly.
  fresh = perplexity_lib.perplexity(trainer.policy_model(), SENTENCES)
  assert_same_function(fresh.perplexity, perplexity_lib.perplexity(lm, SENTENCES).perplexity)


def random_batch(vocab, rows=8, seed=0):
  """Random prompts and targets of different lengths, so micro-batches hold unequal tokens."""
  rng = np.random.default_rng(seed)
  return sft.make_batch([(list(rng.integers(3, vocab, rng.integers(3, 12))),
                          list(rng.integers(3, vocab, rng.integers(1, 7)))) for _ in range(rows)],
                        pad_id=0)


def test_gradient_accumulation_is_the_same_step(tiny):
  lm, _ = tiny
  llama = nnx.merge(lm.graphdef, jax.tree.map(jnp.copy, lm.params))
  graphdef, trainable, base = policy_lib.split(policy_lib.make_policy(llama, LORA, 0.0, seed=0))
  # Non-zero B, so that A has a gradient too.
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(trainable))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.replace_by_pure_dict(trainable, jax.tree.unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  batch = random_batch(lm.config.vocab_size)
  tx = optax.sgd(1.0)

  def one_step(accumulation_steps):
    state = sft.SFTState(jnp.int32(0), jax.tree.map(jnp.copy, trainable), tx.init(trainable))
    step = jax.jit(lambda s, b: sft.update(s, graphdef, base, b, jax.random.key(0), tx=tx,
                                           accumulation_steps=accumulation_steps))
    return step(state, batch)

  whole, m_whole = one_step(1)
  assert float(m_whole["sft/tokens"]) == np.asarray(batch.target_mask_br).sum()
  assert float(m_whole["sft/grad_norm"]) > 0
  micro, m_micro = one_step(4)
  for a, b in zip(jax.tree.leaves(whole.trainable), jax.tree.leaves(micro.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for name in ("sft/loss", "sft/grad_norm", "sft/tokens"):
    np.testing.assert_allclose(float(m_whole[name]), float(m_micro[name]), rtol=1e-5)
  # Not vacuous: micro-batches hold different numbers of target tokens, so a plain mean of
  # their means would differ.
  assert len(set(np.asarray(batch.target_mask_br).reshape(4, -1).sum(1))) > 1


def test_sft_steps_lower_the_answer_loss(tiny, tmp_path):
  lm, _ = tiny
  trainer = make_trainer(lm, EXAMPLES, batch_size=8, gradient_accumulation_steps=2,
                         optimizer=ppo.OptimizerConfig(learning_rate=1e-2),
                         output_dir=str(tmp_path))
  batch = sft.make_batch([trainer.encode(i) for i in range(len(EXAMPLES))], lm.pad_id)
  loss = lambda: float(_target_nll(trainer.state.trainable, trainer.graphdef, trainer.base,
                                   batch).mean())
  base_before, trainable_before = flat(trainer.base), flat(trainer.state.trainable)
  loss_before = loss()

  history = trainer.train(steps=8)
  assert loss() < 0.5 * loss_before, (loss_before, loss())
  assert history[0]["sft/loss"] == pytest.approx(loss_before, rel=1e-5)
  assert all(m["sft/skipped"] == 0 and np.isfinite(m["sft/loss"]) for m in history)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["iteration"] for line in lines] == list(range(1, 9))
  assert int(trainer.state.step) == 8

  # The frozen base is untouched; every adapter moved; the value head no loss reads kept its
  # zero init, so the trainable tree is PPO's and can start a PPO run.
  base_after, trainable_after = flat(trainer.base), flat(trainer.state.trainable)
  for name, value in base_before.items():
    np.testing.assert_array_equal(base_after[name], value, err_msg=name)
  for name, value in trainable_before.items():
    if name.startswith("value_head"):
      np.testing.assert_array_equal(trainable_after[name], value)
      assert not value.any()
    else:
      assert not np.array_equal(trainable_after[name], value), name

  # As `PPOTrainer(initial_trainable=...)` takes it: every leaf lands in a PPO policy's tree.
  llama = nnx.merge(lm.graphdef, lm.params)
  _, ppo_trainable, _ = policy_lib.split(policy_lib.make_policy(llama, LORA, 0.1, seed=1))
  nnx.replace_by_pure_dict(ppo_trainable, nnx.to_pure_dict(trainer.state.trainable))
  assert flat(ppo_trainable).keys() == trainable_after.keys()
  for name, value in flat(ppo_trainable).items():
    np.testing.assert_array_equal(value, trainable_after[name])

  # The adapted model serves generation, evaluation and perplexity.
  policy_lm = trainer.policy_model()
  ids = sft.make_batch([trainer.encode(0)], lm.pad_id).tokens_bt
  assert np.abs(policy_lm.logits(ids) - lm.logits(ids)).max() > 1e-3
  assert (perplexity_lib.perplexity(policy_lm, SENTENCES).perplexity
          != pytest.approx(perplexity_lib.perplexity(lm, SENTENCES).perplexity, rel=1e-3))
  result = trainer.evaluate(EXAMPLES[:4])
  assert result.metrics["count"] == 4 and len(result.predictions) == 4


def test_sft_configs_load():
  paths = sorted((ROOT / "configs" / "sft").glob("*.yaml"))
  assert paths
  for path in paths:
    config = config_lib.load_config(path, cls=sft.SFTConfig)
    assert config.eval_data is not None
  config = config_lib.load_config(paths[0], ["batch_size=8", "gradient_accumulation_steps=4",
                                             "data.task=rte"], cls=sft.SFTConfig)
  assert (config.batch_size, config.gradient_accumulation_steps, config.data.task) == (8, 4, "rte")
  with pytest.raises(config_lib.ConfigError, match="gradient_accumulation_steps"):
    config_lib.load_config(paths[0], ["gradient_accumulation_steps=3"], cls=sft.SFTConfig)
  with pytest.raises(config_lib.ConfigError, match="prompt_format"):
    config_lib.load_config(paths[0], ["prompt_format=xml"], cls=sft.SFTConfig)


@pytest.mark.slow
def test_smollm2_targets_close_the_turn_as_its_template_does(smollm2_gguf):
  """With the embedded model's own tokenizer (a ChatML template): the target ends at <|im_end|>."""
  tok = pretrained.load_tokenizer(pretrained.resolve("smollm2-135m-instruct"))
  cases = [("sst2", {"sentence": "a gorgeous film", "label": 1}),
           ("mnli", {"premise": "A man sleeps.", "hypothesis": "He is awake.", "label": 2}),
           ("stsb", {"sentence1": "A cat sits.", "sentence2": "A cat is sitting.", "label": 4.8})]
  for name, ex in cases:
    task = tasks.get_task(name)
    word = task.answer_word(ex["label"])
    for fmt, prompt_end, reply in (
        ("chat", "<|im_start|>assistant\n<Judgement>", f" {word} </Judgement>"),
        ("paper", "Assistant: <Judgement>", f" {word} </Judgement>"),
        ("plain", "<|im_start|>assistant\n", word)):
      prompt, target = sft.encode_example(tok, task, ex, fmt, (tok.eos_token_id,))
      assert tok.decode(prompt).endswith(prompt_end)
      assert tok.decode(target) == f"{reply}<|im_end|>"
      assert target[-1] == tok.eos_token_id and tok.eos_token_id not in target[:-1]
