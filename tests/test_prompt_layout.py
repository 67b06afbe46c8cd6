"""Prompt layouts on the host: buckets, the shared start, sorting within blocks, the skip of
the shorter halves and the minibatches that keep it. (That a layout changes no model output is
tested in test_ppo_core and, on meshes, in test_sharding.)"""
import numpy as np
import pytest

from jax_nlu_ppo.model import prompts as prompt_layout
from jax_nlu_ppo.model.prompts import PromptLayout

PAD = 0


@pytest.mark.parametrize("n, bucket", [(1, 16), (17, 24), (25, 32), (33, 48), (80, 96),
                                       (97, 128), (129, 192), (200, 256)])
def test_prompt_buckets(n, bucket):
  assert prompt_layout.bucket_length(n) == bucket


def test_shared_prefix_length_and_layout():
  ids = [[7, 8, 9, 4, 5], [7, 8, 9, 6], [7, 8, 9, 4]]
  assert prompt_layout.shared_prefix_length(ids, multiple=1) == 3
  assert prompt_layout.shared_prefix_length(ids, multiple=2) == 2
  assert prompt_layout.shared_prefix_length(ids) == 0           # a multiple of 8
  # Every prompt keeps a token after the prefix, even one that is all prefix.
  assert prompt_layout.shared_prefix_length([[7, 8], [7, 8, 9]], multiple=1) == 1
  ids_bt, mask_bt = prompt_layout.pad_left(ids, PAD, shared_prefix=2)
  assert ids_bt.shape == (3, 2 + 16)
  np.testing.assert_array_equal(ids_bt[:, :2], [[7, 8]] * 3)
  np.testing.assert_array_equal(ids_bt[1, -2:], [9, 6])
  np.testing.assert_array_equal(mask_bt.sum(1), [5, 4, 4])
  np.testing.assert_array_equal(mask_bt[1, :2], [1, 1])
  assert not mask_bt[1, 2:-2].any() and (ids_bt[1, 2:-2] == PAD).all()
  with pytest.raises(ValueError, match="do not all share their first 4 tokens"):
    prompt_layout.pad_left(ids, PAD, shared_prefix=4)


def test_rows_sort_within_their_blocks():
  rng = np.random.default_rng(0)
  lengths = [int(x) for x in rng.integers(1, 6, 24)]     # many ties
  for blocks in (1, 2, 3, 4):
    order = prompt_layout.sorted_within_blocks(lengths, blocks)
    n = len(lengths) // blocks
    expected = np.concatenate([start + np.argsort(lengths[start:start + n], kind="stable")
                               for start in range(0, len(lengths), n)])
    np.testing.assert_array_equal(order, expected)
  # Blocks that do not divide the rows: the order is kept.
  assert prompt_layout.sorted_within_blocks(lengths[:23], 2) == list(range(23))


def test_the_shorter_half_of_each_block_skips_padding_it_has():
  shared = 8
  rests = [3, 30, 10, 40, 5, 17, 20, 2]                  # tokens after the shared start
  ids = [[1] * shared + [5] * r for r in rests]
  for blocks in (1, 2, 4):
    order = prompt_layout.sorted_within_blocks([len(x) for x in ids], blocks)
    rows = [ids[i] for i in order]
    ids_bt, mask_bt = prompt_layout.pad_left(rows, PAD, shared_prefix=shared)
    assert ids_bt.shape[1] == shared + 48                 # the longest rest, 40, in bucket 48
    skip = prompt_layout.short_half_skip([len(x) for x in rows], blocks, shared,
                                         ids_bt.shape[1])
    n = len(rows) // blocks
    short = [start + i for start in range(0, len(rows), n) for i in range(n // 2)]
    # Every block's shorter half has 10 tokens or fewer after the shared start: it skips the
    # first half of the 48 columns, all padding in those rows.
    assert max(rests[order[row]] for row in short) <= 10
    assert skip == 24
    assert not mask_bt[short, shared:shared + skip].any()
  # A shorter half that does not fit in half the columns skips nothing.
  lengths = [shared + r for r in (25, 30, 35, 40)]
  assert prompt_layout.short_half_skip(lengths, 1, shared, shared + 48) == 0
  assert prompt_layout.short_half_skip(lengths, 2, shared, shared + 48) == 0
  lengths = [shared + r for r in (24, 40, 3, 48)]
  assert prompt_layout.short_half_skip(lengths, 2, shared, shared + 48) == 24
  assert prompt_layout.short_half_skip(lengths, 1, shared, shared + 48) == 0   # 40 > 24
  assert prompt_layout.short_half_skip([len(x) for x in ids[:6]], 2, shared, 56) == 0  # odd


def test_lay_out_orders_pads_and_describes_the_rows():
  prefix = list(range(10, 19))                           # 9 shared tokens: 8 run once
  ids = [prefix + [3] * r for r in (25, 2, 4, 30)]
  order, prompts = prompt_layout.lay_out(ids, PAD, sort=True)
  assert order == [1, 2, 0, 3]
  assert prompts.layout == PromptLayout(shared=8, skip=32 - 16, blocks=1)
  np.testing.assert_array_equal(prompts.mask_bt.sum(1), [len(ids[i]) for i in order])
  plain = prompt_layout.lay_out(ids, PAD, share=False, sort=False)[1].layout
  assert plain == PromptLayout() and plain.whole
  assert PromptLayout(8, 16, 2).without_shared() == PromptLayout(0, 16, 2)
  assert PromptLayout(0, 16, 2).splits(8) and not PromptLayout(0, 16, 2).splits(6)


@pytest.mark.parametrize("rows,minibatch,blocks,micro", [(16, 8, 1, 1), (16, 4, 1, 2),
                                                         (32, 16, 2, 2), (24, 8, 2, 1)])
def test_minibatches_keep_the_batch_layout(rows, minibatch, blocks, micro):
  layout = PromptLayout(8, 16, blocks)
  picks, picked_layout = prompt_layout.minibatches(np.random.default_rng(0), rows, minibatch,
                                                   layout, micro)
  assert picked_layout == layout
  # Every row once per epoch, in minibatches of the asked size.
  assert sorted(np.concatenate(picks).tolist()) == list(range(rows))
  assert all(len(p) == minibatch for p in picks)
  n = rows // blocks
  is_short = (np.arange(rows) % n) < n // 2               # the batch's shorter halves
  for p in picks:
    # Each of the minibatch's blocks (blocks per micro-batch) is [short | long].
    for unit in np.asarray(p).reshape(micro * blocks, -1):
      half = len(unit) // 2
      assert is_short[unit[:half]].all() and not is_short[unit[half:]].any()
  # Two epochs differ (random), and in the shorter rows' placement too.
  again, _ = prompt_layout.minibatches(np.random.default_rng(1), rows, minibatch, layout, micro)
  assert any(not np.array_equal(a, b) for a, b in zip(picks, again))


def test_minibatches_without_a_skip_are_plain_random_rows():
  # The same draws as before layouts existed: one permutation, cut in order.
  picks, layout = prompt_layout.minibatches(np.random.default_rng(5), 12, 4, PromptLayout(8))
  expected = np.random.default_rng(5).permutation(12)
  np.testing.assert_array_equal(np.concatenate(picks), expected)
  assert layout == PromptLayout(8)
  # A skip that the minibatch cannot keep (4 rows in 2 micro-batches x 2 blocks of halves).
  picks, layout = prompt_layout.minibatches(np.random.default_rng(5), 16, 4,
                                            PromptLayout(8, 16, 2), 2)
  assert layout == PromptLayout(8, 0, 2)
  np.testing.assert_array_equal(np.concatenate(picks), np.random.default_rng(5).permutation(16))


def test_length_batches_sort_and_keep_to_the_token_budget():
  lengths = [5, 300, 40, 7, 290, 60, 8, 9, 500, 35]
  batches = prompt_layout.length_batches(lengths, rows=4, max_tokens=1024, new_tokens=16)
  order = np.concatenate([indices for indices, _ in batches])
  assert sorted(order.tolist()) == list(range(len(lengths)))      # every index once
  assert [lengths[i] for i in order] == sorted(lengths)
  for indices, rows in batches:
    assert len(indices) <= rows <= 4
    longest = max(lengths[i] for i in indices)
    # Within budget, or already down to a single row.
    assert rows * (prompt_layout.bucket_length(longest) + 16) <= 1024 or rows == 1
  # 5-9 | 35, 40 (4 rows to 290 would be 4 x 400 tokens) | 60, 290 | 300 | 500
  assert [rows for _, rows in batches] == [4, 2, 2, 1, 1] and batches[-1][0].tolist() == [8]
  # No budget: plain sorted batches of `rows`; on a mesh, rows stay a multiple of its ways.
  assert [rows for _, rows in prompt_layout.length_batches(lengths, 4)] == [4, 4, 4]
  assert [rows for _, rows in prompt_layout.length_batches(lengths, 8, 1024, 16, 2)] == [4, 2, 2, 2]


def test_generation_sorted_by_length_answers_in_the_input_order():
  from tests import checkpoint_run
  lm = checkpoint_run.tiny_lm()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, lm.config.vocab_size, n).tolist() for n in (5, 70, 9, 33, 6, 70, 12)]
  alone = [lm.generate_rendered([p], max_new_tokens=6)[0] for p in prompts]
  shapes = []
  generate_ids = lm.generate_ids
  lm.generate_ids = lambda ids, *a, **k: shapes.append(np.shape(ids)) or generate_ids(ids, *a, **k)
  lm.batch_size, lm.batch_tokens = 4, 4 * 40
  done = []
  assert lm.generate_rendered(prompts, max_new_tokens=6,
                              progress=lambda n, total: done.append((n, total))) == alone
  # 5, 6, 9, 12 | 33 | 70, 70 | : the long prompts in batches of 2 and 1 (bucket 96 + 6 > 40)
  assert [rows for rows, _ in shapes] == [4, 1, 1, 1] and done[-1] == (7, 7)
