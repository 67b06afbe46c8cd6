"""How much memory each device needs for a PPO run, worked out before anyone books the hardware.

Nothing is allocated: the policy is built under `nnx.eval_shape`, its shardings come from the
trainer's own steps (`steps.build`), and the per-device bytes of each part are
the shard shapes times the dtype size. The rollout and update programs are then compiled for
the mesh (on fake CPU devices: `plan` sets that up) and XLA's memory analysis gives their
temporaries (activations, KV cache, gradients). XLA lays out and fuses differently on TPU and
GPU, so those figures are estimates; the parameter, adapter and optimizer figures are exact.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.model import llama_config
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import ppo as ppo_lib
from jax_nlu_ppo.rl import steps as ppo_steps
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.config import TrainConfig
from jax_nlu_ppo.model.llama_config import LlamaConfig

GiB = 1024 ** 3
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  bytes_per_device: int
  how: str


@dataclasses.dataclass(frozen=True)
class Plan:
  model: str
  num_params: int
  mesh: dict[str, int]
  parts: list[Part]
  device_memory_gib: float | None = None
  compile_s: float | None = None

  @property
  def resident(self) -> int:
    """Bytes held for the whole run: weights, adapters, reference and optimizer state."""
    return sum(p.bytes_per_device for p in self.parts if p.name in RESIDENT)

  @property
  def peak(self) -> int:
    """Resident bytes plus the larger of the two compiled steps' temporaries."""
    temps = [p.bytes_per_device for p in self.parts if p.name in TEMPORARY]
    return self.resident + max(temps, default=0)

  def table(self) -> str:
    mesh = " x ".join(f"{a}={s}" for a, s in self.mesh.items())
    lines = [f"memory plan: {self.model} ({self.num_params / 1e9:.2f}B parameters) on "
             f"{math.prod(self.mesh.values())} devices ({mesh})", "",
             f"| {'part':<36} | {'GiB / device':>12} | how |",
             f"|{'-' * 38}|{'-' * 14}|-----|"]
    for p in self.parts:
      lines.append(f"| {p.name:<36} | {p.bytes_per_device / GiB:>12.3f} | {p.how} |")
    lines.append(f"| {'resident (weights + training state)':<36} | {self.resident / GiB:>12.3f} "
                 "| sum of the first four |")
    if any(p.name in TEMPORARY for p in self.parts):
      lines.append(f"| {'peak estimate':<36} | {self.peak / GiB:>12.3f} | resident + larger "
                   "step |")
    if self.device_memory_gib:
      verdict = "fits" if self.peak <= self.device_memory_gib * GiB else "DOES NOT FIT"
      lines += ["", f"{verdict} in {self.device_memory_gib:g} GiB per device "
                f"({self.peak / (self.device_memory_gib * GiB):.0%} of it)"]
    if self.compile_s is not None:
      lines.append(f"(rollout and update compiled for the mesh in {self.compile_s:.1f} s)")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.model, "num_params": self.num_params, "mesh": self.mesh,
            "parts": {p.name: p.bytes_per_device for p in self.parts},
            "resident_bytes": self.resident, "peak_bytes": self.peak,
            "device_memory_gib": self.device_memory_gib, "compile_s": self.compile_s}


BASE, TRAINABLE, REFERENCE, OPTIMIZER = ("frozen base weights", "adapters + value head",
                                         "KL reference adapters", "optimizer state")
KV_CACHE, ROLLOUT, UPDATE = ("KV cache (inside rollout)", "rollout temporaries (compiled)",
                             "update temporaries (compiled)")
RESIDENT = (BASE, TRAINABLE, REFERENCE, OPTIMIZER)
TEMPORARY = (ROLLOUT, UPDATE)


def device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (abstract or concrete) split as `shardings` say."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def abstract_policy(model_config: LlamaConfig, config: TrainConfig):
  """(graphdef, trainable, base) of the run's policy, as shapes only."""
  dtype = _DTYPES[config.model.dtype]

  def build():
    # The plan is for an accelerator: its kernels, whatever the planning machine is.
    llama = model_lib.Llama(model_config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
                            remat_policy=model_lib.REMAT_POLICIES[config.remat],
                            kernels=kernels_lib.PLAIN)
    return policy_lib.make_policy(llama, config.lora, config.value_dropout, config.seed,
                                  critic_lora=config.critic_lora)
  return policy_lib.split(nnx.eval_shape(build))


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def plan(config: TrainConfig, model_config: LlamaConfig, mesh: sharding_lib.LogicalMesh,
         prompt_len: int = 256, compile_steps: bool = True, model_name: str | None = None,
         device_memory_gib: float | None = None) -> Plan:
  """The per-device memory of `config`'s PPO run of `model_config` on `mesh`.

  `prompt_len` is the padded prompt length to plan for (GLUE prompts in the paper's format are
  mostly under 256 tokens with the LLaMA-2 tokenizer). Without `compile_steps` only the exact
  parts are given (seconds instead of a compile).
  """
  sharding_lib.check_model(mesh, model_config)
  graphdef, trainable, base = abstract_policy(model_config, config)
  # The trainer's steps (`steps.build`), jitted but compiled only below, on abstract shapes.
  steps = ppo_steps.build(graphdef, base, trainable, config, mesh,
                          tuple(model_config.eos_token_ids), 0)
  sh = steps.shardings
  opt_state = jax.eval_shape(steps.tx.init, trainable)
  parts = [Part(BASE, device_bytes(base, sh.base), f"{config.model.dtype}, split by the rules"),
           Part(TRAINABLE, device_bytes(trainable, sh.trainable), "float32"),
           Part(REFERENCE, device_bytes(trainable, sh.trainable), "float32 copy of the start"),
           Part(OPTIMIZER, device_bytes(opt_state, sh.state.opt_state), config.optimizer.name)]

  samples = config.rollout.batch_size * config.ppo.group_size
  new = config.rollout.max_new_tokens
  cache_dtype = _DTYPES[config.model.dtype]
  cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(model_config, samples, prompt_len + new,
                                                         cache_dtype))
  # The cache is split like the batch, and over the tensor axis by KV heads.
  cache_sh = [mesh.sharding(axes) for axes in model_lib.KVCache.AXES]
  parts.append(Part(KV_CACHE, device_bytes(cache, cache_sh),
                    f"{samples} samples x {prompt_len}+{new} tokens"))

  compile_s = None
  if compile_steps:
    start = time.perf_counter()
    rows2, rep = sh.rows2, sh.replicated
    prompt = jax.ShapeDtypeStruct((samples, prompt_len), jnp.int32, sharding=rows2)
    key = jax.eval_shape(lambda: jax.random.key(0))
    abstract_base, abstract_trainable = _abstract(base, sh.base), _abstract(trainable, sh.trainable)
    args = (abstract_base, abstract_trainable, prompts_lib.Prompts(prompt, prompt),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    rollout = steps.rollout.lower(*args).compile().memory_analysis()
    mb = config.ppo.minibatch_size
    tokens, mask, *rest = [jax.ShapeDtypeStruct(shape, dtype, sharding=rows2)
                           for shape, dtype in _batch_shapes(mb, prompt_len, new)]
    batch = ppo_lib.Batch(prompts_lib.Prompts(tokens, mask), *rest)
    state = ppo_lib.PPOState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        trainable=abstract_trainable,
        opt_state=_abstract(opt_state, sh.state.opt_state),
        kl_coef=jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
    update = steps.update.lower(state, abstract_base, batch,
                                jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
                                ).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    parts += [Part(ROLLOUT, _temporaries(rollout), f"{samples} samples, XLA CPU estimate"),
              Part(UPDATE, _temporaries(update), f"minibatch {mb} / "
                   f"{config.ppo.gradient_accumulation_steps} micro, remat={config.remat}, "
                   "XLA CPU estimate")]
  return Plan(model_name or "model", model_config.num_params, dict(mesh.jax_mesh.shape), parts,
              device_memory_gib, compile_s)


def _batch_shapes(rows: int, prompt_len: int, new: int):
  t = prompt_len + new
  return [((rows, t), jnp.int32), ((rows, t), jnp.int32), ((rows, new), jnp.int32),
          ((rows, new), jnp.bool_)] + [((rows, new), jnp.float32)] * 5


def _temporaries(analysis) -> int:
  # Temporaries and outputs that do not alias a (donated) input: what the step adds on top of
  # the arrays it was given.
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes)


def plan_model_config(spec: str | None, config: TrainConfig) -> tuple[LlamaConfig, str]:
  """(LlamaConfig, name) from --model-config, a preset matching model.name, or its config."""
  spec = spec or llama_config.HUB_PRESETS.get(config.model.name)
  if spec is None:
    return pretrained.resolve(config.model.name, config.model.gguf_file).config, config.model.name
  if spec in llama_config.MODEL_PRESETS:
    return getattr(LlamaConfig, spec)(), spec
  path = pathlib.Path(spec)
  if path.is_file():
    return LlamaConfig.from_hf(json.loads(path.read_text()), str(path)), str(path)
  raise ValueError(f"--model-config {spec!r} is neither a preset "
                   f"({', '.join(llama_config.MODEL_PRESETS)}) nor a config.json file")


def plan_from_config(config: TrainConfig, model_config_spec: str | None = None,
                     devices: int | None = None, prompt_len: int = 256,
                     compile_steps: bool = True, device_memory_gib: float | None = None,
                     progress: Callable[[str], None] | None = None) -> Plan:
  """`plan` of `config`'s run for the model `plan_model_config` finds, on `devices` fake CPU
  devices (default: the product of the config's mesh sizes). JAX reads the device count when
  it starts its backend: call this before anything in the process has used a device.
  `progress(message)`, if given, is told what is planned."""
  sizes = config.mesh.axis_sizes.values()
  devices = devices or (math.prod(sizes) if -1 not in sizes else None)
  if devices is None:
    raise ValueError("the config's mesh has an axis of -1; say how many devices to plan for "
                     "with --devices")
  config.mesh.shape(devices)                       # a mismatch is an error before any compile
  model_config, name = plan_model_config(model_config_spec, config)
  # Fake CPU devices stand in for the accelerators; JAX reads this when it starts its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  if jax.device_count() != devices:
    raise ValueError(f"JAX already started with {jax.device_count()} devices; run plan in a "
                     "fresh process")
  mesh = sharding_lib.LogicalMesh.create(config.mesh)
  if progress is not None:
    progress(f"planning {name} on {devices} devices"
             + (" (compiling rollout and update: about a minute)" if compile_steps else ""))
  return plan(config, model_config, mesh, prompt_len, compile_steps=compile_steps,
              model_name=name, device_memory_gib=device_memory_gib)
