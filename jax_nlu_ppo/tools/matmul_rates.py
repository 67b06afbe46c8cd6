"""Matrix-product rates: the benchmark's ceiling, and which bfloat16 product this CPU runs
fastest (measured once per process).

XLA's CPU backend picks different kernels for bfloat16 x bfloat16 with a float32 result and
with a bfloat16 one, and which is faster depends on the processor: on a 2-core AMD EPYC (Zen 4)
the float32-summed product ran at 380-435 GFLOP/s against 155-180 for a bfloat16 result; on a
2-core Intel Xeon (family 6, model 207, no AMX exposed) at 170 against 265, with float32 itself
at 290-310 (jaxlib 0.10.2, a prefill's MLP shape). No CPU flag tells the two apart, so
`model.project` asks `cpu_rates` instead: a few products of that shape, timed.
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
    """Whether bfloat16 products should ask for float32 results (`model.einsum_f32`)."""
    return self.bfloat16_float32_sums > self.bfloat16

  @property
  def best_bfloat16(self) -> float:
    return max(self.bfloat16, self.bfloat16_float32_sums)


def gflops(product: Callable[[jax.Array, jax.Array], jax.Array], a: jax.Array, b: jax.Array,
           repeats: int = 5) -> float:
  """GFLOP/s of jitted `product(a, b)` for (m, k) x (k, n) operands: the best of `repeats` after
  a warm-up call. The best rather than the median: on a shared machine a neighbour's burst
  during one call would otherwise lower the rate."""
  product = jax.jit(product)
  jax.block_until_ready(product(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


@functools.cache
def cpu_rates() -> ProductRates:
  """This process's CPU rates for `SHAPE` (about 0.3 s, once). Runs eagerly when called while
  a program is being traced."""
  m, k, n = SHAPE
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    rates = ProductRates(
        float32=gflops(jnp.dot, a, b), bfloat16=gflops(jnp.dot, a16, b16),
        bfloat16_float32_sums=gflops(
            functools.partial(jnp.dot, preferred_element_type=jnp.float32), a16, b16))
  log.info("bfloat16 products on this CPU: %.0f GFLOP/s with float32 sums, %.0f with bfloat16 "
           "results (float32: %.0f); the model uses %s", rates.bfloat16_float32_sums,
           rates.bfloat16, rates.float32,
           "float32 sums" if rates.sums_in_float32 else "bfloat16 results")
  return rates
