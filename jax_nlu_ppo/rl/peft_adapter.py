"""PEFT LoRA adapter folders (ours, or trained by peft in torch) read into a policy's trainable
state: the files' names, PEFT's tensor names and layout, and the checks that stop an adapter of
other settings or another base before anything is computed. `runs/export.py` writes them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import operator
import os
import re

import jax
from flax import nnx

from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import weights as weights_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig
from jax_nlu_ppo.rl import policy as policy_lib

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_HEAD_WEIGHTS = "value_head.safetensors"
# PEFT names a LoRA tensor after the wrapped module: PeftModel.base_model (LoraModel).model.
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
  """An adapter folder cannot be used as asked (its file, setting or tensor named)."""


def adapter_specs(config: LlamaConfig, targets) -> list[weights_lib.TensorSpec]:
  """PEFT's name and layout of each LoRA matrix, derived from the base model's table.

  A kernel stored as (*in, *out) is HF's (out, in) `weight`. Its A (*in, r) is then PEFT's
  `lora_A.weight` (r, in) by the same layout rule, and B (r, *out) is `lora_B.weight` (out, r),
  a kernel with one input axis.
  """
  specs = []
  for spec in weights_lib.tensor_specs(config):
    if spec.path[:1] != ("layers",) or spec.path[-1] != "kernel" or spec.path[2] not in targets:
      continue
    adapter = ("llama", *spec.path[:-1], "adapter")
    name = PEFT_PREFIX + spec.hf_name.removesuffix(".weight")
    specs += [weights_lib.TensorSpec((*adapter, "a"), f"{name}.lora_A.weight", spec.layout, True),
              weights_lib.TensorSpec((*adapter, "b"), f"{name}.lora_B.weight", "kernel1", True)]
  return specs


def critic_specs(pure) -> list[weights_lib.TensorSpec]:
  """Everything trainable but the policy's adapters, under its own dotted path, as it is."""
  leaves, _ = jax.tree_util.tree_flatten_with_path({k: v for k, v in pure.items() if k != "llama"})
  paths = [tuple(str(k.key) for k in path) for path, _ in leaves]
  return [weights_lib.TensorSpec(path, ".".join(path), "same") for path in paths]


# adapter_config.json settings this implementation cannot honour, with the value it needs.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "fan_in_fan_out": False,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None}


def load_peft_adapter(folder: str, lm, critic_lora: bool | None = None
                      ) -> tuple[lora_lib.LoraConfig, nnx.State]:
  """Reads a PEFT LoRA folder (ours, or trained by peft in torch) into our trainable state.

  The result is what `policy.split` gives for `lm` with that LoRA config, ready for
  `PPOTrainer(config, initial_trainable=...)` (with `config.lora` set to the returned config).
  The value head (and critic adapters) come from `value_head.safetensors` when the folder has
  it; otherwise the critic starts fresh (V = 0). `critic_lora` forces the presence (True) or
  absence (False) of critic adapters; by default it follows the file.
  """
  lora, base = read_adapter_config(folder)
  critic_source = None
  if os.path.exists(os.path.join(folder, VALUE_HEAD_WEIGHTS)):
    critic_source = weights_lib.SafetensorsSource(folder, VALUE_HEAD_WEIGHTS)
  if critic_lora is None:
    critic_lora = critic_source is not None and any(
        n.startswith("critic.") for n in critic_source.names())

  def fresh_trainable():
    # A new module over the same, untouched arrays: make_policy adds its adapters in place.
    llama = nnx.merge(lm.graphdef, lm.params)
    return policy_lib.split(policy_lib.make_policy(llama, lora, value_dropout=0.0, seed=0,
                                                   critic_lora=critic_lora))[1]

  # The files are checked against the shapes alone: a mismatched adapter stops before anything
  # is computed.
  shapes = nnx.to_pure_dict(nnx.eval_shape(fresh_trainable))
  specs = adapter_specs(lm.config, lora.targets)
  source = weights_lib.SafetensorsSource(folder, ADAPTER_WEIGHTS)
  _check_adapter_tensors(source, specs, shapes, lm.config, lora,
                         os.path.join(folder, ADAPTER_WEIGHTS), base)
  value_specs = critic_specs(shapes)
  if critic_source is not None:
    _check_tensors(critic_source, value_specs, shapes, lm.config,
                   f"critic_lora={critic_lora}, hidden_size={lm.config.hidden_size}",
                   os.path.join(folder, VALUE_HEAD_WEIGHTS))
  trainable = fresh_trainable()
  pure = nnx.to_pure_dict(trainable)
  loaded = weights_lib.load_params(source, lm.config, pure, specs=specs)
  pure["llama"] = loaded["llama"]
  if critic_source is not None:
    pure |= weights_lib.load_params(critic_source, lm.config, pure, specs=value_specs)
  else:
    log.info("%s has no %s; the value head starts at zero", folder, VALUE_HEAD_WEIGHTS)
  nnx.replace_by_pure_dict(trainable, pure)
  return lora, trainable


def check_initial_adapter(folder: str, config) -> None:
  """Stops when the PEFT adapter in `folder` (a run's `model.adapter`) has other LoRA settings
  than `config.lora`; they are known from its config file, before the base loads."""
  lora, _ = read_adapter_config(folder)
  differ = [(f"lora.{f.name}", getattr(lora, f.name), getattr(config.lora, f.name))
            for f in dataclasses.fields(lora)
            if getattr(lora, f.name) != getattr(config.lora, f.name)]
  if differ:
    theirs = [f"{key}={_override_value(value)}" for key, value, _ in differ]
    ours = ", ".join(f"{key}={_override_value(value)}" for key, _, value in differ)
    raise AdapterError(f"model.adapter {os.path.join(folder, ADAPTER_CONFIG)}: the adapter "
                      f"has {', '.join(theirs)}, the config {ours}; set the config's lora "
                      f"section to the adapter's (--set {' '.join(theirs)}), or pass an adapter "
                      "trained with the config's")


def read_adapter_config(folder: str) -> tuple[lora_lib.LoraConfig, str | None]:
  """A PEFT folder's LoRA settings and the base it names, from its adapter_config.json."""
  path = os.path.join(folder, ADAPTER_CONFIG)
  try:
    with open(path) as f:
      peft = json.load(f)
  except FileNotFoundError:
    raise AdapterError(f"{path}: not found; a PEFT adapter folder needs {ADAPTER_CONFIG}") from None
  except json.JSONDecodeError as e:
    raise AdapterError(f"{path}: not valid JSON ({e})") from None
  return _lora_config(peft, path), peft.get("base_model_name_or_path")


def _override_value(value) -> str:
  """`value` as a --set override writes it (YAML)."""
  if isinstance(value, tuple):
    return f"[{','.join(value)}]"
  return str(value).lower() if isinstance(value, bool) else str(value)


def _lora_config(peft: dict, path: str) -> lora_lib.LoraConfig:
  if peft.get("peft_type") != "LORA":
    raise AdapterError(f"{path}: peft_type {peft.get('peft_type')!r} is not supported (LORA only)")
  for key, needed in _UNSUPPORTED.items():
    value = peft.get(key, needed)  # absent: PEFT's default, the value needed
    if (value or None) != (needed or None):  # null, false and {} all agree
      raise AdapterError(f"{path}: {key}={value!r} is not supported (needs {needed!r})")
  targets = peft.get("target_modules")
  if targets == "all-linear":
    targets = list(lora_lib.ALL_TARGETS)
  if not isinstance(targets, list):
    raise AdapterError(f"{path}: target_modules must be a list of module names, got {targets!r}")
  unknown = sorted(set(targets) - set(lora_lib.ALL_TARGETS))
  if unknown:
    raise AdapterError(f"{path}: target_modules {unknown} cannot be adapted here; supported: "
                      f"{', '.join(lora_lib.ALL_TARGETS)}")
  try:
    return lora_lib.LoraConfig(
        rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
        dropout=float(peft.get("lora_dropout", 0.0)),
        targets=tuple(t for t in lora_lib.ALL_TARGETS if t in targets),
        rslora=bool(peft.get("use_rslora", False)))
  except KeyError as e:
    raise AdapterError(f"{path}: required key {e.args[0]!r} is missing") from None


def _check_adapter_tensors(source, specs, pure, config: LlamaConfig, lora: lora_lib.LoraConfig,
                           path: str, base: str | None = None):
  # Said where the tensors show another model's layer count or widths, not a mis-edited rank.
  another_base = (f"; it was made for another base model ({ADAPTER_CONFIG} names {base!r}): "
                  "run on that base (model.name), or train an adapter on this one")
  expected = {s.hf_name.format(i=i) for s in specs for i in range(config.num_layers)}
  unexpected = sorted(n for n in source.names() if n not in expected)
  if unexpected:
    layers = [int(m[1]) for n in unexpected if (m := re.search(r"\.layers\.(\d+)\.", n))]
    raise AdapterError(
        f"{path}: tensor {unexpected[0]!r} is not an adapter of this "
        f"model with target_modules {list(lora.targets)} and {config.num_layers} layers "
        f"({len(unexpected)} such tensors)"
        + (another_base if layers and max(layers) >= config.num_layers else ""))
  _check_tensors(source, specs, pure, config, f"r={lora.rank}, target_modules="
                 f"{list(lora.targets)}, hidden_size={config.hidden_size}, "
                 f"heads={config.num_heads}, kv_heads={config.num_kv_heads}, "
                 f"head_dim={config.head_dim}, intermediate_size={config.intermediate_size}",
                 path, another_base, lora.rank)


def _check_tensors(source, specs, pure, config: LlamaConfig, settings: str, path: str,
                   another_base: str = "", rank: int | None = None):
  """Every tensor present with the shape this model needs; errors name the tensor and why.
  `another_base` ends the message when a layer or a width other than the `rank` differs."""
  for spec in specs:
    leaf = functools.reduce(operator.getitem, spec.path, pure)
    shape = spec.hf_shape(leaf.shape[1:] if spec.stacked else leaf.shape)
    for i in range(config.num_layers if spec.stacked else 1):
      name = spec.hf_name.format(i=i)
      if name not in source.names():
        raise AdapterError(f"{path}: tensor {name!r} is missing; this model expects it with "
                          f"{settings}" + (another_base if i else ""))
      got = source.shape(name)
      if got != shape:
        widths = any(g != e and e != rank for g, e in zip(got, shape))
        raise AdapterError(f"{path}: tensor {name!r} has shape {got} but this model expects "
                          f"{shape} ({settings})" + (another_base if widths else ""))
