"""How the decoder multiplies, writes its cache and scans its layers, per backend: one setting.

`model.kernels` (resolved once when a model is loaded, and logged):

    plain             einsum products, `dynamic_update_slice` cache writes, `lax.scan` over the
                      stacked layers: the reference decoder, and what accelerators run.
    cpu               for 16-bit models on XLA's CPU backend, which widens a bfloat16
                      dynamic-slice or dynamic-update-slice to float32 over the whole buffer:
                      cache writes, and the layer scan of generation, move 16-bit floats as
                      uint16 bits instead (the same values; bits are bits).
    cpu_float32_sums  as `cpu`, and bfloat16 projections summed and returned in float32
                      (`einsum_f32`), which some CPUs run faster than a bfloat16 result and
                      others slower.
    auto              `plain` on accelerators and for float32 models; on a CPU with a 16-bit
                      model, `cpu` or `cpu_float32_sums`, whichever product `product_rates`
                      measures faster (once per process, when the model loads). Name one
                      explicitly for programs that do not depend on that measurement.

Figures: docs/performance-notes.md.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

Array = jax.Array
CHOICES = ("auto", "plain", "cpu", "cpu_float32_sums")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The decoder's backend paths (static: part of the model's graph, so of every jit key).

  float32_sums: 16-bit projections sum and return float32 (`einsum_f32`).
  bit_views: 16-bit cache writes go through uint16 bits (`write`).
  generation: set by `for_generation`; with `bit_views`, the layer scan also slices its 16-bit
    weights and cache as bits (only where nothing differentiates it: a differentiated scan
    would keep the bitcast weights as residuals, a copy of every layer).
  """
  name: str = "plain"
  float32_sums: bool = False
  bit_views: bool = False
  generation: bool = False

  def project(self, eqn: str, x: Array, w: Array) -> Array:
    """A projection's product (an einsum with no batch dimensions)."""
    if self.float32_sums:
      return einsum_f32(eqn, x, w)
    return jnp.einsum(eqn, x, w)

  def write(self, buffer: Array, update: Array, start: tuple) -> Array:
    """`lax.dynamic_update_slice(buffer, update, start)`, `update` cast to the buffer's dtype."""
    update = update.astype(buffer.dtype)
    if self.bit_views and _narrow_float(buffer):
      return _update_bits(buffer, update, start)
    return jax.lax.dynamic_update_slice(buffer, update, start)

  def scan(self, body: Callable, init, xs):
    """`lax.scan(body, init, xs)` over the stacked layers."""
    if not (self.bit_views and self.generation):
      return jax.lax.scan(body, init, xs)
    dtypes = jax.tree.map(lambda x: x.dtype, xs)
    bits = jax.tree.map(lambda x: _to_bits(x) if _narrow_float(x) else x, xs)
    return jax.lax.scan(lambda carry, x: body(carry, jax.tree.map(_from_bits, x, dtypes)),
                        init, bits)


PLAIN = Kernels()


def resolve(choice: str, dtype) -> Kernels:
  """The `Kernels` of a `model.kernels` choice for a model of `dtype` on this process's backend."""
  if choice not in CHOICES:
    raise ValueError(f"model.kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
  chosen = choice
  if choice == "auto":
    narrow_cpu = jnp.dtype(dtype).itemsize == 2 and jax.default_backend() == "cpu"
    chosen = "plain"
    if narrow_cpu:
      chosen = "cpu_float32_sums" if product_rates().sums_in_float32 else "cpu"
  log.info("model.kernels %s: %s (%s on %s)", choice, chosen, jnp.dtype(dtype).name,
           jax.default_backend())
  if chosen == "plain":
    return PLAIN
  return Kernels(chosen, float32_sums=chosen == "cpu_float32_sums", bit_views=True)

def for_generation(kernels: Kernels) -> Kernels:
  """`kernels` for a decoder call that nothing differentiates (generation)."""
  return dataclasses.replace(kernels, generation=True)


# ------------------------------------------------------------------------------------------------
# Products summed in float32


def einsum_f32(eqn: str, x: Array, w: Array) -> Array:
  """`jnp.einsum(eqn, x, w)` summed and returned in float32, for operands of one dtype.

  float32 operands take the plain einsum. Narrower ones keep their dtype as inputs and
  accumulate in float32, in the backward pass too (`_einsum_f32_bwd`: autodiff alone would
  transpose with the float32 cotangent as one operand, the widened path again). Projections
  only: XLA's CPU backend has no kernel for batched bfloat16 x bfloat16 -> float32 products.
  """
  if x.dtype == jnp.float32 and w.dtype == jnp.float32:
    return jnp.einsum(eqn, x, w)
  return _einsum_f32(eqn, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(eqn: str, x: Array, w: Array) -> Array:
  return jnp.einsum(eqn, x, w, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(eqn, x, w):
  return _einsum_f32(eqn, x, w), (x, w)


def _einsum_f32_bwd(eqn, residuals, g):
  # Each operand's gradient is the einsum of the cotangent with the other operand, which holds
  # for projections: every index of an operand appears in the output or in the other operand.
  x, w = residuals
  inputs, out = eqn.replace(" ", "").split("->")
  x_spec, w_spec = inputs.split(",")
  g = g.astype(x.dtype)
  return (jnp.einsum(f"{out},{w_spec}->{x_spec}", g, w,
                     preferred_element_type=jnp.float32).astype(x.dtype),
          jnp.einsum(f"{x_spec},{out}->{w_spec}", x, g,
                     preferred_element_type=jnp.float32).astype(w.dtype))


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


# ------------------------------------------------------------------------------------------------
# 16-bit floats as bits


def _narrow_float(x: Array) -> bool:
  return x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _bits(x: Array) -> Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _from_bits(x: Array, dtype) -> Array:
  return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@jax.custom_jvp
def _update_bits(buffer: Array, update: Array, start: tuple) -> Array:
  return jax.lax.bitcast_convert_type(
      jax.lax.dynamic_update_slice(_bits(buffer), _bits(update), start), buffer.dtype)


@_update_bits.defjvp
def _update_bits_jvp(primals, tangents):
  # Linear in the tangents, so reverse mode transposes it (a prefill's shared-start cache
  # carries gradients in the update).
  buffer, update, start = primals
  buffer_dot, update_dot, _ = tangents
  return (_update_bits(buffer, update, start),
          jax.lax.dynamic_update_slice(buffer_dot, update_dot, start))


@jax.custom_jvp
def _to_bits(x: Array) -> Array:
  return _bits(x)


@_to_bits.defjvp
def _to_bits_jvp(primals, tangents):
  raise TypeError("a decoder call for generation (kernels.for_generation) slices its 16-bit "
                  "weights as bits and cannot be differentiated")


# ------------------------------------------------------------------------------------------------
# Measured product rates


# A prefill's (and the update's) MLP product at the embedded model's width: where a PPO
# iteration spends most of its time.
SHAPE = (1024, 576, 1536)


@dataclasses.dataclass(frozen=True)
class ProductRates:
  """GFLOP/s of one product shape, by operand and result dtype."""
  float32: float
  bfloat16: float                 # bfloat16 operands, bfloat16 result (JAX's default)
  bfloat16_float32_sums: float    # bfloat16 operands, float32 result

  @property
  def sums_in_float32(self) -> bool:
    """Whether bfloat16 products run faster with float32 results (`einsum_f32`)."""
    return self.bfloat16_float32_sums > self.bfloat16

  @property
  def best_bfloat16(self) -> float:
    return max(self.bfloat16, self.bfloat16_float32_sums)


def gflops(product: Callable[[Array, Array], Array], a: Array, b: Array,
           repeats: int = 5) -> float:
  """GFLOP/s of jitted `product(a, b)` for (m, k) x (k, n) operands: the best of `repeats` after
  a warm-up call (the best, not the median: a neighbour's burst would lower one call)."""
  product = jax.jit(product)
  jax.block_until_ready(product(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


@functools.cache
def product_rates() -> ProductRates:
  """This process's rates for `SHAPE`, timed once per process (its cost: docs/performance-notes.md):
  no CPU flag tells which bfloat16 product a CPU runs faster."""
  m, k, n = SHAPE
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  rates = ProductRates(
      float32=gflops(jnp.dot, a, b), bfloat16=gflops(jnp.dot, a16, b16),
      bfloat16_float32_sums=gflops(
          functools.partial(jnp.dot, preferred_element_type=jnp.float32), a16, b16))
  log.info("bfloat16 products on this %s: %.0f GFLOP/s with float32 sums, %.0f with bfloat16 "
           "results (float32: %.0f)", jax.default_backend(), rates.bfloat16_float32_sums,
           rates.bfloat16, rates.float32)
  return rates
