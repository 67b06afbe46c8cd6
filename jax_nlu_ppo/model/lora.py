"""LoRA adapters (Hu et al. 2021) on the decoder's projections, as their own parameter pytree.

y = W x + scale * B A dropout(x), with B zero-initialised so a fresh adapter leaves the model
unchanged. scale = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rsLoRA,
Kalajdzievski 2023, the paper's setting). Adapter weights are `nnx.LoRAParam`s, so
`nnx.split(model, nnx.LoRAParam, ...)` separates them from the frozen base, which is never
copied or differentiated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_nlu_ppo.model import decoder as model_lib

Array = jax.Array

BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ALL_TARGETS = tuple(BLOCKS)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ALL_TARGETS
  rslora: bool = False

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
    unknown = sorted(set(self.targets) - set(BLOCKS))
    if unknown or not self.targets:
      raise ValueError(f"lora.targets has unknown modules {unknown}; choose from "
                       f"{', '.join(ALL_TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _input_axes(eqn: str) -> int:
  """How many trailing axes of a projection `x,kernel->y`'s input the kernel contracts.

  The adapter flattens them (and the leading ones) into a matrix, so they must be x's last axes
  in the kernel's order: true of every projection in `model`.
  """
  x, kernel = eqn.split("->")[0].split(",")
  inputs = "".join(c for c in kernel if c in x)
  if not x.endswith(inputs) or not kernel.startswith(inputs):
    raise ValueError(f"LoRA needs a projection whose contracted axes end its input and start "
                     f"its kernel, got {eqn!r}")
  return len(inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(x: Array, a_ir: Array, b_ro: Array, scale: float) -> Array:
  """scale * x A B in A's dtype, x's rows flattened: n rows, i inputs, r rank, o outputs.

  The backward pass is written out so that every transposed operand is a rank-r one. Autodiff
  of the same product transposes the (rows x outputs) gradient to form B's gradient, which
  XLA on CPU materialises, at a cost above the MLP's matmuls in the update's backward pass
  (docs/performance-notes.md).
  It keeps `x` as given, the array the base projection keeps for its own backward pass, rather
  than a reshaped or (for a bfloat16 base) float32 copy of it per adapter.
  """
  return _rows(x, a_ir) @ a_ir @ b_ro * scale


def _rows(x: Array, a_ir: Array) -> Array:
  return x.reshape(-1, a_ir.shape[0]).astype(a_ir.dtype)


def _low_rank_fwd(x, a_ir, b_ro, scale):
  u_nr = _rows(x, a_ir) @ a_ir
  return u_nr @ b_ro * scale, (x, a_ir, b_ro, u_nr)


def _low_rank_bwd(scale, residuals, g_no):
  x, a_ir, b_ro, u_nr = residuals
  gu_nr = g_no @ b_ro.T * scale
  return ((gu_nr @ a_ir.T).reshape(x.shape).astype(x.dtype), (gu_nr.T @ _rows(x, a_ir)).T,
          u_nr.T @ g_no * scale)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


class LoraAdapter(nnx.Module):
  """The low-rank residual of one projection, stacked over layers like the projection itself."""

  def __init__(self, proj: model_lib.Einsum, config: LoraConfig, rngs: nnx.Rngs):
    n_in = _input_axes(proj.eqn)
    kernel = proj.kernel
    layers, *shape = kernel.shape
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    in_shape, out_shape = tuple(shape[:n_in]), tuple(shape[n_in:])
    # PEFT's init: kaiming-uniform A (bound 1/sqrt(fan_in)), zero B.
    bound = 1 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (layers, *in_shape, config.rank), jnp.float32,
                           -bound, bound)
    self.a = nnx.LoRAParam(a, out_sharding=(*names[:1 + n_in], "lora"), eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros((layers, config.rank, *out_shape), jnp.float32),
                           out_sharding=(names[0], "lora", *names[1 + n_in:]),
                           eager_sharding=False)
    self.scale = config.scale
    self.dropout = config.dropout

  def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
    """The float32 residual for input `x` (of any float dtype; `low_rank` widens it)."""
    if dropout_key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(dropout_key, 1 - self.dropout, x.shape)
      x = jnp.where(keep, x.astype(jnp.float32) / (1 - self.dropout), 0)
    a, b = self.a[...], self.b[...]
    lead = x.shape[:x.ndim - (a.ndim - 1)]
    y = low_rank(x, a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1), self.scale)
    return y.reshape(*lead, *b.shape[1:])


def applies_dropout(module: nnx.Module) -> bool:
  """Whether any adapter in `module` drops inputs when given a dropout key."""
  return any(isinstance(m, LoraAdapter) and m.dropout > 0 for _, m in nnx.iter_graph(module))


def add_lora(llama: model_lib.Llama, config: LoraConfig, rngs: nnx.Rngs) -> model_lib.Llama:
  """Attaches adapters to `config.targets` in every layer (in place); returns the model."""
  for _, proj in projections(llama, config.targets):
    proj.adapter = nnx.data(LoraAdapter(proj, config, rngs))
  return llama


def projections(llama: model_lib.Llama, targets=ALL_TARGETS):
  """(name, projection) of each target module; stacked over layers."""
  return [(t, getattr(getattr(llama.layers, BLOCKS[t]), t)) for t in targets]


class AdapterSet(nnx.Module):
  """A second set of adapters on the same base (a separate critic), applied by `swapped`."""

  def __init__(self, llama: model_lib.Llama, config: LoraConfig, rngs: nnx.Rngs):
    for target, proj in projections(llama, config.targets):
      setattr(self, target, nnx.data(LoraAdapter(proj, config, rngs)))


@contextlib.contextmanager
def swapped(llama: model_lib.Llama, adapters: AdapterSet):
  """Runs `llama` with `adapters` in place of its own (and none on other projections).

  For use on a module merged inside a traced function: the swap is undone on exit, so the
  base is shared between the two adapter sets and never copied.
  """
  saved = [(proj, proj.adapter) for _, proj in projections(llama)]
  try:
    for target, proj in projections(llama):
      proj.adapter = nnx.data(getattr(adapters, target, None))
    yield llama
  finally:
    for proj, adapter in saved:
      proj.adapter = nnx.data(adapter)


def folded_kernel(kernel: Array, a: Array, b: Array, scale: float) -> Array:
  """W + scale * A B in float32, in the kernel's layout.

  W is (*lead, *in, *out), A (*lead, *in, r) and B (*lead, r, *out) as `LoraAdapter` stores
  them; `lead` is the stacked `layers` axis, or nothing for one layer's slice (streaming export).
  """
  lead = a.shape[:a.ndim + b.ndim - 2 - kernel.ndim]
  rank = a.shape[-1]
  delta = jnp.matmul(a.reshape(*lead, -1, rank), b.reshape(*lead, rank, -1))
  return kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)


def merge_into_base(llama: model_lib.Llama) -> None:
  """Folds every adapter into its kernel, `W + scale * A B`, and removes it (in place).

  Used for export and to make a trained adapter the frozen base of a new run.
  """
  for _, proj in projections(llama):
    adapter = proj.adapter
    if adapter is None:
      continue
    kernel = proj.kernel[...]
    merged = folded_kernel(kernel, adapter.a[...], adapter.b[...], adapter.scale
                           ).astype(kernel.dtype)
    # A new variable, not an in-place write: the old one may be shared with a frozen base
    # state that other policies (the trainer's, the reference) still read.
    proj.kernel = proj.kernel.replace(merged)
    proj.adapter = nnx.data(None)
