"""Checkpoint tensors in and out: Hugging Face safetensors folders and GGUF files.

Import streams tensor by tensor: each parameter of the model is assembled on the host from the
files (one layer slice at a time into the stacked array), placed on its devices, and dropped
before the next one is read, so a 7B import never holds two copies of the model in host memory.
The table in `tensor_specs` maps every parameter to its Hugging Face name and layout; export
(`hf_tensors`, `write_safetensors`) walks the same table backwards, one tensor at a time too.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
from typing import Any, Callable, Iterator, Protocol

import jax
import ml_dtypes
import numpy as np

from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig


class CheckpointError(ValueError):
  """A checkpoint file is missing, incomplete or does not match its config."""


# ----------------------------------------------------------------------------------------------
# The parameter table.

@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One model parameter and its Hugging Face counterpart.

  `layout` says how the HF tensor is laid out relative to ours: "same"; "vector" (HF keeps it
  flat, e.g. a q bias of n*h); "kernelN" (HF stores `weight` as (out, in); ours is
  (*in_axes, *out_axes) with N input axes, e.g. q_proj is (d, n, h) = kernel1, o_proj (n, h, d)
  = kernel2).
  """
  path: tuple[str, ...]
  hf_name: str
  layout: str
  stacked: bool = False   # one HF tensor per layer, stacked on our leading `layers` axis

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.layout == "same":
      return tuple(shape)
    if self.layout == "vector":
      return (math.prod(shape),)
    n_in = int(self.layout[-1])
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))

  def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if self.layout.startswith("kernel"):
      w = w.T
    return w.reshape(shape)

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    if self.layout == "same":
      return a
    if self.layout == "vector":
      return a.reshape(-1)
    n_in = int(self.layout[-1])
    return a.reshape(math.prod(a.shape[:n_in]), -1).T


def tensor_specs(config: LlamaConfig) -> list[TensorSpec]:
  """Every parameter of `model.Llama` for this config, in a stable order."""
  layer = "model.layers.{i}."
  specs = [TensorSpec(("embed_tokens",), "model.embed_tokens.weight", "same")]
  linear = [("self_attn", "q_proj", "kernel1", config.qkv_bias),
            ("self_attn", "k_proj", "kernel1", config.qkv_bias),
            ("self_attn", "v_proj", "kernel1", config.qkv_bias),
            ("self_attn", "o_proj", "kernel2", config.o_bias),
            ("mlp", "gate_proj", "kernel1", config.mlp_bias),
            ("mlp", "up_proj", "kernel1", config.mlp_bias),
            ("mlp", "down_proj", "kernel1", config.mlp_bias)]
  for block, proj, layout, bias in linear:
    name = f"{layer}{block}.{proj}"
    specs.append(TensorSpec(("layers", block, proj, "kernel"), f"{name}.weight", layout, True))
    if bias:
      specs.append(TensorSpec(("layers", block, proj, "bias"), f"{name}.bias", "vector", True))
  for norm in ("input_layernorm", "post_attention_layernorm"):
    specs.append(TensorSpec(("layers", norm, "scale"), f"{layer}{norm}.weight", "same", True))
  specs.append(TensorSpec(("norm", "scale"), "model.norm.weight", "same"))
  if not config.tie_word_embeddings:
    specs.append(TensorSpec(("lm_head",), "lm_head.weight", "kernel1"))
  return specs


# ----------------------------------------------------------------------------------------------
# Tensor sources: a name -> numpy array view of a checkpoint, in Hugging Face names and layouts.

class TensorSource(Protocol):
  def names(self) -> set[str]: ...
  def shape(self, name: str) -> tuple[int, ...]: ...
  def get(self, name: str) -> np.ndarray: ...
  def where(self, name: str) -> str: ...


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class _SafetensorsFile:
  """A memory-mapped safetensors file.

  Read directly (the format is an 8-byte header length, a JSON header and raw data) because
  `safetensors`' numpy backend cannot return bfloat16, the dtype most LLaMA checkpoints use.
  """

  def __init__(self, path: str):
    self.path = path
    try:
      self.size = os.path.getsize(path)
      with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        text = f.read(header_len)
      if text[:1] == b"{" and len(text) < header_len:   # a JSON header that was cut
        _truncated(path, self.size, f"header of {header_len} bytes")
      header = json.loads(text)
    except FileNotFoundError:
      raise CheckpointError(f"{path}: file not found") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    self.entries = header
    self.data_start = 8 + header_len
    # Checked at open, so a cut file stops the load before any tensor is read.
    end, name = max(((e["data_offsets"][1], n) for n, e in header.items()), default=(0, None))
    if self.data_start + end > self.size:
      _truncated(path, self.size, f"tensor {name!r}")

  def get(self, name: str) -> np.ndarray:
    entry = self.entries[name]
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    begin, _ = entry["data_offsets"]
    return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin,
                     shape=tuple(entry["shape"]))


def _truncated(path: str, size: int, what: str):
  raise CheckpointError(f"{path}: the file ends at {size} bytes, before its {what} does: it "
                        "was truncated (an interrupted download or copy?); fetch it again")


class SafetensorsSource:
  """A Hugging Face folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`.

  `filename` names another file of the folder (e.g. a PEFT `adapter_model.safetensors`).
  """

  def __init__(self, folder: str, filename: str = "model.safetensors"):
    index = os.path.join(folder, f"{filename}.index.json")
    single = os.path.join(folder, filename)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {fn: None for fn in weight_map.values()}
      self._files = {fn: _SafetensorsFile(os.path.join(folder, fn)) for fn in files}
      self._map = {name: self._files[fn] for name, fn in weight_map.items()}
    elif os.path.exists(single):
      file = _SafetensorsFile(single)
      self._map = {name: file for name in file.entries}
    else:
      raise CheckpointError(f"{folder}: no {filename} or {filename}.index.json "
                            "(only safetensors checkpoints are read)")

  def names(self) -> set[str]:
    return set(self._map)

  def shape(self, name: str) -> tuple[int, ...]:
    file = self._map[name]
    if name not in file.entries:
      raise CheckpointError(f"{file.path}: tensor {name!r} is listed in the index but missing")
    return tuple(file.entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    return self._map[name].get(name)

  def where(self, name: str) -> str:
    return self._map[name].path


# GGUF (llama.cpp) tensor names -> Hugging Face names.
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name_from_gguf(name: str) -> str | None:
  parts = name.split(".")
  if parts[0] == "blk":
    base = _GGUF_NAMES.get(parts[2])
    return None if base is None else f"model.layers.{parts[1]}.{base}.{parts[3]}"
  base = _GGUF_NAMES.get(parts[0])
  return None if base is None else f"{base}.{parts[1]}"


class GGUFSource:
  """A GGUF file, dequantised to float32 tensor by tensor, in Hugging Face names and layouts."""

  def __init__(self, path: str):
    import gguf  # pylint: disable=import-outside-toplevel
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: file not found")
    try:
      self._reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on bad files
      with open(path, "rb") as f:
        head = f.read(8)
      readable_head = len(head) == 8 and head[:4] == b"GGUF" and (
          struct.unpack("<I", head[4:])[0] in gguf.READER_SUPPORTED_VERSIONS)
      # A GGUF cut short fails in numpy's reshapes, deep in the reader: say what it means.
      hint = (f"; it begins as GGUF but its header or tensors do not fit in its "
              f"{os.path.getsize(path)} bytes: truncated or damaged (an interrupted download "
              "or copy?); fetch it again") if readable_head else ""
      raise CheckpointError(f"{path}: not a readable GGUF file ({e}){hint}") from None
    self.path = path
    self._dequantize = gguf.quants.dequantize
    self.metadata = {k: _field_value(v) for k, v in self._reader.fields.items()
                     if not k.startswith("tokenizer.ggml.") or k.endswith("_token_id")}
    self._tensors = {}
    for tensor in self._reader.tensors:
      hf_name = _hf_name_from_gguf(tensor.name)
      if hf_name is not None:
        self._tensors[hf_name] = tensor
    self.config = LlamaConfig.from_hf(self.hf_config(), source=path)

  def hf_config(self) -> dict[str, Any]:
    """The transformers config this GGUF's metadata describes."""
    md = self.metadata
    arch = md.get("general.architecture", "llama")
    if arch not in ("llama", "qwen2"):
      return {"model_type": arch}
    get = lambda key, default=None: md.get(f"{arch}.{key}", default)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size") or int(self._reader.fields["tokenizer.ggml.tokens"].data.__len__())
    return {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("rope.dimension_count", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "lm_head" not in {n.split(".")[0] for n in self._tensors},
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first.
    return tuple(int(d) for d in reversed(self._tensors[name].shape))

  def get(self, name: str) -> np.ndarray:
    tensor = self._tensors[name]
    w = self._dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(name))
    # llama.cpp interleaves the two rotary halves of each q/k head; undo it (as transformers
    # does) so the rotate-half RoPE of Hugging Face checkpoints applies.
    if self.config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
      w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
      w = w.swapaxes(1, 2).reshape(self.shape(name))
    return w

  def where(self, name: str) -> str:
    return f"{self.path} (GGUF tensor {self._tensors[name].name!r})"


def _field_value(field) -> Any:
  try:
    return field.contents()
  except Exception:  # pylint: disable=broad-except
    return None


# ----------------------------------------------------------------------------------------------
# Import and export.

def _tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _check_shape(source: TensorSource, spec: TensorSpec, name: str, expected: tuple[int, ...],
                 config: LlamaConfig, config_source: str):
  if name not in source.names():
    raise CheckpointError(
        f"{config_source}: tensor {name!r} is missing from the checkpoint "
        f"(the config asks for it: tie_word_embeddings={config.tie_word_embeddings}, "
        f"attention bias={config.qkv_bias}, mlp_bias={config.mlp_bias})")
  got = source.shape(name)
  if got != expected:
    raise CheckpointError(
        f"{source.where(name)}: tensor {name!r} has shape {got} but {config_source} implies "
        f"{expected} (vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
        f"intermediate_size={config.intermediate_size}, heads={config.num_heads}, "
        f"kv_heads={config.num_kv_heads}, head_dim={config.head_dim})")


def load_params(source: TensorSource, config: LlamaConfig, abstract_params,
                config_source: str = "config.json",
                shardings=None,
                progress: Callable[[Iterator], Iterator] = iter,
                specs: list[TensorSpec] | None = None):
  """Fills the model's abstract parameter tree (from `nnx.eval_shape`) from a checkpoint.

  `abstract_params` is a nested dict of `jax.ShapeDtypeStruct`; the result has the same
  structure with arrays placed per `shardings` (same structure; default device if None).
  Every tensor's presence and shape are checked before any is read. `specs` (default: the
  model's table) lets other trees, such as LoRA adapters, load the same way.
  """
  specs = specs or tensor_specs(config)
  for spec in specs:
    leaf = _tree_get(abstract_params, spec.path)
    shape = leaf.shape[1:] if spec.stacked else leaf.shape
    for i in range(config.num_layers if spec.stacked else 1):
      name = spec.hf_name.format(i=i)
      _check_shape(source, spec, name, spec.hf_shape(shape), config, config_source)

  loaded: dict = {}
  for spec in progress(specs):
    leaf = _tree_get(abstract_params, spec.path)
    np_dtype = np.dtype(leaf.dtype)
    if spec.stacked:
      buf = np.empty(leaf.shape, np_dtype)
      for i in range(config.num_layers):
        buf[i] = spec.to_ours(source.get(spec.hf_name.format(i=i)), leaf.shape[1:])
    else:
      buf = spec.to_ours(source.get(spec.hf_name), leaf.shape).astype(np_dtype)
    array = (jax.device_put(buf) if shardings is None
             else sharding_lib.place(buf, _tree_get(shardings, spec.path)))
    node = loaded
    for key in spec.path[:-1]:
      node = node.setdefault(key, {})
    node[spec.path[-1]] = array
    del buf
  return loaded


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One tensor to export: its Hugging Face name and shape, and how to read it in its turn."""
  name: str
  shape: tuple[int, ...]
  read: Callable[[], np.ndarray]


def hf_tensors(config: LlamaConfig, params, specs: list[TensorSpec] | None = None
               ) -> list[HFTensor]:
  """Every parameter of `params` (a nested dict) as Hugging Face tensors, read lazily.

  A stacked leaf gives one tensor per layer, and reading one moves only that layer's slice to
  the host. Leaves may be anything with `.shape` and `[layer]` indexing (e.g. a kernel that
  folds its LoRA adapter in when a layer is read).
  """
  tensors = []
  for spec in specs or tensor_specs(config):
    leaf = _tree_get(params, spec.path)
    if spec.stacked:
      tensors += [HFTensor(spec.hf_name.format(i=i), spec.hf_shape(leaf.shape[1:]),
                           functools.partial(_read_hf, spec, leaf, i))
                  for i in range(config.num_layers)]
    else:
      tensors.append(HFTensor(spec.hf_name, spec.hf_shape(leaf.shape),
                              functools.partial(_read_hf, spec, leaf, None)))
  return tensors


def _read_hf(spec: TensorSpec, leaf, layer: int | None) -> np.ndarray:
  return spec.to_hf(np.asarray(jax.device_get(leaf if layer is None else leaf[layer])))


def to_hf_tensors(config: LlamaConfig, params) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every parameter, one at a time (for streaming export)."""
  for tensor in hf_tensors(config, params):
    yield tensor.name, tensor.read()


_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, tensors: list[HFTensor], dtype,
                      metadata: dict[str, str] | None = None) -> int:
  """Writes `tensors`, cast to `dtype`, as one safetensors file; returns the bytes of tensor data.

  Written directly, like the reader: the header lists every tensor's offsets, which the shapes
  alone determine, so each tensor can then be read, written and dropped in turn, where
  `safetensors.numpy.save_file` needs them all in memory at once.
  """
  dtype = np.dtype(dtype)
  header: dict[str, Any] = {"__metadata__": metadata or {}}
  offset = 0
  for tensor in tensors:
    size = math.prod(tensor.shape) * dtype.itemsize
    header[tensor.name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(tensor.shape),
                           "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for tensor in tensors:
      array = np.asarray(tensor.read(), dtype=dtype, order="C")
      if array.shape != tuple(tensor.shape):
        raise CheckpointError(f"{path}: tensor {tensor.name!r} was planned as {tensor.shape} but "
                              f"read as {array.shape}")
      f.write(array.reshape(-1).view(np.uint8))
  return offset
