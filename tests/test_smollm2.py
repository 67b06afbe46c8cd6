"""The embedded SmolLM2-135M-Instruct (GGUF) against transformers loading the same file."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import jax_nlu_ppo

pytestmark = pytest.mark.slow

PROMPTS = [
    "Is the sky blue?", "Classify the sentiment: I loved this movie.", "What is 2+2?",
    "Write a haiku about rain.", "Translate 'hello' to French.", "Name a prime number.",
    "Answer yes or no: is water wet?", "Hi",
]


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
  return jax_nlu_ppo.load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  import transformers
  folder, name = os.path.split(smollm2_gguf)
  return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


def test_config_read_from_gguf(lm):
  # GGUF stores eps as float32 (9.99999975e-06); everything else equals the preset exactly.
  assert lm.config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
  preset = jax_nlu_ppo.LlamaConfig.smollm2_135m()
  assert dataclasses.replace(lm.config, rms_norm_eps=preset.rms_norm_eps) == preset
  assert lm.tokenizer.chat_template and len(lm.tokenizer) == lm.config.vocab_size


def test_logits_match_transformers(lm, reference):
  ids, mask = lm.encode(PROMPTS)
  ours = lm.logits(ids, mask)
  with torch.no_grad():
    ref = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask)).logits.numpy()
  valid = mask.astype(bool)
  rel = np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max()
  assert rel <= 1e-4


def test_greedy_chat_generation_matches_transformers(lm, reference):
  ids, mask = lm.encode(PROMPTS)
  gen = lm.generate_ids(ids, mask, 16, jax_nlu_ppo.SamplingConfig(temperature=0.0))
  with torch.no_grad():
    ref = reference.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask), max_new_tokens=16,
                             do_sample=False)
  ref = ref[:, ids.shape[1]:].numpy()
  eos = lm.tokenizer.eos_token_id
  ours = np.where(np.asarray(gen.mask_br), np.asarray(gen.tokens_br), eos)
  np.testing.assert_array_equal(ours, np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])),
                                             constant_values=eos))
  texts = lm.generate(PROMPTS, max_new_tokens=16)
  expected = [lm.tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True)
              for row in ref]
  assert texts == expected


def test_bfloat16_runs_close_to_float32(lm):
  lm16 = jax_nlu_ppo.load_pretrained("smollm2-135m-instruct", dtype="bfloat16")
  ids, mask = lm.encode(PROMPTS[:4])
  ref = lm.logits(ids, mask)
  ours = lm16.logits(ids, mask)
  valid = mask.astype(bool)
  # bfloat16 keeps ~3 significant digits; over 30 layers the logits drift by a few percent of
  # their range, while the next-token choice mostly survives.
  rel = np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max()
  agree = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
  assert np.isfinite(ours).all()
  assert rel <= 0.1, rel
  assert agree >= 0.85, agree
  assert len(lm16.generate(PROMPTS[:2], max_new_tokens=8)) == 2
