"""Config presets, Hugging Face config round trips, RoPE scaling against transformers."""
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jax_nlu_ppo import LlamaConfig, RopeScaling
from jax_nlu_ppo.model import pretrained


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset, expected", [
    ("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
    ("llama3p1_8b", 8_030_261_248), ("llama3p2_1b", 1_235_814_400),
    ("smollm2_135m", 134_515_008)])
def test_preset_sizes_from_abstract_shapes(preset, expected):
  """The real 7B/8B/13B shapes, built with eval_shape: no memory is allocated."""
  config = getattr(LlamaConfig, preset)()
  abstract = pretrained.abstract_model(config, "bfloat16")
  from flax import nnx
  assert _count(nnx.state(abstract, nnx.Param)) == expected == config.num_params


def test_hf_config_round_trip_through_transformers():
  config = LlamaConfig.llama3p1_8b()
  hf = transformers.LlamaConfig(**config.to_hf())
  assert LlamaConfig.from_hf(hf.to_dict()) == config


def test_reads_legacy_rope_keys():
  """Pre-transformers-5 files keep `rope_theta` and `rope_scaling` at the top level."""
  legacy = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2, rope_theta=500000.0,
                rope_scaling={"type": "linear", "factor": 4.0})
  config = LlamaConfig.from_hf(legacy)
  assert config.rope_theta == 500000.0
  assert config.rope_scaling == RopeScaling("linear", 4.0)
  assert config.num_kv_heads == 2 and config.head_dim == 4


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}])
def test_inv_freq_matches_transformers(rope):
  hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                rope_scaling=rope, max_position_embeddings=131072)
  ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu")) if rope[
      "rope_type"] != "default" else (None, None)
  if ref is None:
    ref = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
  ours = LlamaConfig.from_hf(hf.to_dict()).rope_inv_freq()
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_heads_must_divide():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlamaConfig.tiny(num_heads=4, num_kv_heads=3)
