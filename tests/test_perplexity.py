"""Token NLL against NumPy, and perplexity against transformers' own loss on a tiny random model."""
import math

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_nlu_ppo
from jax_nlu_ppo.model import lm_loss
from jax_nlu_ppo.nlu import perplexity as perplexity_lib
from jax_nlu_ppo.model import prompts as prompt_layout
from tests import tiny_hf

TEXTS = ["a", "the film is a gorgeous, witty ride", "dull",
         "an overlong, self-indulgent mess that never finds its footing or its jokes, alas",
         "Positive", "ok then, fine: it works <Judgement> Positive </Judgement>",
         "short again", "the cast is superb and the score is lovely"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(texts, vocab_size=320):
  """A byte-level BPE over `texts` (exact decode round trips), ChatML template, adds BOS.

  Ids 0, 1, 2 are pad, BOS and EOS ("<|im_end|>") as in `tiny_hf.BASE`. Trained in
  milliseconds, unlike loading SmolLM2's tokenizer from its GGUF (~8 s).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                         special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                 eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>"],
                                 chat_template=CHATML, padding_side="left")


def save_tiny_with_tokenizer(folder, texts, vocab_size=320, **overrides):
  """A random HF LLaMA and its tokenizer in `folder`; returns (torch model, tokenizer)."""
  tokenizer = tiny_tokenizer(texts, vocab_size)
  tokenizer.save_pretrained(folder)
  return tiny_hf.save_tiny(folder, vocab_size=len(tokenizer), **overrides), tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_ppl")
  torch_model, tokenizer = save_tiny_with_tokenizer(folder, TEXTS)
  return jax_nlu_ppo.load_pretrained(str(folder)), torch_model, tokenizer


def numpy_nll(logits, targets, mask):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
  return np.where(mask, -picked, 0.0)


def test_token_nll_matches_numpy():
  rng = np.random.default_rng(0)
  b, t, v = 3, 7, 50
  logits = (4 * rng.normal(size=(b, t, v))).astype(np.float32)
  targets = rng.integers(0, v, (b, t))
  mask = rng.random((b, t)) < 0.6
  expected = numpy_nll(logits, targets, mask)
  ours = np.asarray(lm_loss.token_nll(jnp.asarray(logits), jnp.asarray(targets),
                                      jnp.asarray(mask)))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  # A logit that padding may hold (inf) must not leak into the sum or the gradient.
  poisoned = np.where(mask[..., None], logits, np.inf).astype(np.float32)
  total = lm_loss.nll_sum(jnp.asarray(poisoned), jnp.asarray(targets), jnp.asarray(mask))
  assert int(total.tokens) == mask.sum()
  np.testing.assert_allclose(float(total.nll), expected.sum(), rtol=1e-5)
  grad = jax.grad(lambda z: lm_loss.nll_sum(z, jnp.asarray(targets), jnp.asarray(mask)).nll)(
      jnp.asarray(logits))
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad)[~mask].any()

  # (sum, count) pairs added over any split of the rows give exactly the whole mean.
  split = [lm_loss.nll_sum(jnp.asarray(logits[r]), jnp.asarray(targets[r]), jnp.asarray(mask[r]))
           for r in (slice(0, 1), slice(1, 3))]
  np.testing.assert_allclose(float((split[0] + split[1]).mean()),
                             expected.sum() / mask.sum(), rtol=1e-6)

  # Next-token form: position t predicts t + 1, counted where both are real.
  tokens = rng.integers(0, v, (b, t))
  real = np.ones((b, t), bool)
  real[1, :3] = False         # left padding
  real[2, 5:] = False         # right padding
  per_row = lm_loss.next_token_nll(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(real),
                                   axis=1)
  counted = real[:, :-1] & real[:, 1:]
  np.testing.assert_allclose(np.asarray(per_row.nll),
                             numpy_nll(logits[:, :-1], tokens[:, 1:], counted).sum(1), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(per_row.tokens), counted.sum(1))
  assert list(np.asarray(per_row.tokens)) == [6, 3, 4]


def torch_text_nll(model, ids):
  """transformers' mean causal-LM loss times the predicted tokens: the text's summed NLL."""
  with torch.no_grad():
    tensor = torch.tensor([ids])
    return float(model(input_ids=tensor, labels=tensor).loss) * (len(ids) - 1)


def test_perplexity_matches_transformers(tiny):
  lm, torch_model, tokenizer = tiny
  ids = [tokenizer(t)["input_ids"] for t in TEXTS]
  assert all(x[0] == tokenizer.bos_token_id for x in ids)
  assert len({prompt_layout.bucket_length(len(x)) for x in ids}) > 1   # several compiled lengths
  ref_nll = np.asarray([torch_text_nll(torch_model, x) for x in ids])
  ref_ppl = math.exp(ref_nll.sum() / sum(len(x) - 1 for x in ids))

  # Batches of 3 sorted by length, with a short last batch; then everything in one batch.
  for batch_size in (3, len(TEXTS)):
    result = perplexity_lib.perplexity(lm, TEXTS, batch_size=batch_size)
    np.testing.assert_array_equal(result.tokens_per_text, [len(x) - 1 for x in ids])
    np.testing.assert_allclose(result.nll_per_text, ref_nll, rtol=1e-5)
    assert result.perplexity == pytest.approx(ref_ppl, rel=1e-5)
    assert result.truncated == 0
  assert result.to_json()["texts"] == len(TEXTS)


def test_long_texts_are_truncated(tiny):
  lm, torch_model, tokenizer = tiny
  result = perplexity_lib.perplexity(lm, TEXTS, max_length=6, batch_size=4)
  lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
  assert result.truncated == sum(n > 6 for n in lengths) > 0
  np.testing.assert_array_equal(result.tokens_per_text, [min(n, 6) - 1 for n in lengths])
  first = tokenizer(TEXTS[1])["input_ids"][:6]
  assert result.nll_per_text[1] == pytest.approx(torch_text_nll(torch_model, first), rel=1e-5)


def test_text_sources_and_their_errors(tmp_path):
  path = tmp_path / "texts.txt"
  path.write_text("first line\n\n  second line  \n")
  assert perplexity_lib.read_texts(path) == ["first line", "second line"]
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    perplexity_lib.read_texts(tmp_path / "missing.txt")
  (tmp_path / "blank.txt").write_text("\n \n")
  with pytest.raises(ValueError, match="blank.txt"):
    perplexity_lib.read_texts(tmp_path / "blank.txt")

  ds = datasets.Dataset.from_dict({"sentence": ["good", " ", "bad "], "label": [1, 0, 0]})
  assert perplexity_lib.column_texts(ds, "sentence") == ["good", "bad"]
  assert perplexity_lib.column_texts(list(ds), "sentence") == ["good", "bad"]
  with pytest.raises(KeyError, match="no column 'text'.*sentence"):
    perplexity_lib.column_texts(ds, "text", source="sst2 dev")


def test_glue_dev_sentences(glue_dir):
  from jax_nlu_ppo.nlu import data
  texts = perplexity_lib.column_texts(data.load_glue_dir("sst2", "validation", glue_dir)[0],
                                      "sentence")
  assert len(texts) == 872
