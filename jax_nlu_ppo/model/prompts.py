"""Prompt batches: how they are padded and laid out so that a forward runs as little padding as
it can (length buckets, the start every prompt shares run once, length-sorted halves), and the
prefill that runs what a layout allows.

Host side: `pad_left` and `lay_out` write the rows and choose their `PromptLayout`. Device side:
`Prompts` carries ids, mask and layout (static) through generation, experience and the update;
`prefill` and `hidden_states` give the outputs of running every row whole, leaving out the
columns the layout lets them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_nlu_ppo.model import decoder

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """Which columns of a left-padded prompt batch a forward may leave out.

  shared: the first `shared` tokens of every row are the same (`pad_left` puts the padding
    after them): they run once, at batch 1.
  skip, blocks: the rows form `blocks` equal blocks of consecutive rows (one per batch shard of
    a mesh); in each, the first half's rows have at least `skip` padding columns after the
    shared start (`sorted_within_blocks` orders them so): that half's pass starts after them.
  The default runs every row whole.
  """
  shared: int = 0
  skip: int = 0
  blocks: int = 1

  @property
  def whole(self) -> bool:
    return not (self.shared or self.skip)

  def splits(self, rows: int) -> bool:
    """Whether a batch of `rows` has the even blocks the skipped half needs."""
    return rows % (2 * self.blocks) == 0

  def without_shared(self) -> PromptLayout:
    # Adapter dropout must draw its own masks per row, which one shared pass cannot.
    return dataclasses.replace(self, shared=0)


@flax.struct.dataclass
class Prompts:
  """Left-padded token rows (prompts, or prompts followed by their responses) and their layout.

  `layout` is static: each layout compiles its own programs, and jit keys on it through the
  pytree's structure.
  """
  ids_bt: Array
  mask_bt: Array
  layout: PromptLayout = flax.struct.field(pytree_node=False, default=PromptLayout())

  def extended(self, ids_br: Array, mask_br: Array) -> Prompts:
    """These rows followed by `ids_br` (a response each), in the same layout."""
    return Prompts(jnp.concatenate([self.ids_bt, ids_br], axis=1),
                   jnp.concatenate([self.mask_bt, mask_br.astype(self.mask_bt.dtype)], axis=1),
                   self.layout)


def bucket_length(n: int, minimum: int = 16) -> int:
  """The next of 16, 24, 32, 48, 64, 96, ... >= n.

  A run compiles a handful of sequence shapes, not one per batch, and padding wastes at most a
  third of the compute (powers of two alone waste up to half).
  """
  power = 1 << max(0, n - 1).bit_length()
  return max(minimum, power * 3 // 4 if n <= power * 3 // 4 else power)


def length_batches(lengths: Sequence[int], rows: int, max_tokens: int | None = None,
                   new_tokens: int = 0, multiple: int = 1) -> list[tuple[np.ndarray, int]]:
  """(indices into `lengths`, the batch's rows), shortest first: batches of at most `rows`
  whose padded size, rows x (`bucket_length` of the longest + `new_tokens`), stays within
  `max_tokens`. Only the last batch can hold fewer indices than its rows.

  Sorting keeps a long prompt from padding a batch of short ones; a batch over the budget halves
  its rows (never below `multiple`, the mesh's data-parallel ways), so few shapes compile.
  """
  order = np.argsort(np.asarray(lengths, np.int64), kind="stable")
  batches, start = [], 0
  while start < len(order):
    take = rows
    while take > multiple and max_tokens is not None:
      longest = lengths[order[min(start + take, len(order)) - 1]]
      if take * (bucket_length(longest) + new_tokens) <= max_tokens:
        break
      take = max(multiple, -(-(take // 2) // multiple) * multiple)
    batches.append((order[start:start + take], take))
    start += take
  return batches


# Shared prompt starts are rounded down to a multiple of this, so that a run meets few
# distinct lengths (each compiles its own programs).
SHARED_PREFIX_MULTIPLE = 8


def shared_prefix_length(ids: Sequence[Sequence[int]],
                         multiple: int = SHARED_PREFIX_MULTIPLE) -> int:
  """How many leading tokens all prompts share (a task's instructions and demonstrations),
  rounded down to a multiple of `multiple`; every prompt keeps at least one token after it."""
  first, limit = ids[0], min(len(x) for x in ids) - 1
  n = 0
  while n < limit and all(x[n] == first[n] for x in ids):
    n += 1
  return n // multiple * multiple


def padded_length(ids: Sequence[Sequence[int]], shared_prefix: int = 0) -> int:
  """The bucketed length `pad_left` gives these prompts: the shared prefix, then the bucket of
  the longest remainder."""
  return shared_prefix + bucket_length(max(len(x) for x in ids) - shared_prefix)


def pad_left(ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
             shared_prefix: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Rendered prompts as left-padded (ids, mask) of `length` (default `padded_length`).

  With `shared_prefix` p, the padding goes after the first p tokens, which every prompt must
  share: [prefix | padding | rest]. Positions and attention come from the mask, so the model
  reads each row as if left-padded, and the prefix can run once for all rows
  (`model.prefill`).
  """
  longest = max(len(x) for x in ids)
  length = length or padded_length(ids, shared_prefix)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the {length} allowed")
  p = shared_prefix
  if p and any(list(x[:p]) != list(ids[0][:p]) or len(x) <= p for x in ids):
    raise ValueError(f"shared_prefix={p}: the prompts do not all share their first {p} tokens "
                     "and have more after them (see shared_prefix_length)")
  ids_bt = np.full((len(ids), length), pad_id, np.int32)
  mask_bt = np.zeros((len(ids), length), np.int32)
  for row, x in enumerate(ids):
    ids_bt[row, :p], mask_bt[row, :p] = x[:p], 1
    ids_bt[row, length - len(x) + p:] = x[p:]
    mask_bt[row, length - len(x) + p:] = 1
  return ids_bt, mask_bt


def sorted_within_blocks(lengths: Sequence[int], blocks: int) -> list[int]:
  """A row order that sorts each of `blocks` equal blocks of consecutive rows by length,
  shortest first (ties keep their order, so repeated rows stay together). Rows stay in their
  block: on a mesh a block is one batch shard's rows, and sorting moves none between devices.
  Rows that do not split into equal blocks keep their order."""
  n = len(lengths) // blocks
  if n * blocks != len(lengths):
    return list(range(len(lengths)))
  return [start + i for start in range(0, len(lengths), n)
          for i in sorted(range(n), key=lambda i: lengths[start + i])]


def short_half_skip(lengths: Sequence[int], blocks: int, shared: int, length: int) -> int:
  """`PromptLayout.skip` for rows of `lengths` padded to `length` and sorted by
  `sorted_within_blocks`: half the columns after the shared start when every row of each
  block's first half fits in the other half, else 0. Two values per prompt length at most, so
  a run compiles few programs. 0 too when the blocks do not halve evenly."""
  if not PromptLayout(blocks=blocks).splits(len(lengths)):
    return 0
  n = len(lengths) // blocks
  short = max(lengths[start + i] for start in range(0, len(lengths), n) for i in range(n // 2))
  half = (length - shared) // 2
  return half if short - shared <= length - shared - half else 0


def lay_out(ids: Sequence[Sequence[int]], pad_id: int, blocks: int = 1, *, share: bool = True,
            sort: bool = False) -> tuple[list[int], Prompts]:
  """Prompts padded for the least work on one host: (the order of `ids` the rows are in, the
  padded rows with their layout, as host arrays). `share`: find the shared start; `sort`: sort
  each of `blocks` blocks by length, and let the shorter halves skip half the columns when they
  fit there."""
  shared = shared_prefix_length(ids) if share else 0
  order = (sorted_within_blocks([len(x) for x in ids], blocks) if sort
           else list(range(len(ids))))
  ids = [ids[i] for i in order]
  ids_bt, mask_bt = pad_left(ids, pad_id, shared_prefix=shared)
  skip = (short_half_skip([len(x) for x in ids], blocks, shared, ids_bt.shape[1]) if sort
          else 0)
  return order, Prompts(ids_bt, mask_bt, PromptLayout(shared, skip, blocks))


def minibatches(rng: np.random.Generator, rows: int, minibatch: int, layout: PromptLayout,
                micro_batches: int = 1) -> tuple[list[np.ndarray], PromptLayout]:
  """One epoch of random minibatches of a batch laid out by `layout`: (each minibatch's rows,
  the layout they have). Every row is used once.

  With a skip, the batch's rows are first-half (short) or second-half (long) rows of their
  block. Each minibatch then takes half its rows from the short ones and half from the long
  ones, at random, laid out as [short | long] in each of its blocks (the layout's blocks in
  each of `micro_batches` micro-batches), so that its forward skips what the batch's did.
  Otherwise (or when the sizes do not divide so) the minibatches are plain random rows, with the
  skip dropped from their layout.
  """
  half, units = minibatch // 2, micro_batches * layout.blocks
  if not layout.skip or rows % minibatch or minibatch % (2 * units):
    order = rng.permutation(rows)
    return ([order[i:i + minibatch] for i in range(0, rows, minibatch)],
            dataclasses.replace(layout, skip=0))
  halves = np.arange(rows).reshape(layout.blocks, 2, rows // (2 * layout.blocks))
  short, long = (rng.permutation(halves[:, i].ravel()) for i in (0, 1))
  return ([np.concatenate([part[i:i + half].reshape(units, -1) for part in (short, long)],
                          axis=1).ravel() for i in range(0, rows // 2, half)],
          layout)


# ------------------------------------------------------------------------------------------------
# Running what a layout allows


def prefill(model: decoder.Llama, prompts: Prompts, cache_len: int, *, cache_dtype=None,
            dropout_key: Array | None = None) -> tuple[Array, decoder.KVCache]:
  """Runs `prompts` into a fresh cache of `cache_len` slots (slots after the batch's are left
  for later tokens, which may attend to them).

  A shared start of p tokens runs once, at batch 1, and its keys and values are copied to every
  row. With `layout.skip`, the first half of each block of rows starts `skip` columns after it,
  in a pass of its own (those columns are padding there; their hidden states come back as
  zeros). The outputs are those of running every row whole, since positions and masks come
  from the mask either way.

  Returns (hidden states of the tokens after the shared start, the cache).
  """
  tokens_bt, mask_bt, layout = prompts.ids_bt, prompts.mask_bt, prompts.layout
  b, t = tokens_bt.shape
  p = layout.shared
  dtype = cache_dtype or model.dtype
  key_valid_bs = decoder.cache_slots_valid(mask_bt, cache_len)
  positions_bt = decoder.positions_from_mask(mask_bt)
  if p:
    if dropout_key is not None:
      # One prefix pass would give every row the same dropout masks there.
      raise ValueError("a shared prefix cannot be used with dropout")
    prefix = decoder.KVCache.zeros(model.config, 1, cache_len, dtype)
    _, prefix = model(tokens_bt[:1, :p], positions_bt[:1, :p],
                      decoder.attention_mask(key_valid_bs[:1], jnp.arange(p)), prefix, 0)

  def run(half, start, key):
    """Every row's (half None) or one half's columns from `start` on, into a cache of its own."""
    n = b if half is None else b // 2
    pick = (lambda x: x) if half is None else (lambda x: _half(x, half, layout.blocks))
    if p:
      cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (x.shape[0], n) + x.shape[2:]), prefix)
    else:
      cache = decoder.KVCache.zeros(model.config, n, cache_len, dtype)
    return model(pick(tokens_bt)[:, start:], pick(positions_bt)[:, start:],
                 decoder.attention_mask(pick(key_valid_bs), jnp.arange(start, t)), cache, start,
                 key)

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


def hidden_states(model: decoder.Llama, prompts: Prompts,
                  dropout_key: Array | None = None) -> Array:
  """Final hidden states of every column after the shared start, without a cache beyond the
  rows' own length (whole rows run the plain forward)."""
  tokens_bt, mask_bt = prompts.ids_bt, prompts.mask_bt
  if not prompts.layout.whole:
    return prefill(model, prompts, tokens_bt.shape[1], dropout_key=dropout_key)[0]
  hidden_btd, _ = model(tokens_bt, decoder.positions_from_mask(mask_bt),
                        decoder.attention_mask(mask_bt, jnp.arange(tokens_bt.shape[1])),
                        dropout_key=dropout_key)
  return hidden_btd


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
