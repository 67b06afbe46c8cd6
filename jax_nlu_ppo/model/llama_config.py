"""The LLaMA-family model configuration: presets, and the mapping to and from Hugging Face configs."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


class UnsupportedModelError(ValueError):
  """The checkpoint describes an architecture this LLaMA implementation would compute wrongly."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as in transformers' `rope_parameters` / `rope_scaling`.

  `llama3` (LLaMA-3.1/3.2): wavelengths longer than `original_max_position_embeddings /
  low_freq_factor` are divided by `factor`, shorter than `... / high_freq_factor` are kept, and
  the band between is interpolated smoothly. `linear`: every frequency is divided by `factor`.
  """
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


_SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-architecture decoder (LLaMA-2/3, SmolLM2, Qwen2-style biases)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  # LLaMA's `attention_bias` puts a bias on q, k, v and o; Qwen2 has one on q, k, v only.
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  model_type: str = "llama"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedModelError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if self.rope_scaling.rope_type not in _SUPPORTED_ROPE:
      raise UnsupportedModelError(
          f"rope scaling type {self.rope_scaling.rope_type!r} is not supported "
          f"(supported: {', '.join(_SUPPORTED_ROPE)})")

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  @property
  def num_params(self) -> int:
    d, f, h, k, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                      self.num_kv_heads, self.head_dim)
    attn = d * hd * (h + 2 * k) + h * hd * d
    attn += hd * (h + 2 * k) * self.qkv_bias + d * self.o_bias
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  def rope_inv_freq(self) -> np.ndarray:
    """Inverse frequencies (head_dim / 2,) in float32, scaled as the config says."""
    exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
    inv_freq = 1.0 / (self.rope_theta ** exponents)
    s = self.rope_scaling
    if s.rope_type == "linear":
      inv_freq = inv_freq / s.factor
    elif s.rope_type == "llama3":
      low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
      high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
      wavelen = 2 * math.pi / inv_freq
      scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
      smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
          s.high_freq_factor - s.low_freq_factor)
      smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
      is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
      inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)

  # Presets: the shapes users fine-tune for NLU. Weights come from `load_pretrained`.
  @classmethod
  def llama2_7b(cls) -> LlamaConfig:
    return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
               max_position_embeddings=4096, eos_token_id=2, pad_token_id=None)

  @classmethod
  def llama2_13b(cls) -> LlamaConfig:
    return cls(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
               num_heads=40, num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5,
               max_position_embeddings=4096, eos_token_id=2)

  @classmethod
  def llama3p1_8b(cls) -> LlamaConfig:
    return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
               num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
               max_position_embeddings=131072, bos_token_id=128000,
               eos_token_id=(128001, 128008, 128009))

  @classmethod
  def llama3p2_1b(cls) -> LlamaConfig:
    return cls(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
               num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
               rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
               max_position_embeddings=131072, tie_word_embeddings=True,
               bos_token_id=128000, eos_token_id=(128001, 128008, 128009))

  @classmethod
  def smollm2_135m(cls) -> LlamaConfig:
    return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)

  @classmethod
  def tiny(cls, **overrides: Any) -> LlamaConfig:
    """A random-weight toy for tests: two layers, GQA, a small vocabulary."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return cls(**(base | overrides))

  # Hugging Face interop.
  @classmethod
  def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """Reads a transformers `config.json` dict; rejects what this model would get wrong."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "qwen2"):
      raise UnsupportedModelError(
          f"{source}: model_type {model_type!r} is not supported; this trainer implements the "
          "LLaMA architecture (llama, qwen2-style q/k/v biases)")
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
      raise UnsupportedModelError(
          f"{source}: sliding-window attention (sliding_window={hf['sliding_window']}) is not "
          "supported; only full causal attention is implemented")
    if hf.get("hidden_act", "silu") != "silu":
      raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
    # transformers >= 5 nests rope settings in `rope_parameters`; older files use
    # `rope_theta` plus an optional `rope_scaling` dict.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    defaults = RopeScaling()
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(rope.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(rope.get(
            "original_max_position_embeddings", defaults.original_max_position_embeddings)))
    num_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    if model_type == "qwen2":
      qkv_bias, o_bias = True, False
    else:
      qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id", 2)
    try:
      return cls(
          vocab_size=hf["vocab_size"],
          hidden_size=hidden,
          intermediate_size=hf["intermediate_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=num_heads,
          num_kv_heads=hf.get("num_key_value_heads") or num_heads,
          head_dim=hf.get("head_dim") or hidden // num_heads,
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          rope_theta=float(rope_theta),
          rope_scaling=scaling,
          max_position_embeddings=hf.get("max_position_embeddings", 4096),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
          qkv_bias=qkv_bias,
          o_bias=o_bias,
          mlp_bias=bool(hf.get("mlp_bias", False)),
          model_type=model_type,
          bos_token_id=hf.get("bos_token_id"),
          eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
          pad_token_id=hf.get("pad_token_id"))
    except KeyError as e:
      raise UnsupportedModelError(f"{source}: required key {e.args[0]!r} is missing") from None
    except UnsupportedModelError as e:
      raise UnsupportedModelError(f"{source}: {e}") from None

  def to_hf(self) -> dict[str, Any]:
    """A transformers `config.json` dict for export back to the Hugging Face world."""
    s = self.rope_scaling
    rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": s.rope_type}
    if s.rope_type != "default":
      rope["factor"] = s.factor
    if s.rope_type == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
    hf = {
        "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": None if s.rope_type == "default" else rope,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "mlp_bias": self.mlp_bias,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type == "llama":
      hf["attention_bias"] = self.qkv_bias
    return hf


# The preset classmethods above by name (`plan --model-config`, `bench --preset`), and the hub
# ids they stand for.
MODEL_PRESETS = ("llama2_7b", "llama2_13b", "llama3p1_8b", "llama3p2_1b", "smollm2_135m")
HUB_PRESETS = {"meta-llama/Llama-2-7b-chat-hf": "llama2_7b",
               "meta-llama/Llama-2-7b-hf": "llama2_7b",
               "meta-llama/Llama-2-13b-chat-hf": "llama2_13b",
               "meta-llama/Llama-2-13b-hf": "llama2_13b",
               "meta-llama/Llama-3.1-8B-Instruct": "llama3p1_8b",
               "meta-llama/Llama-3.2-1B-Instruct": "llama3p2_1b",
               "smollm2-135m-instruct": "smollm2_135m"}
