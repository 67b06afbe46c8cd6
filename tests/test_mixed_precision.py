"""Narrow (bfloat16) numbers where XLA handles them badly (`model.kernels`): `einsum_f32`
(bfloat16 operands, float32 sums, forward and backward), each setting's choice of product, and
cache writes through bit views, against NumPy."""
import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.model import prompts as prompts_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.model import pretrained

# (equation, x shape, w shape): the model's projections and the tied vocabulary projection.
# The cpu kernels: 16-bit cache writes through uint16 bits.
BITS = kernels_lib.Kernels("cpu", bit_views=True)
EQUATIONS = [
    ("btd,dnh->btnh", (2, 5, 16), (16, 4, 8)),
    ("btnh,nhd->btd", (2, 5, 4, 8), (4, 8, 16)),
    ("btd,df->btf", (3, 1, 16), (16, 24)),
    ("btd,vd->btv", (2, 5, 16), (40, 16)),
]


def _bf16(rng, shape):
  return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


def _einsum64(eqn, *operands):
  return np.einsum(eqn, *(np.asarray(x, np.float64) for x in operands))


@pytest.mark.parametrize("eqn,x_shape,w_shape", EQUATIONS)
def test_bfloat16_products_sum_in_float32(eqn, x_shape, w_shape):
  rng = np.random.default_rng(0)
  x, w = _bf16(rng, x_shape), _bf16(rng, w_shape)
  ours = kernels_lib.einsum_f32(eqn, jnp.asarray(x), jnp.asarray(w))
  assert ours.dtype == jnp.float32
  ref = _einsum64(eqn, x, w)
  scale = np.abs(ref).max()
  # float32 sums of exact products (bfloat16 x bfloat16 fits in float32): float32 rounding.
  assert np.abs(np.asarray(ours) - ref).max() <= 1e-6 * scale
  # A bfloat16 result would be about 100x further off: the check can tell them apart.
  rounded = np.asarray(jnp.einsum(eqn, jnp.asarray(x), jnp.asarray(w)), np.float64)
  assert np.abs(rounded - ref).max() > 1e-4 * scale


@pytest.mark.parametrize("eqn,x_shape,w_shape", EQUATIONS)
def test_gradients_are_the_transposed_products(eqn, x_shape, w_shape):
  """d/dx sum(c * einsum(x, w)) = einsum(c, w) and d/dw = einsum(x, c), c rounded to the
  operands' dtype, each summed in float64 here and rounded once to bfloat16."""
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, x_shape), _bf16(rng, w_shape)
  inputs, out = eqn.split("->")
  x_spec, w_spec = inputs.split(",")
  c = rng.standard_normal(_einsum64(eqn, x, w).shape).astype(np.float32)

  def loss(x, w):
    return jnp.sum(kernels_lib.einsum_f32(eqn, x, w) * c)

  gx, gw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  assert gx.dtype == gw.dtype == jnp.bfloat16
  c16 = c.astype(ml_dtypes.bfloat16)
  for ours, ref in ((gx, _einsum64(f"{out},{w_spec}->{x_spec}", c16, w)),
                    (gw, _einsum64(f"{x_spec},{out}->{w_spec}", x, c16))):
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape
    # One rounding to bfloat16 (8 significant bits) of a float32 sum.
    np.testing.assert_allclose(ours, ref, rtol=2 ** -8, atol=1e-6 * np.abs(ref).max())


def test_backward_multiplies_bfloat16_operands():
  """The point of the custom backward: autodiff alone would multiply the float32 cotangent
  with a bfloat16 operand, which XLA widens to a float32 product at half the speed on CPUs
  with bfloat16 units."""
  x = jnp.ones((4, 16), jnp.bfloat16)
  w = jnp.ones((16, 8), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda x, w: kernels_lib.einsum_f32("td,df->tf", x, w).sum(), argnums=(0, 1)))(x, w)
  dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) == 3                                   # forward, and one per operand
  for e in dots:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2
    assert e.params["preferred_element_type"] == jnp.float32


def test_float32_operands_take_the_plain_einsum():
  x = jnp.ones((4, 16), jnp.float32)
  w = jnp.ones((16, 8), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x, w: kernels_lib.einsum_f32("td,df->tf", x, w))(x, w)
  assert not any("custom" in e.primitive.name for e in _equations(jaxpr.jaxpr))


def _equations(jaxpr):
  """Every equation, including those inside calls and custom-derivative rules."""
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _equations(sub)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_update_slice_writes_and_differentiates_as_dynamic_update_slice(dtype):
  rng = np.random.default_rng(2)
  buffer = jnp.asarray(rng.standard_normal((3, 5, 4)), dtype)
  update = jnp.asarray(rng.standard_normal((3, 2, 4)), dtype)
  start = (0, jnp.int32(2), 0)
  ours = BITS.write(buffer, update, start)
  expected = np.asarray(buffer, np.float32).copy()
  expected[:, 2:4] = np.asarray(update, np.float32)
  assert ours.dtype == dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32), expected)
  c = rng.standard_normal((3, 5, 4)).astype(np.float32)
  loss = lambda b, u: jnp.sum(BITS.write(b, u, start).astype(jnp.float32) * c)
  g_buffer, g_update = jax.grad(loss, argnums=(0, 1))(buffer, update)
  kept = np.ones((3, 5, 4), bool)
  kept[:, 2:4] = False
  np.testing.assert_array_equal(np.asarray(g_buffer, np.float32),
                                np.where(kept, c, 0).astype(dtype).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(g_update, np.float32),
                                c[:, 2:4].astype(dtype).astype(np.float32))


def test_bfloat16_cache_writes_are_not_widened():
  """A bfloat16 write compiles to a write of its slice: no float32 copy of the buffer (what
  XLA's CPU backend makes of a plain bfloat16 dynamic-update-slice)."""
  buffer = jnp.zeros((30, 64, 128), jnp.bfloat16)
  update = jnp.ones((1, 64, 128), jnp.bfloat16)
  text = jax.jit(lambda b, u, i: BITS.write(b, u, (i, 0, 0)), donate_argnums=0
                 ).lower(buffer, update, 3).compile().as_text()
  assert "f32[30,64,128]" not in text


FLOAT32_SUMS_FASTER = kernels_lib.ProductRates(float32=300, bfloat16=170,
                                                 bfloat16_float32_sums=430)  # EPYC-like
BFLOAT16_FASTER = kernels_lib.ProductRates(float32=300, bfloat16=265,
                                            bfloat16_float32_sums=170)      # Xeon-like


@pytest.fixture(params=[FLOAT32_SUMS_FASTER, BFLOAT16_FASTER], ids=["f32_sums", "bf16_results"])
def cpu_rates(request, monkeypatch):
  """What `kernels.product_rates` would measure on one of the two kinds of CPU seen."""
  monkeypatch.setattr(kernels_lib, "product_rates", lambda: request.param)
  return request.param


def _projection_dtypes(kernels, x, w):
  """`kernels.project`'s result dtype on (4, 16) x (16, 8) operands of `x`'s and `w`'s dtypes,
  the result dtypes its traced products ask for, and whether it went through a custom rule."""
  x, w = jnp.ones((4, 16), x), jnp.ones((16, 8), w)
  jaxpr = jax.make_jaxpr(functools.partial(kernels.project, "td,df->tf"))(x, w).jaxpr
  eqns = list(_equations(jaxpr))
  return (jaxpr.outvars[0].aval.dtype,
          [e.params["preferred_element_type"] for e in eqns if e.primitive.name == "dot_general"],
          any("custom" in e.primitive.name for e in eqns))


def test_auto_kernels_take_the_product_the_cpu_runs_faster(cpu_rates):
  sums = jax.default_backend() == "cpu" and cpu_rates.sums_in_float32
  expected = jnp.float32 if sums else jnp.bfloat16
  auto = kernels_lib.resolve("auto", jnp.bfloat16)
  assert _projection_dtypes(auto, jnp.bfloat16, jnp.bfloat16) == (expected, [expected], sums)
  assert auto.bit_views == (jax.default_backend() == "cpu")
  # float32 models: the plain kernels wherever they run.
  assert kernels_lib.resolve("auto", jnp.float32) == kernels_lib.PLAIN
  assert _projection_dtypes(kernels_lib.resolve("cpu_float32_sums", jnp.float32), jnp.float32,
                            jnp.float32) == (jnp.float32, [jnp.float32], False)


def test_named_kernels_trace_their_product_anywhere(monkeypatch):
  monkeypatch.setattr(kernels_lib, "product_rates", lambda: FLOAT32_SUMS_FASTER)
  for name, expected in (("plain", jnp.bfloat16), ("cpu", jnp.bfloat16),
                         ("cpu_float32_sums", jnp.float32)):
    kernels = kernels_lib.resolve(name, jnp.bfloat16)
    assert _projection_dtypes(kernels, jnp.bfloat16, jnp.bfloat16) == (
        expected, [expected], expected == jnp.float32)
  with pytest.raises(ValueError, match="model.kernels must be one of"):
    kernels_lib.resolve("fast", jnp.bfloat16)


def test_rates_choose_the_faster_bfloat16_product():
  assert FLOAT32_SUMS_FASTER.sums_in_float32 and FLOAT32_SUMS_FASTER.best_bfloat16 == 430
  assert not BFLOAT16_FASTER.sums_in_float32 and BFLOAT16_FASTER.best_bfloat16 == 265
  measured = kernels_lib.product_rates.__wrapped__()          # a fresh measurement, not the cache
  assert min(dataclasses.astuple(measured)) > 0


@pytest.mark.parametrize("rates,warns", [(FLOAT32_SUMS_FASTER, False), (BFLOAT16_FASTER, True)])
def test_bfloat16_on_cpu_warns_where_its_products_are_slower(tmp_path, monkeypatch, caplog,
                                                              rates, warns):
  if jax.default_backend() != "cpu":
    pytest.skip("a CPU warning")
  from tests import tiny_hf
  tiny_hf.save_tiny(tmp_path)
  monkeypatch.setattr(kernels_lib, "product_rates", lambda: rates)
  with caplog.at_level("WARNING", logger=pretrained.log.name):
    pretrained.load_pretrained(str(tmp_path), dtype="bfloat16")
  warned = [r for r in caplog.records if "likely to run slower than float32" in r.getMessage()]
  assert bool(warned) is warns
  if warns:
    assert "265 GFLOP/s on this CPU against 300" in warned[0].getMessage()


def test_adapters_on_a_bfloat16_base_get_the_float32_gradients(cpu_rates):
  """The decoder in bfloat16 (with its float32 adapters) against the same weights in float32:
  every adapter's gradient within 10% (4.3% at most here, as bfloat16 activations allow); a wrong
  transposition in `einsum_f32`'s backward pass would be off by its whole size."""
  from tests.test_ppo_core import (CONFIG, LORA, VOCAB, _policy_forward, prompts, random_llama,
                                   randomized)
  graphdef32, params = random_llama(CONFIG)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens_bt, mask_bt = prompts()
  c = jnp.asarray(np.random.default_rng(4).standard_normal((*tokens_bt.shape, VOCAB)),
                  jnp.float32)
  grads = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    graphdef, _ = nnx.split(pretrained.abstract_model(CONFIG, dtype,
                                                      kernels_lib.resolve("auto", dtype)))
    llama = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), params))
    policy_def, trainable, base = policy_lib.split(
        policy_lib.make_policy(llama, LORA, value_dropout=0.0, seed=1))
    trainable = randomized(trainable, 2)
    loss = lambda t: jnp.sum(_policy_forward(policy_def, t, base, tokens_bt, mask_bt)[0] * c)
    grads[dtype] = nnx.to_pure_dict(jax.grad(jax.jit(loss))(trainable))["llama"]
  leaves32, _ = jax.tree_util.tree_flatten_with_path(grads[jnp.float32])
  leaves16 = jax.tree.leaves(grads[jnp.bfloat16])
  assert len(leaves32) == len(leaves16) > 0
  for (path, g32), g16 in zip(leaves32, leaves16):
    assert g16.dtype == jnp.float32
    g32, g16 = np.asarray(g32, np.float64), np.asarray(g16, np.float64)
    rel = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert rel <= 0.1, (jax.tree_util.keystr(path), rel)   # measured: at most 0.043


def test_generation_slices_bfloat16_layers_as_bits():
  """The cpu kernels for generation (`kernels.for_generation`) compute the same, compile to no
  float32 copy of the stacked weights, and refuse to be differentiated."""
  from tests.test_ppo_core import CONFIG, prompts, random_llama
  _, params = random_llama(CONFIG)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens_bt, mask_bt = prompts()
  graphdefs = {generation: nnx.split(pretrained.abstract_model(
      CONFIG, jnp.bfloat16, kernels_lib.for_generation(BITS) if generation else BITS))[0]
      for generation in (False, True)}

  def prefill(params, generation):
    return prompts_lib.prefill(nnx.merge(graphdefs[generation], params),
                               prompts_lib.Prompts(tokens_bt, mask_bt), tokens_bt.shape[1] + 4)

  plain, as_bits = (jax.jit(prefill, static_argnums=1)(params, g) for g in (False, True))
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(as_bits)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  stacked = f"f32[{CONFIG.num_layers},{CONFIG.hidden_size},{CONFIG.intermediate_size}]"
  text = jax.jit(prefill, static_argnums=1).lower(params, True).compile().as_text()
  assert stacked not in text
  with pytest.raises(TypeError, match="for_generation"):
    jax.jvp(lambda p: prefill(p, True)[0], (params,), (params,))
