"""Logit parity with transformers (torch, CPU) on random tiny checkpoints, float32."""
import numpy as np
import pytest
import torch
import transformers

import jax_nlu_ppo
from jax_nlu_ppo.model import sampling
from tests import tiny_hf

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(num_key_value_heads=1, rope_theta=500000.0,
                            rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    "linear_rope_biases": dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                               attention_bias=True, mlp_bias=True),
    "qwen2_qkv_bias": dict(model_type="qwen2", tie_word_embeddings=True),
}


def max_rel_diff(ours, ref, mask):
  valid = mask.astype(bool)
  return np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
  overrides = dict(CASES[case])
  model_type = overrides.pop("model_type", "llama")
  ref_model = tiny_hf.save_tiny(tmp_path, model_type=model_type, **overrides)
  lm = jax_nlu_ppo.load_pretrained(str(tmp_path))
  ids, mask = tiny_hf.left_padded_batch(lm.config.vocab_size, batch=4, length=40)
  ours = lm.logits(ids, mask)
  ref = tiny_hf.torch_logits(ref_model, ids, mask)
  assert ours.shape == ref.shape
  assert max_rel_diff(ours, ref, mask) <= 1e-5


def test_rope_scaling_really_matters(tmp_path):
  """The llama3 case would pass trivially if scaling were ignored at short positions."""
  ref_model = tiny_hf.save_tiny(tmp_path, rope_scaling=LLAMA3_ROPE)
  lm = jax_nlu_ppo.load_pretrained(str(tmp_path))
  ids, mask = tiny_hf.left_padded_batch(lm.config.vocab_size, batch=2, length=64)
  ref = tiny_hf.torch_logits(ref_model, ids, mask)
  plain = tiny_hf.save_tiny(tmp_path / "plain")  # same seed, no scaling
  assert max_rel_diff(tiny_hf.torch_logits(plain, ids, mask), ref, mask) > 1e-3
  assert max_rel_diff(lm.logits(ids, mask), ref, mask) <= 1e-5


def test_sharded_bfloat16_checkpoint(tmp_path):
  """A sharded index (several files) of bfloat16 tensors, read into float32 and bfloat16."""
  ref_model = tiny_hf.save_tiny(tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  ref_model = ref_model.to(torch.bfloat16).float()  # the weights as stored
  ids, mask = tiny_hf.left_padded_batch(160, batch=3, length=16)
  ref = tiny_hf.torch_logits(ref_model, ids, mask)
  lm32 = jax_nlu_ppo.load_pretrained(str(tmp_path), dtype="float32")
  assert max_rel_diff(lm32.logits(ids, mask), ref, mask) <= 1e-5
  lm16 = jax_nlu_ppo.load_pretrained(str(tmp_path), dtype="bfloat16")
  leaf = lm16.params["layers"]["self_attn"]["q_proj"]["kernel"][...]
  assert leaf.dtype == np.dtype("bfloat16")
  # bfloat16 activations: about 3 significant digits per op, compounded over two layers.
  assert max_rel_diff(lm16.logits(ids, mask), ref, mask) <= 5e-2


def test_greedy_generation_matches_transformers(tmp_path):
  """KV-cache decoding over a left-padded batch gives transformers' greedy tokens."""
  ref_model = tiny_hf.save_tiny(tmp_path, seed=3)
  lm = jax_nlu_ppo.load_pretrained(str(tmp_path))
  ids, mask = tiny_hf.left_padded_batch(160, batch=4, length=16, seed=1)
  gen = lm.generate_ids(ids, mask, 12, sampling.SamplingConfig(temperature=0.0))
  with torch.no_grad():
    ref = ref_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
  ref = ref[:, ids.shape[1]:].numpy()
  ours = np.where(np.asarray(gen.mask_br), np.asarray(gen.tokens_br), 0)
  ref = np.pad(ref, ((0, 0), (0, 12 - ref.shape[1])))
  np.testing.assert_array_equal(ours, ref)


def test_incremental_decoding_equals_full_forward(tmp_path):
  """Log-probs recorded while decoding equal a full forward over prompt + answer."""
  tiny_hf.save_tiny(tmp_path, seed=5)
  lm = jax_nlu_ppo.load_pretrained(str(tmp_path))
  ids, mask = tiny_hf.left_padded_batch(160, batch=3, length=16, seed=2)
  gen = lm.generate_ids(ids, mask, 8, sampling.SamplingConfig(temperature=1.0), seed=7)
  full_ids = np.concatenate([ids, np.asarray(gen.tokens_br)], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(np.asarray(gen.tokens_br))], axis=1)
  logits = lm.logits(full_ids, full_mask)[:, ids.shape[1] - 1:-1]
  logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
  expected = np.take_along_axis(logp, np.asarray(gen.tokens_br)[..., None], -1)[..., 0]
  valid = np.asarray(gen.mask_br)
  np.testing.assert_allclose(np.asarray(gen.logprobs_br)[valid], expected[valid], atol=1e-5)
