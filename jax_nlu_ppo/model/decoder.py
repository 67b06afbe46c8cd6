"""The LLaMA decoder in Flax NNX, with a preallocated KV cache for incremental decoding.

One compiled decoder layer: the layers' parameters are stacked on a leading `layers` axis and
the forward pass is a `lax.scan` over them, so compile time does not grow with depth.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`, `layers`), and the residual stream is marked (`batch`, `length`); sharding.py
maps those names to mesh axes, never this file. How products, cache writes and the layer scan
run on a given backend is `kernels.Kernels`, chosen once when the model is built.

Shape suffixes: b batch, t query positions, s key positions (cache slots), d embed, n query
heads, k kv heads, g query heads per kv head, h head dim, f mlp, v vocab, l layers; outside the
decoder, r response positions (`tokens_br`: a generated token per row and step).
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jax_nlu_ppo import sharding
from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig

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


class Einsum(nnx.Module):
  """A projection `y = einsum(eqn, x, kernel) (+ bias)` whose kernel has named axes.

  `adapter` is an optional low-rank residual (`lora.LoraAdapter`) added to the output; the
  kernel itself is never modified, so the frozen base stays shared.
  """

  def __init__(self, eqn: str, shape: tuple[int, ...], names: tuple[str, ...], *, bias_ndim: int,
               use_bias: bool, dtype, param_dtype, kernels: kernels_lib.Kernels, rngs: nnx.Rngs):
    self.eqn = eqn
    self.dtype = dtype
    self.kernels = kernels
    fan_in = 1
    for size in shape[:len(shape) - bias_ndim]:
      fan_in *= size
    init = nnx.initializers.normal(stddev=fan_in ** -0.5)
    self.kernel = _param(rngs, init, shape, param_dtype, names)
    self.bias = (_param(rngs, nnx.initializers.zeros, shape[-bias_ndim:], param_dtype,
                        names[-bias_ndim:]) if use_bias else None)
    self.adapter = nnx.data(None)

  def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
    # Bias and adapter are added in the model's dtype, as peft adds adapters (float32 adds
    # slow accelerators down: docs/performance-notes.md).
    y = self.kernels.project(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, kernels: kernels_lib.Kernels,
               rngs: nnx.Rngs):
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernels=kernels, rngs=rngs)
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
    self.kernels = kernels

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
      k_bkhs = self.kernels.write(kv[0], k_bkht, k_start)
      v_bksh = self.kernels.write(kv[1], v_bkth, v_start)
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

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, kernels: kernels_lib.Kernels,
               rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(bias_ndim=1, use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype,
              kernels=kernels, rngs=rngs)
    self.gate_proj = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
    self.up_proj = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
    self.down_proj = Einsum("btf,fd->btd", (f, d), ("mlp", "embed"), **kw)

  def __call__(self, x_btd: Array, dropout_key: Array | None = None) -> Array:
    gate_key, up_key, down_key = _keys(dropout_key, 3)
    hidden_btf = jax.nn.silu(self.gate_proj(x_btd, gate_key)) * self.up_proj(x_btd, up_key)
    return self.down_proj(hidden_btf, down_key)


class DecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, kernels: kernels_lib.Kernels,
               rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.self_attn = Attention(config, dtype=dtype, kernels=kernels, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.mlp = MLP(config, dtype=dtype, kernels=kernels, **kw)

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
               rngs: nnx.Rngs, remat_policy: Callable | None = None,
               kernels: kernels_lib.Kernels = kernels_lib.PLAIN):
    self.config = config
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.kernels = kernels
    self.embed_tokens = _param(rngs, nnx.initializers.normal(stddev=1.0),
                               (config.vocab_size, config.hidden_size), param_dtype,
                               ("vocab", "embed"))

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, kernels=kernels,
                          rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype,
                        rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else _param(
        rngs, nnx.initializers.normal(stddev=config.hidden_size ** -0.5),
        (config.hidden_size, config.vocab_size), param_dtype, ("embed", "vocab"))

  def __call__(self, tokens_bt: Array, positions_bt: Array, mask_bts: Array,
               cache: KVCache | None = None, cache_index: Array | int = 0,
               dropout_key: Array | None = None):
    """Runs the decoder.

    Args:
      tokens_bt: token ids.
      positions_bt: RoPE position of each token (left padding shifts them per row).
      mask_bts: which key slot each query may attend to (causal and padding already applied).
      cache: when given, keys/values of `tokens_bt` are written at `cache_index` and attention
        runs over all cache slots (`s` = cache length); otherwise over `tokens_bt` alone.
      dropout_key: enables adapter dropout (training); None runs deterministically.
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

    def body(x_btd, xs):
      (state, kv), layer_key = xs
      layer = nnx.merge(graphdef, state)
      # The residual stream stays split over the batch axes between layers (the weights are
      # gathered to it, not it to them): FSDP's pattern.
      x_btd = sharding.constrain(x_btd, _RESIDUAL)
      return layer(x_btd, sin_bth, cos_bth, mask_bts, kv, cache_index, layer_key)

    if self.remat_policy is not None:
      body = jax.checkpoint(body, policy=self.remat_policy)
    layer_keys = (None if dropout_key is None
                  else jax.random.split(dropout_key, self.config.num_layers))
    x_btd, new_kv = self.kernels.scan(body, x_btd, ((layer_state, kv), layer_keys))
    new_cache = None
    if cache is not None:
      # The layers return only this call's entries; one in-place write per array puts them in
      # the cache, instead of each layer copying its whole cache slice out as a scan output.
      new_cache = KVCache(*(
          self.kernels.write(full, entries, start)
          for full, entries, start in zip(kv, new_kv, KVCache.write_starts(cache_index))))
    return self.norm(sharding.constrain(x_btd, _RESIDUAL)), new_cache

  def logits(self, hidden_btd: Array) -> Array:
    """Logits in the product's dtype (the model's, or float32 with `kernels.float32_sums`);
    callers take them to float32."""
    if self.lm_head is None:
      return self.kernels.project("btd,vd->btv", hidden_btd,
                                  self.embed_tokens[...].astype(self.dtype))
    return self.kernels.project("btd,dv->btv", hidden_btd, self.lm_head[...].astype(self.dtype))


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


def forward_logits(model: Llama, tokens_bt: Array, mask_bt: Array) -> Array:
  """Full-sequence logits (no cache) for a (possibly left-padded) batch."""
  hidden_btd, _ = model(tokens_bt, positions_from_mask(mask_bt),
                        attention_mask(mask_bt, jnp.arange(tokens_bt.shape[1])))
  return model.logits(hidden_btd)
