"""The LLaMA decoder in Flax NNX, with a preallocated KV cache for incremental decoding.

One compiled decoder layer: the layers' parameters are stacked on a leading `layers` axis and
the forward pass is a `lax.scan` over them, so compile time does not grow with depth.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`, `layers`), and the residual stream is marked (`batch`, `length`); sharding.py
maps those names to mesh axes, never this file.

Shape suffixes: b batch, t query positions, s key positions (cache slots), d embed, n query
heads, k kv heads, g query heads per kv head, h head dim, f mlp, v vocab, l layers.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax_nlu_ppo.tools import matmul_rates
from jax_nlu_ppo import sharding
from jax_nlu_ppo.model.llama_config import LlamaConfig
from jax_nlu_ppo.model.prompts import PromptLayout

Array = jax.Array
# A large finite negative rather than -inf: fully masked rows (left padding) then give a uniform
# softmax instead of NaN, and their outputs are ignored anyway.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_RESIDUAL = ("batch", "length", None)

# What each decoder layer keeps for the backward pass (`jax.checkpoint` policies): "full"
# recomputes the layer, "dots" keeps its weight matmuls' outputs.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], dtype, names: tuple[str, ...]):
  # Sharding is applied from these names by the caller (abstract init, then placement), so the
  # variable itself is never eagerly sharded.
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


_PLAIN_PRODUCTS = contextvars.ContextVar("plain_products", default=False)


@contextlib.contextmanager
def accelerator_products():
  """Traces `project` as accelerators run it (the plain einsum) on any backend: for programs
  compiled on a CPU to plan an accelerator's memory (`memory_plan`)."""
  token = _PLAIN_PRODUCTS.set(True)
  try:
    yield
  finally:
    _PLAIN_PRODUCTS.reset(token)


def project(eqn: str, x: Array, w: Array) -> Array:
  """A projection's product (an einsum with no batch dimensions), its sums in float32.

  float32 operands and accelerators take the plain einsum: GPU and TPU matrix units sum
  bfloat16 products in float32 inside it and round once, and a float32 result only adds memory
  traffic around it (on an H100, float32 products and the float32 adds after them took the 1B
  preset's experience phase from 47 to 63 ms). On a CPU, bfloat16 products ask for float32
  results (`einsum_f32`) where that runs faster there, which depends on the processor
  (`matmul_rates.cpu_rates`, measured once per process).
  """
  # The dtype first: a float32 model never pays for `cpu_rates`' measurement.
  if (x.dtype != jnp.float32 and jax.default_backend() == "cpu" and not _PLAIN_PRODUCTS.get()
      and matmul_rates.cpu_rates().sums_in_float32):
    return einsum_f32(eqn, x, w)
  return jnp.einsum(eqn, x, w)


def einsum_f32(eqn: str, x: Array, w: Array) -> Array:
  """`jnp.einsum(eqn, x, w)` summed and returned in float32, for operands of one dtype.

  float32 operands take the plain einsum. Narrower ones (bfloat16) keep their dtype as inputs
  and accumulate in float32, in the backward pass too (`_einsum_f32_bwd`). On some CPUs XLA runs
  that at over twice the rate of a bfloat16 result, JAX's default for bfloat16 operands, which
  it widens to float32 (a 2-core EPYC: 430 against 170 GFLOP/s for a prefill's MLP shape; see
  `matmul_rates` for a CPU where it is the other way round). Autodiff alone would transpose
  with the float32 cotangent as one operand: the widened path again.
  For projections only (no batch dimensions): XLA's CPU backend has no kernel for batched
  bfloat16 x bfloat16 -> float32 products, so attention's keep their bfloat16 results.
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


class Einsum(nnx.Module):
  """A projection `y = einsum(eqn, x, kernel) (+ bias)` whose kernel has named axes.

  `adapter` is an optional low-rank residual (`lora.LoraAdapter`) added to the output; the
  kernel itself is never modified, so the frozen base stays shared.
  """

  def __init__(self, eqn: str, shape: tuple[int, ...], names: tuple[str, ...], *, bias_ndim: int,
               use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    self.eqn = eqn
    self.dtype = dtype
    fan_in = 1
    for size in shape[:len(shape) - bias_ndim]:
      fan_in *= size
    init = nnx.initializers.normal(stddev=fan_in ** -0.5)
    self.kernel = _param(rngs, init, shape, param_dtype, names)
    self.bias = (_param(rngs, nnx.initializers.zeros, shape[-bias_ndim:], param_dtype,
                        names[-bias_ndim:]) if use_bias else None)
    self.adapter = nnx.data(None)

  def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
    # Bias and adapter are added in the model's dtype, as peft adds adapters: adding them in
    # float32 alone took the H100's experience phase from 47 to 57 ms (`project`).
    y = project(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    y = y.astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.adapter is not None:
      y = y + self.adapter(x, dropout_key).astype(self.dtype)
    return y


def _keys(key: Array | None, n: int) -> list[Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, the mean taken in float32 (as transformers does)."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope(x_btnh: Array, sin_bth: Array, cos_bth: Array) -> Array:
  """Rotary embedding in the rotate-half layout that Hugging Face LLaMA checkpoints use."""
  x1, x2 = jnp.split(x_btnh, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


# XLA's CPU backend widens a bfloat16 dynamic-slice or dynamic-update-slice to float32 over the
# whole buffer and narrows the result back: a copy of all of it per call instead of a view or an
# in-place write. 16-bit floats moved as uint16 bits avoid it; bits are bits to other backends.

def _narrow_float(x: Array) -> bool:
  return x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _bits(x: Array) -> Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint16)


def update_slice(buffer: Array, update: Array, start: tuple) -> Array:
  """`lax.dynamic_update_slice` that writes 16-bit floats as bits (see above: a decode step
  had converted every layer's cache to float32 and back)."""
  update = update.astype(buffer.dtype)
  if not _narrow_float(buffer):
    return jax.lax.dynamic_update_slice(buffer, update, start)
  return _update_bits(buffer, update, start)


@jax.custom_jvp
def _update_bits(buffer: Array, update: Array, start: tuple) -> Array:
  return jax.lax.bitcast_convert_type(
      jax.lax.dynamic_update_slice(_bits(buffer), _bits(update), start), buffer.dtype)


@_update_bits.defjvp
def _update_bits_jvp(primals, tangents):
  # Linear in the tangents, so reverse mode transposes it (the prefill's shared-start cache
  # carries gradients in the update).
  buffer, update, start = primals
  buffer_dot, update_dot, _ = tangents
  return (_update_bits(buffer, update, start),
          jax.lax.dynamic_update_slice(buffer_dot, update_dot, start))


def _as_bits(x: Array) -> Array:
  """A 16-bit float array as its bits (others as they are), for a scan that nothing
  differentiates to slice (see above: each generation program had copied every stacked weight
  to float32). Where a scan is differentiated, its body's bitcast weights would become
  residuals of the backward pass, a copy of every layer's weights, so only generation does it."""
  return _to_bits(x) if _narrow_float(x) else x


def _from_bits(x: Array, dtype) -> Array:
  return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@jax.custom_jvp
def _to_bits(x: Array) -> Array:
  return _bits(x)


@_to_bits.defjvp
def _to_bits_jvp(primals, tangents):
  raise TypeError("a decoder call with differentiable=False (generation) slices its 16-bit "
                  "weights as bits and cannot be differentiated")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, preallocated to the full sequence length.

  Each is stored as attention's matmuls read it (keys with slots last, values with slots before
  head_dim), so that a decode step does not transpose the whole cache in every layer.
  """
  k_lbkhs: Array
  v_lbksh: Array
  # The fields' logical axis names, for code that places a cache on a mesh.
  AXES = (("layers", "batch", "kv_heads", "head_dim", "length"),
          ("layers", "batch", "kv_heads", "length", "head_dim"))

  @classmethod
  def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
    sizes = {"layers": config.num_layers, "batch": batch, "kv_heads": config.num_kv_heads,
             "head_dim": config.head_dim, "length": length}
    return cls(*(jnp.zeros(tuple(sizes[axis] for axis in axes), dtype) for axes in cls.AXES))

  @classmethod
  def write_starts(cls, slot: Array | int, *, layers: bool = True) -> tuple[tuple, tuple]:
    """Where entries for `slot` onwards go in the keys and in the values: the start indices of
    their `dynamic_update_slice`, over all layers or (`layers=False`) one layer's slice."""
    return tuple(tuple(slot if axis == "length" else 0 for axis in axes[0 if layers else 1:])
                 for axes in cls.AXES)


def _masked_softmax(logits: Array, scale: float, mask: Array) -> Array:
  """Softmax over the last (key) axis, in float32, of the scaled logits where `mask` allows."""
  return jax.nn.softmax(jnp.where(mask, logits.astype(jnp.float32) * scale, _MASK_VALUE),
                        axis=-1)


def _decode_attention(q_bkgh: Array, k_bkhs: Array, v_bksh: Array, mask_bs: Array,
                      scale: float) -> Array:
  """One query position per row: per (row, kv head) a (g x h) by (h x s) product, too small
  for a matmul kernel, so written as multiplies and sums that XLA fuses with reading the cache;
  the result comes out in (b, k, g, h) order, o_proj's input order. The sums run in float32, as
  a matmul would accumulate them."""
  f32 = jnp.float32
  logits_bkgs = jnp.sum(q_bkgh[..., None].astype(f32) * k_bkhs[:, :, None].astype(f32), axis=-2)
  probs_bkgs = _masked_softmax(logits_bkgs, scale, mask_bs[:, None, None])
  out_bkgh = jnp.sum(probs_bkgs[..., None] * v_bksh[:, :, None].astype(f32), axis=-2)
  return out_bkgh.astype(v_bksh.dtype)


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"),
                         bias_ndim=2, use_bias=config.qkv_bias, **kw)
    self.k_proj = Einsum("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"),
                         bias_ndim=2, use_bias=config.qkv_bias, **kw)
    self.v_proj = Einsum("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"),
                         bias_ndim=2, use_bias=config.qkv_bias, **kw)
    self.o_proj = Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"),
                         bias_ndim=1, use_bias=config.o_bias, **kw)
    self.num_kv_heads = k
    self.scale = h ** -0.5

  def __call__(self, x_btd: Array, sin_bth: Array, cos_bth: Array, mask_bts: Array,
               kv: tuple[Array, Array] | None, cache_index: Array | None,
               dropout_key: Array | None = None):
    """Returns the output and, with a cache layer `kv`, this call's keys and values in the
    cache's layout (the caller writes them into the cache)."""
    q_key, k_key, v_key, o_key = _keys(dropout_key, 4)
    q_btnh = rope(self.q_proj(x_btd, q_key), sin_bth, cos_bth)
    k_bkht = rope(self.k_proj(x_btd, k_key), sin_bth, cos_bth).transpose(0, 2, 3, 1)
    v_bkth = self.v_proj(x_btd, v_key).transpose(0, 2, 1, 3)
    if kv is None:
      k_bkhs, v_bksh = k_bkht, v_bkth
    else:
      k_bkht, v_bkth = k_bkht.astype(kv[0].dtype), v_bkth.astype(kv[1].dtype)
      k_start, v_start = KVCache.write_starts(cache_index, layers=False)
      k_bkhs = update_slice(kv[0], k_bkht, k_start)
      v_bksh = update_slice(kv[1], v_bkth, v_start)
    b, t, n, h = q_btnh.shape
    q_btkgh = q_btnh.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    if t == 1:
      out_btnh = _decode_attention(q_btkgh[:, 0], k_bkhs, v_bksh, mask_bts[:, 0], self.scale
                                   ).reshape(b, t, n, h)
    else:
      logits_bkgts = jnp.einsum("btkgh,bkhs->bkgts", q_btkgh, k_bkhs.astype(q_btkgh.dtype))
      probs_bkgts = _masked_softmax(logits_bkgts, self.scale, mask_bts[:, None, None])
      out_btkgh = jnp.einsum("bkgts,bksh->btkgh", probs_bkgts.astype(v_bksh.dtype), v_bksh)
      out_btnh = out_btkgh.reshape(b, t, n, h)
    out_btd = self.o_proj(out_btnh.astype(x_btd.dtype), o_key)
    return out_btd, None if kv is None else (k_bkht, v_bkth)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(bias_ndim=1, use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.gate_proj = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
    self.up_proj = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
    self.down_proj = Einsum("btf,fd->btd", (f, d), ("mlp", "embed"), **kw)

  def __call__(self, x_btd: Array, dropout_key: Array | None = None) -> Array:
    gate_key, up_key, down_key = _keys(dropout_key, 3)
    hidden_btf = jax.nn.silu(self.gate_proj(x_btd, gate_key)) * self.up_proj(x_btd, up_key)
    return self.down_proj(hidden_btf, down_key)


class DecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.self_attn = Attention(config, dtype=dtype, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.mlp = MLP(config, dtype=dtype, **kw)

  def __call__(self, x_btd, sin_bth, cos_bth, mask_bts, kv, cache_index, dropout_key=None):
    attn_key, mlp_key = _keys(dropout_key, 2)
    attn_btd, new_kv = self.self_attn(self.input_layernorm(x_btd), sin_bth, cos_bth, mask_bts,
                                      kv, cache_index, attn_key)
    x_btd = x_btd + attn_btd
    x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd), mlp_key)
    return x_btd, new_kv


class Llama(nnx.Module):
  """The decoder: `__call__` gives final hidden states (and the updated cache); `logits` projects.

  Keeping the two apart lets callers (value head, chunked log-probs) work on hidden states
  without materialising (batch, time, vocab) logits they do not need.
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs, remat_policy: Callable | None = None):
    self.config = config
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.embed_tokens = _param(rngs, nnx.initializers.normal(stddev=1.0),
                               (config.vocab_size, config.hidden_size), param_dtype,
                               ("vocab", "embed"))

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype,
                        rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else _param(
        rngs, nnx.initializers.normal(stddev=config.hidden_size ** -0.5),
        (config.hidden_size, config.vocab_size), param_dtype, ("embed", "vocab"))

  def __call__(self, tokens_bt: Array, positions_bt: Array, mask_bts: Array,
               cache: KVCache | None = None, cache_index: Array | int = 0,
               dropout_key: Array | None = None, differentiable: bool = True):
    """Runs the decoder.

    Args:
      tokens_bt: token ids.
      positions_bt: RoPE position of each token (left padding shifts them per row).
      mask_bts: which key slot each query may attend to (causal and padding already applied).
      cache: when given, keys/values of `tokens_bt` are written at `cache_index` and attention
        runs over all cache slots (`s` = cache length); otherwise over `tokens_bt` alone.
      dropout_key: enables adapter dropout (training); None runs deterministically.
      differentiable: False where nothing differentiates this call (generation): the layer scan
        then slices 16-bit weights and cache as integer bits (`_as_bits`).
    Returns:
      (hidden_btd after the final norm, updated cache or None).
    """
    # The table is gathered over its `embed` split first (as FSDP gathers any weight), so the
    # looked-up rows come out split by batch like the tokens, not by model dimension.
    table_vd = sharding.constrain(self.embed_tokens[...], ("vocab", None))
    x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(self.dtype)
    inv_freq_h = jnp.asarray(self.config.rope_inv_freq())
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq_h[None, None]
    angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)
    sin_bth = jnp.sin(angles_bth).astype(self.dtype)
    cos_bth = jnp.cos(angles_bth).astype(self.dtype)

    graphdef, layer_state = nnx.split(self.layers)
    kv = None if cache is None else (cache.k_lbkhs, cache.v_lbksh)
    scanned = (layer_state, kv)
    dtypes = jax.tree.map(lambda x: x.dtype, scanned)
    if not differentiable:
      scanned = jax.tree.map(_as_bits, scanned)

    def body(x_btd, xs):
      scanned, layer_key = xs
      state, kv = jax.tree.map(_from_bits, scanned, dtypes)
      layer = nnx.merge(graphdef, state)
      # The residual stream stays split over the batch axes between layers (the weights are
      # gathered to it, not it to them): FSDP's pattern.
      x_btd = sharding.constrain(x_btd, _RESIDUAL)
      return layer(x_btd, sin_bth, cos_bth, mask_bts, kv, cache_index, layer_key)

    if self.remat_policy is not None:
      body = jax.checkpoint(body, policy=self.remat_policy)
    layer_keys = (None if dropout_key is None
                  else jax.random.split(dropout_key, self.config.num_layers))
    x_btd, new_kv = jax.lax.scan(body, x_btd, (scanned, layer_keys))
    new_cache = None
    if cache is not None:
      # The layers return only this call's entries; one in-place write per array puts them in
      # the cache, instead of each layer copying its whole cache slice out as a scan output.
      new_cache = KVCache(*(
          update_slice(full, entries, start)
          for full, entries, start in zip(kv, new_kv, KVCache.write_starts(cache_index))))
    return self.norm(sharding.constrain(x_btd, _RESIDUAL)), new_cache

  def logits(self, hidden_btd: Array) -> Array:
    """Logits in the product's dtype (`project`: float32 on CPU, the model's dtype on
    accelerators); callers take them to float32."""
    if self.lm_head is None:
      return project("btd,vd->btv", hidden_btd, self.embed_tokens[...].astype(self.dtype))
    return project("btd,dv->btv", hidden_btd, self.lm_head[...].astype(self.dtype))


# Masks and positions for left-padded batches.

def positions_from_mask(mask_bt: Array) -> Array:
  """RoPE positions that start at 0 on each row's first real token (left padding ignored)."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def cache_slots_valid(mask_bt: Array, cache_len: int) -> Array:
  """Which of `cache_len` slots hold real tokens: the batch's (`mask_bt`), then every slot
  after it (tokens yet to be generated)."""
  b, t = mask_bt.shape
  return jnp.concatenate([mask_bt.astype(bool), jnp.ones((b, cache_len - t), bool)], axis=1)


def attention_mask(key_valid_bs: Array, query_slots_t: Array) -> Array:
  """mask[b, t, s] = key slot s holds a real token of row b and is not after query slot t."""
  key_slots_s = jnp.arange(key_valid_bs.shape[-1])
  causal_ts = key_slots_s[None, :] <= query_slots_t[:, None]
  return key_valid_bs[:, None, :].astype(bool) & causal_ts[None]


def prefill(model: Llama, tokens_bt: Array, mask_bt: Array, cache_len: int, *,
            layout: PromptLayout = PromptLayout(), cache_dtype=None,
            dropout_key: Array | None = None, differentiable: bool = True
            ) -> tuple[Array, KVCache]:
  """Runs a left-padded batch into a fresh cache of `cache_len` slots (slots after the batch's
  are left for later tokens, which may attend to them).

  `layout` says which columns may be left out (`prompt_layout.PromptLayout`). A shared start
  of p tokens runs once, at batch 1, and its keys and values are copied to every row. With
  `skip`, the first half of each block of rows starts `skip` columns after it, in a pass of its
  own (those columns are padding there; their hidden states come back as zeros). The outputs
  are those of running every row whole, since positions and masks come from `mask_bt` either
  way. `differentiable`: as in `Llama.__call__` (False for generation only).

  Returns (hidden states of the tokens after the shared start, the cache).
  """
  b, t = tokens_bt.shape
  p = layout.shared
  dtype = cache_dtype or model.dtype
  key_valid_bs = cache_slots_valid(mask_bt, cache_len)
  positions_bt = positions_from_mask(mask_bt)
  if p:
    if dropout_key is not None:
      # One prefix pass would give every row the same dropout masks there.
      raise ValueError("a shared prefix cannot be used with dropout")
    prefix = KVCache.zeros(model.config, 1, cache_len, dtype)
    _, prefix = model(tokens_bt[:1, :p], positions_bt[:1, :p],
                      attention_mask(key_valid_bs[:1], jnp.arange(p)), prefix, 0,
                      differentiable=differentiable)

  def run(half, start, key):
    """Every row's (half None) or one half's columns from `start` on, into a cache of its own."""
    n = b if half is None else b // 2
    pick = (lambda x: x) if half is None else (lambda x: _half(x, half, layout.blocks))
    if p:
      cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (x.shape[0], n) + x.shape[2:]), prefix)
    else:
      cache = KVCache.zeros(model.config, n, cache_len, dtype)
    return model(pick(tokens_bt)[:, start:], pick(positions_bt)[:, start:],
                 attention_mask(pick(key_valid_bs), jnp.arange(start, t)), cache, start, key,
                 differentiable=differentiable)

  if not layout.skip:
    return run(None, p, dropout_key)
  if not layout.splits(b):
    raise ValueError(f"{b} rows do not split into {layout.blocks} blocks of two equal halves")
  keys = (None, None) if dropout_key is None else [jax.random.fold_in(dropout_key, i)
                                                   for i in (0, 1)]
  short_btd, short_cache = run(0, p + layout.skip, keys[0])
  long_btd, long_cache = run(1, p, keys[1])
  short_btd = jnp.pad(short_btd, ((0, 0), (layout.skip, 0), (0, 0)))
  return (_join_halves(short_btd, long_btd, layout.blocks, 0),
          jax.tree.map(lambda x, y: _join_halves(x, y, layout.blocks, 1), short_cache,
                       long_cache))


def _half(x: Array, which: int, blocks: int, axis: int = 0) -> Array:
  """The first (0) or second (1) half of each of `blocks` blocks along `axis`, concatenated."""
  n = x.shape[axis]
  x = x.reshape(x.shape[:axis] + (blocks, 2, n // (2 * blocks)) + x.shape[axis + 1:])
  return jax.lax.index_in_dim(x, which, axis + 1, keepdims=False).reshape(
      x.shape[:axis] + (n // 2,) + x.shape[axis + 3:])


def _join_halves(first: Array, second: Array, blocks: int, axis: int) -> Array:
  """The inverse of `_half`: each block is its first half, then its second."""
  def split(x):
    return x.reshape(x.shape[:axis] + (blocks, 1, x.shape[axis] // blocks) + x.shape[axis + 1:])
  joined = jnp.concatenate([split(first), split(second)], axis=axis + 1)
  return joined.reshape(first.shape[:axis] + (2 * first.shape[axis],) + first.shape[axis + 1:])


def forward_logits(model: Llama, tokens_bt: Array, mask_bt: Array) -> Array:
  """Full-sequence logits (no cache) for a (possibly left-padded) batch."""
  hidden_btd, _ = model(tokens_bt, positions_from_mask(mask_bt),
                        attention_mask(mask_bt, jnp.arange(tokens_bt.shape[1])))
  return model.logits(hidden_btd)
