"""The PPO core on tiny random models, each piece against an independent computation.

LoRA against kernels merged in NumPy; the frozen base; KL and the rollout's log-probs and values
against full forwards; the skip guard; the loss against NumPy; GRPO; a `PPOTrainer` run; and a
short hand-driven PPO run that must raise a reward.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_nlu_ppo.model import lora as lora_lib
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.rl import policy as policy_lib
from jax_nlu_ppo.rl import ppo
from jax_nlu_ppo.rl import ppo_math
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompt_layout
from jax_nlu_ppo.model import sampling
from jax_nlu_ppo.model.llama_config import LlamaConfig

VOCAB = 32
CONFIG = LlamaConfig.tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8)
B, P, N = 4, 6, 8                     # rows, prompt length, max new tokens
EOS, PAD, TARGET = 2, 0, 5
# rsLoRA as in the paper; no dropout, so that every forward here is deterministic.
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                           targets=("q_proj", "v_proj", "down_proj"), rslora=True)
SAMPLING = sampling.SamplingConfig(temperature=1.0)
# One optimiser and one config object for every update below, so `_update` compiles once.
TX = ppo.make_optimizer(ppo.OptimizerConfig(learning_rate=1e-2))
GAE = ppo.PPOConfig(ppo_epochs=2, minibatch_size=4,
                    kl=ppo_math.KLControlConfig(kind="fixed", init_coef=0.05))

# W + scale * A B of each projection, written out from the kernels' axis names (l layers,
# r rank): independent of how the library flattens axes in `merge_into_base`.
DELTA_EQNS = {"q_proj": "ldr,lrnh->ldnh", "k_proj": "ldr,lrkh->ldkh", "v_proj": "ldr,lrkh->ldkh",
              "o_proj": "lnhr,lrd->lnhd", "gate_proj": "ldr,lrf->ldf", "up_proj": "ldr,lrf->ldf",
              "down_proj": "lfr,lrd->lfd"}

_rollout = jax.jit(ppo.rollout, static_argnums=0,
                   static_argnames=("max_new_tokens", "sampling", "eos_ids", "pad_id"))
_experience = jax.jit(ppo.experience, static_argnums=0,
                      static_argnames=("temperature", "values", "reuse_rollout"))
_advantages = jax.jit(ppo.advantages, static_argnames="config")
_loss = jax.jit(ppo.loss_fn, static_argnums=1,
                static_argnames=("config", "temperature"))
_update = jax.jit(ppo.update_minibatch, static_argnums=1,
                  static_argnames=("tx", "config", "temperature"))


@functools.partial(jax.jit, static_argnums=0)
def _llama_logits(graphdef, params, tokens_bt, mask_bt):
  return model_lib.forward_logits(nnx.merge(graphdef, params), tokens_bt, mask_bt)


@functools.partial(jax.jit, static_argnums=0)
def _policy_forward(graphdef, trainable, base, tokens_bt, mask_bt):
  """Logits and final hidden states at every position of the adapted decoder."""
  llama = policy_lib.with_trainable(graphdef, base, trainable).llama
  hidden_btd, _ = llama(tokens_bt, model_lib.positions_from_mask(mask_bt),
                        model_lib.attention_mask(mask_bt, jnp.arange(tokens_bt.shape[1])))
  return llama.logits(hidden_btd), hidden_btd


def random_llama(config: LlamaConfig, seed: int = 0):
  """(graphdef, params) of a random decoder, drawn in NumPy (eager NNX init takes seconds)."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: model_lib.Llama(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == "scale":        # norms near 1, perturbed so that a wrong mapping would show
      return jnp.asarray(1 + 0.1 * rng.normal(size=x.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 1.0 if name == "embed_tokens" else 0.2, x.shape),
                       jnp.float32)

  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(draw,
                                                                    nnx.to_pure_dict(params)))
  return graphdef, params


@functools.cache
def _base():
  return random_llama(CONFIG)


def make_policy(lora=LORA):
  """(graphdef, trainable, base) of fresh adapters on a private copy of the tiny decoder."""
  graphdef, params = _base()
  llama = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
  return policy_lib.split(policy_lib.make_policy(llama, lora, value_dropout=0.0, seed=1))


def flat(tree) -> dict[str, np.ndarray]:
  """{'llama/layers/.../b': host array} of an nnx.State."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))
  return {"/".join(str(k.key) for k in path): np.array(x) for path, x in leaves}


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def randomized(trainable, seed: int, scale: float = 0.5):
  """A copy with random LoRA B and value head, as after training: adapters then matter."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if path[-1].key == "b" or path[0].key == "value_head":
      return jnp.asarray(rng.normal(0, scale, x.shape), jnp.float32)
    return x

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(trainable))
  out = jax.tree.map(jnp.copy, trainable)
  nnx.replace_by_pure_dict(out, pure)
  return out


def prompts(batch: int = B, seed: int = 0):
  """Left-padded random prompts; row i has i % 4 padding slots."""
  rng = np.random.default_rng(seed)
  mask_bt = (np.arange(P)[None] >= (np.arange(batch) % 4)[:, None]).astype(np.int32)
  ids_bt = np.where(mask_bt, rng.integers(3, VOCAB, (batch, P)), PAD).astype(np.int32)
  return ids_bt, mask_bt


def rollout(graphdef, trainable, base, prompt_bt, prompt_mask_bt, seed, limit=N, eos_ids=(EOS,)):
  return _rollout(graphdef, base, trainable, prompt_layout.Prompts(prompt_bt, prompt_mask_bt),
                  jax.random.key(seed), jnp.int32(limit), max_new_tokens=N, sampling=SAMPLING,
                  eos_ids=eos_ids, pad_id=PAD)


def joined(prompt_bt, prompt_mask_bt, gen, layout=prompt_layout.PromptLayout()):
  """Prompt + response rows, in the prompts' `layout`."""
  return prompt_layout.Prompts(
      jnp.concatenate([prompt_bt, gen.tokens_br], axis=1),
      jnp.concatenate([prompt_mask_bt, gen.mask_br.astype(jnp.int32)], axis=1), layout)


def target_fraction(gen) -> np.ndarray:
  """Per row: the fraction of response tokens that are TARGET."""
  tokens, mask = np.asarray(gen.tokens_br), np.asarray(gen.mask_br)
  return ((tokens == TARGET) & mask).sum(1).astype(np.float32) / mask.sum(1)


def pipeline_batch(graphdef, trainable, base, reference, prompt_bt, prompt_mask_bt, seed,
                   scores_fn, config=GAE, kl_coef=0.05, limit=N):
  """rollout -> reward -> experience -> advantages, as the trainer chains them."""
  gen = rollout(graphdef, trainable, base, prompt_bt, prompt_mask_bt, seed, limit)
  sequences = joined(prompt_bt, prompt_mask_bt, gen)
  old_logp, old_values, ref_logp = _experience(graphdef, base, trainable, reference, sequences,
                                               gen, temperature=1.0,
                                               values=config.uses_critic)
  scores_b = scores_fn(gen)
  adv, returns, _ = _advantages(scores_b, old_logp, ref_logp, old_values, gen.mask_br,
                                jnp.float32(kl_coef), config=config)
  batch = ppo.Batch(sequences, gen.tokens_br, gen.mask_br, old_logp, ref_logp, old_values,
                    adv, returns)
  return gen, batch, scores_b


def new_state(trainable, step=0):
  return ppo.PPOState(step=jnp.int32(step), trainable=trainable, opt_state=TX.init(trainable),
                      kl_coef=jnp.float32(0.05))


def update(state, graphdef, base, batch, seed, config=GAE):
  return _update(state, graphdef, base, batch, jax.random.key(seed), tx=TX, config=config,
                 temperature=1.0)


def rel_diff(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------------------------
# LoRA algebra
# ----------------------------------------------------------------------------------------------


def assert_same_function(ours, expected):
  """Bit-equal on CPU. On a GPU, XLA autotunes the matmul kernels of each compiled program, so two
  programs of the same function may round differently (an H100 gave 1.2e-6 on logits of ~2)."""
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(ours, expected)
  else:
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [("q_proj",), ("k_proj", "o_proj", "up_proj"),
                                     lora_lib.ALL_TARGETS])
def test_fresh_adapter_leaves_logits_exactly_unchanged(targets):
  prompt_bt, mask_bt = prompts()
  base_logits = np.asarray(_llama_logits(*_base(), prompt_bt, mask_bt))
  graphdef, trainable, base = make_policy(lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                                                              targets=targets))
  ours = np.asarray(_policy_forward(graphdef, trainable, base, prompt_bt, mask_bt)[0])
  assert_same_function(ours, base_logits)
  # Not vacuous: the adapters are on the forward path, so a non-zero B moves the logits.
  moved = _policy_forward(graphdef, randomized(trainable, 0), base, prompt_bt, mask_bt)[0]
  assert rel_diff(moved, base_logits) > 1e-2


def numpy_merged(trainable, targets, scale):
  """The plain decoder's params with every target kernel replaced by W + scale A B (float64)."""
  _, params = _base()
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  adapters = nnx.to_pure_dict(trainable)["llama"]["layers"]
  for target in targets:
    block = lora_lib.BLOCKS[target]
    a = np.asarray(adapters[block][target]["adapter"]["a"], np.float64)
    b = np.asarray(adapters[block][target]["adapter"]["b"], np.float64)
    kernel = pure["layers"][block][target]["kernel"].astype(np.float64)
    pure["layers"][block][target]["kernel"] = (
        kernel + scale * np.einsum(DELTA_EQNS[target], a, b)).astype(np.float32)
  merged = jax.tree.map(jnp.copy, params)
  nnx.replace_by_pure_dict(merged, pure)
  return merged, pure


@pytest.mark.parametrize("targets, rslora", [(lora_lib.ALL_TARGETS, False),
                                             (LORA.targets, True)])
def test_adapted_logits_equal_numpy_merged_kernels(targets, rslora):
  rank, alpha = 4, 8.0
  config = lora_lib.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets,
                               rslora=rslora)
  scale = alpha / np.sqrt(rank) if rslora else alpha / rank
  assert config.scale == pytest.approx(scale)
  graphdef, trainable, base = make_policy(config)
  trainable = randomized(trainable, 1)
  prompt_bt, mask_bt = prompts()
  adapted = np.asarray(_policy_forward(graphdef, trainable, base, prompt_bt, mask_bt)[0])

  llama_def, _ = _base()
  merged, merged_pure = numpy_merged(trainable, targets, scale)
  reference = np.asarray(_llama_logits(llama_def, merged, prompt_bt, mask_bt))
  assert rel_diff(adapted, reference) <= 1e-5
  # The test can tell the two scales apart (rsLoRA's differs by sqrt(r) = 2 here).
  other_scale = alpha / rank if rslora else alpha / np.sqrt(rank)
  wrong = _llama_logits(llama_def, numpy_merged(trainable, targets, other_scale)[0], prompt_bt,
                        mask_bt)
  assert rel_diff(wrong, reference) > 1e-3

  # `merge_into_base` folds the same product into the kernels and drops the adapters.
  # On the shared base itself: merging must leave the caller's frozen base untouched.
  base_before = jax.tree.map(np.array, nnx.to_pure_dict(base))
  policy = policy_lib.with_trainable(graphdef, base, trainable)
  lora_lib.merge_into_base(policy.llama)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(nnx.to_pure_dict(base))):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert all(proj.adapter is None for _, proj in lora_lib.projections(policy.llama))
  folded_def, folded = nnx.split(policy.llama)
  folded_pure = nnx.to_pure_dict(folded)
  for target in targets:
    block = lora_lib.BLOCKS[target]
    np.testing.assert_allclose(folded_pure["layers"][block][target]["kernel"],
                               merged_pure["layers"][block][target]["kernel"],
                               rtol=1e-6, atol=1e-6)
  assert rel_diff(_llama_logits(folded_def, folded, prompt_bt, mask_bt), reference) <= 1e-5


def test_low_rank_gradients_equal_numpy_formulas():
  # `lora.low_rank` has a hand-written backward pass; this is its calculus, in float64.
  rng = np.random.default_rng(0)
  x, a, b, w = (rng.normal(size=s) for s in [(10, 6), (6, 3), (3, 7), (10, 7)])
  scale = 1.7
  loss = lambda x, a, b: jnp.sum(lora_lib.low_rank(x, a, b, scale) * w)
  grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(v, jnp.float32) for v in (x, a, b)))
  expected = (scale * w @ (a @ b).T, scale * x.T @ w @ b.T, scale * (x @ a).T @ w)
  for name, ours, ref in zip("xab", grads, expected):
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5, err_msg=name)

  # x with leading axes and in bfloat16 (a bfloat16 base): rows flattened, x's gradient in x's
  # shape and dtype, the adapter's in float32 from the same bfloat16 values.
  x16 = jnp.asarray(x.reshape(2, 5, 6), jnp.bfloat16)
  x = np.asarray(x16, np.float64).reshape(10, 6)
  grads = jax.grad(lambda x, a, b: jnp.sum(lora_lib.low_rank(x, a, b, scale).reshape(2, 5, 7)
                                           * w.reshape(2, 5, 7)), argnums=(0, 1, 2))(
      x16, *(jnp.asarray(v, jnp.float32) for v in (a, b)))
  assert grads[0].shape == (2, 5, 6) and grads[0].dtype == jnp.bfloat16
  assert grads[1].dtype == grads[2].dtype == jnp.float32
  expected = (scale * w @ (a @ b).T, scale * x.T @ w @ b.T, scale * (x @ a).T @ w)
  for name, ours, ref, rtol in zip("xab", grads, expected, (2 ** -8, 1e-5, 1e-5)):
    np.testing.assert_allclose(np.asarray(ours, np.float64).reshape(ref.shape), ref, rtol=rtol,
                               atol=1e-5, err_msg=name)


def test_adapter_gradients_follow_from_the_merged_kernels_gradients():
  # Through W' = W + scale A B, dL/dA = scale dL/dW' B^T and dL/dB = scale A^T dL/dW': the
  # adapted policy's gradients against plain autodiff of the merged decoder, every projection.
  config = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0)
  graphdef, trainable, base = make_policy(config)
  trainable = randomized(trainable, 2)
  prompt_bt, mask_bt = prompts()
  weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, P, VOCAB)), jnp.float32)
  adapted_loss = lambda t: jnp.sum(_policy_forward(graphdef, t, base, prompt_bt, mask_bt)[0]
                                   * weights)
  ours = nnx.to_pure_dict(jax.grad(adapted_loss)(trainable))["llama"]["layers"]

  llama_def, _ = _base()
  merged, _ = numpy_merged(trainable, lora_lib.ALL_TARGETS, config.scale)
  merged_loss = lambda p: jnp.sum(_llama_logits(llama_def, p, prompt_bt, mask_bt) * weights)
  kernel_grads = nnx.to_pure_dict(jax.grad(merged_loss)(merged))["layers"]
  adapters = nnx.to_pure_dict(trainable)["llama"]["layers"]
  for target in lora_lib.ALL_TARGETS:
    block = lora_lib.BLOCKS[target]
    inputs, out_eqn = DELTA_EQNS[target].split("->")
    a_eqn, b_eqn = inputs.split(",")
    g = np.asarray(kernel_grads[block][target]["kernel"], np.float64)
    a = np.asarray(adapters[block][target]["adapter"]["a"], np.float64)
    b = np.asarray(adapters[block][target]["adapter"]["b"], np.float64)
    for name, eqn, other in (("a", f"{out_eqn},{b_eqn}->{a_eqn}", b),
                             ("b", f"{out_eqn},{a_eqn}->{b_eqn}", a)):
      expected = config.scale * np.einsum(eqn, g, other)
      got = np.asarray(ours[block][target]["adapter"][name])
      assert rel_diff(got, expected) <= 1e-4, (target, name, rel_diff(got, expected))


# ----------------------------------------------------------------------------------------------
# Only the adapters and the value head train
# ----------------------------------------------------------------------------------------------


def test_split_trains_adapters_and_value_head_and_base_stays_frozen():
  graphdef, trainable, base = make_policy()
  kinds = [type(v) for _, v in nnx.to_flat_state(trainable)]
  assert len(kinds) == 2 * len(LORA.targets) + 2
  assert kinds.count(nnx.LoRAParam) == 2 * len(LORA.targets)
  assert kinds.count(policy_lib.ValueHeadParam) == 2
  base_vars = [v for _, v in nnx.to_flat_state(base)]
  assert not any(isinstance(v, (nnx.LoRAParam, policy_lib.ValueHeadParam)) for v in base_vars)
  assert len(base_vars) == len(jax.tree.leaves(_base()[1]))

  base_before, trainable_before = flat(base), flat(trainable)
  reference = jax.tree.map(jnp.copy, trainable)
  state = new_state(trainable)
  scores_fn = lambda gen: np.random.default_rng(1).normal(size=B).astype(np.float32)
  for step in range(3):
    prompt_bt, mask_bt = prompts(seed=step)
    _, batch, _ = pipeline_batch(graphdef, state.trainable, base, reference, prompt_bt, mask_bt,
                                 step, scores_fn)
    state, metrics = update(state, graphdef, base, batch, step)
    assert float(metrics["ppo/skipped"]) == 0
  assert int(state.step) == 3

  base_after = flat(base)
  assert base_after.keys() == base_before.keys()
  for name, value in base_before.items():
    np.testing.assert_array_equal(base_after[name], value, err_msg=name)
  trainable_after = flat(state.trainable)
  for name, value in trainable_before.items():
    # B starts at 0 (so A's first gradient is 0); after three steps every leaf has moved.
    assert not np.array_equal(trainable_after[name], value), f"{name} did not train"
  assert np.abs(trainable_after["value_head/kernel"]).max() > 0


# ----------------------------------------------------------------------------------------------
# KL at the start; the rollout against the full forward
# ----------------------------------------------------------------------------------------------


def test_kl_is_exactly_zero_before_the_first_update():
  graphdef, fresh, base = make_policy()
  prompt_bt, mask_bt = prompts()
  scores_b = np.ones((B,), np.float32)
  # A fresh adapter, and a trained one as the start (the SFT case: reference != base).
  for start in (fresh, randomized(fresh, 2)):
    reference = jax.tree.map(jnp.copy, start)
    gen = rollout(graphdef, start, base, prompt_bt, mask_bt, seed=3)
    sequences = joined(prompt_bt, mask_bt, gen)
    old_logp, old_values, ref_logp = _experience(graphdef, base, start, reference, sequences,
                                                 gen, temperature=1.0, values=True)
    np.testing.assert_array_equal(old_logp, ref_logp)
    _, _, kl_br = _advantages(scores_b, old_logp, ref_logp, old_values, gen.mask_br,
                              jnp.float32(0.2), config=GAE)
    np.testing.assert_array_equal(kl_br, 0.0)
    # Reusing the rollout's log-probs (KV-cache decode) leaves only float rounding.
    reused_logp, _, reused_ref = _experience(graphdef, base, start, reference, sequences, gen,
                                             temperature=1.0, reuse_rollout=True)
    np.testing.assert_array_equal(reused_ref, ref_logp)
    _, _, kl_br = _advantages(scores_b, reused_logp, reused_ref, old_values, gen.mask_br,
                              jnp.float32(0.2), config=GAE)
    assert np.abs(np.asarray(kl_br)).max() <= 1e-5


def test_rollout_logprobs_and_values_match_the_full_forward():
  graphdef, trainable, base = make_policy()
  trainable = randomized(trainable, 4)
  prompt_bt, mask_bt = prompts()
  gen = rollout(graphdef, trainable, base, prompt_bt, mask_bt, seed=5)
  for x in (gen.tokens_br, gen.mask_br, gen.logprobs_br, gen.values_br):
    assert x.shape == (B, N)
  mask = np.asarray(gen.mask_br)
  assert mask.dtype == bool and mask[:, 0].all()

  sequences = joined(prompt_bt, mask_bt, gen)
  old_logp, old_values, _ = _experience(graphdef, base, trainable, trainable, sequences, gen,
                                        temperature=1.0, values=True)
  logprobs, values = np.asarray(gen.logprobs_br), np.asarray(gen.values_br)
  np.testing.assert_allclose(logprobs[mask], np.asarray(old_logp)[mask], atol=1e-5)
  np.testing.assert_allclose(values[mask], np.asarray(old_values)[mask], rtol=1e-5, atol=1e-5)
  assert np.abs(values[mask]).max() > 0.1      # the random value head is really read
  assert (logprobs[~mask] == 0).all() and (values[~mask] == 0).all()
  reused = _experience(graphdef, base, trainable, trainable, sequences, gen, temperature=1.0,
                       reuse_rollout=True)
  np.testing.assert_array_equal(reused[0], logprobs)
  np.testing.assert_array_equal(reused[1], values)

  # `limit` stops early in the same shape; the tokens drawn so far are unchanged (0: none; 1:
  # the prefill's token alone, no decode step).
  for limit in (0, 1, 3):
    short = rollout(graphdef, trainable, base, prompt_bt, mask_bt, seed=5, limit=limit)
    assert short.tokens_br.shape == (B, N)
    assert not np.asarray(short.mask_br)[:, limit:].any()
    assert (np.asarray(short.tokens_br)[:, limit:] == PAD).all()
    assert (np.asarray(short.logprobs_br)[:, limit:] == 0).all()
    np.testing.assert_array_equal(np.asarray(short.tokens_br)[:, :limit],
                                  np.asarray(gen.tokens_br)[:, :limit])
    np.testing.assert_array_equal(np.asarray(short.mask_br)[:, :limit], mask[:, :limit])
    np.testing.assert_array_equal(np.asarray(short.logprobs_br)[:, :limit], logprobs[:, :limit])


def uneven_prompts(rng: np.random.Generator) -> list[list[int]]:
  """B prompts that share their first 9 tokens and then have 1 to 26 more: a shared start of 8
  (rounded), and a shorter half that fits in half the columns after it."""
  prefix = [int(x) for x in rng.integers(3, VOCAB, 9)]
  return [prefix + [int(x) for x in rng.integers(3, VOCAB, n)] for n in (1, 20, 3, 26)]


@pytest.mark.parametrize("share,sort,blocks", [(True, False, 1), (True, True, 1),
                                               (False, True, 2)])
def test_a_prompt_layout_changes_no_output(share, sort, blocks):
  """Prompts laid out to run less (`prompt_layout.lay_out`: the shared start once at batch 1;
  rows sorted within blocks, the shorter half of each from after its extra padding) give the
  rollout, experience, loss and gradients that the same rows give left-padded and run whole."""
  graphdef, trainable, base = make_policy()
  trainable, reference = randomized(trainable, 4), randomized(trainable, 5)
  rng = np.random.default_rng(3)
  ids = uneven_prompts(rng)
  order, laid_out = prompt_layout.lay_out(ids, PAD, blocks, share=share, sort=sort)
  layout = laid_out.layout
  # The longest row needs 32 columns after the shared start (48 with none); each block's shorter
  # half fits in half of them.
  skip = 0 if not sort else 16 if share else 24
  assert layout == prompt_layout.PromptLayout(8 if share else 0, skip, blocks)
  # Sorting moves rows within their block only.
  assert all(i // (B // blocks) == row // (B // blocks) for row, i in enumerate(order))
  whole = prompt_layout.PromptLayout()
  layouts = {whole: prompt_layout.Prompts(*prompt_layout.pad_left([ids[i] for i in order], PAD)),
             layout: laid_out}
  outs = {}
  for lay, rows in layouts.items():
    assert rows.layout == lay
    gen = _rollout(graphdef, base, trainable, rows, jax.random.key(2), jnp.int32(N),
                   max_new_tokens=N, sampling=SAMPLING, eos_ids=(EOS,), pad_id=PAD)
    sequences = joined(rows.ids_bt, rows.mask_bt, gen, lay)
    logp, values, ref_logp = _experience(graphdef, base, trainable, reference, sequences, gen,
                                         temperature=1.0, values=True)
    outs[lay] = (gen, sequences, logp, values, ref_logp)
  (gen, *_, logp, values, ref_logp), (gen_p, *_, logp_p, values_p, ref_logp_p) = outs.values()
  np.testing.assert_array_equal(gen_p.tokens_br, gen.tokens_br)
  np.testing.assert_array_equal(gen_p.mask_br, gen.mask_br)
  for ours, expected in ((gen_p.logprobs_br, gen.logprobs_br), (gen_p.values_br, gen.values_br),
                         (logp_p, logp), (values_p, values), (ref_logp_p, ref_logp)):
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(ref_logp) - np.asarray(logp)).max() > 1e-3   # the reference differs

  adv_br, returns_br = (jnp.asarray(rng.normal(size=(B, N)), jnp.float32) for _ in range(2))
  grad_fn = jax.jit(jax.value_and_grad(ppo.loss_fn, has_aux=True), static_argnums=1,
                    static_argnames=("config", "temperature"))
  results = []
  for gen_s, sequences, *_ in outs.values():
    batch = ppo.Batch(sequences, gen_s.tokens_br, gen_s.mask_br, logp + 0.1, ref_logp, values,
                      adv_br, returns_br)
    # A dropout key, as the update passes: these adapters have no dropout, so it changes nothing.
    results.append(grad_fn(trainable, graphdef, base, batch, jax.random.key(0),
                           jnp.float32(0.05), config=GAE, temperature=1.0))
  ((loss, _), grads), ((loss_p, _), grads_p) = results
  np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
  flat_grads, flat_grads_p = flat(grads), flat(grads_p)
  assert max(np.abs(g).max() for g in flat_grads.values()) > 1e-3
  for name, g in flat_grads.items():
    np.testing.assert_allclose(flat_grads_p[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


def test_adapter_dropout_with_a_prompt_layout():
  """With adapter dropout, one pass over the shared start would give every row the same dropout
  masks there: refused. Skipping padding is allowed; each half draws its own masks."""
  graphdef, trainable, base = make_policy(dataclasses.replace(LORA, dropout=0.5))
  policy = policy_lib.with_trainable(graphdef, base, randomized(trainable, 4))
  rng = np.random.default_rng(3)
  ids = uneven_prompts(rng)
  _, laid_out = prompt_layout.lay_out(ids, PAD, sort=True)
  layout = laid_out.layout
  with pytest.raises(ValueError, match="dropout"):
    policy_lib.response_outputs(policy, laid_out, laid_out.ids_bt.shape[1] - 4,
                                jax.random.key(0))
  skip_only = layout.without_shared()
  prompt_bt, mask_bt = prompt_layout.pad_left(sorted(ids, key=len), PAD)
  outs = [policy_lib.response_outputs(policy, prompt_layout.Prompts(prompt_bt, mask_bt, lay),
                                      prompt_bt.shape[1] - 4, key).logits_brv
          for key, lay in ((jax.random.key(0), skip_only), (jax.random.key(0), skip_only),
                           (None, skip_only), (None, prompt_layout.PromptLayout()))]
  np.testing.assert_array_equal(outs[0], outs[1])                   # the key decides the masks
  assert np.abs(np.asarray(outs[0] - outs[2])).max() > 1e-3         # which are applied
  np.testing.assert_allclose(outs[2], outs[3], rtol=1e-5, atol=1e-5)


def test_eos_ends_a_row():
  graphdef, trainable, base = make_policy()
  prompt_bt, mask_bt = prompts()
  # Half the vocabulary ends a row, so most rows stop well before N.
  eos_ids = tuple(range(3, VOCAB, 2))
  gen = rollout(graphdef, trainable, base, prompt_bt, mask_bt, seed=6, eos_ids=eos_ids)
  tokens, mask = np.asarray(gen.tokens_br), np.asarray(gen.mask_br)
  logprobs = np.asarray(gen.logprobs_br)
  stopped_early = 0
  for row in range(B):
    hits = np.flatnonzero(np.isin(tokens[row], eos_ids))
    length = hits[0] + 1 if hits.size else N
    np.testing.assert_array_equal(mask[row], np.arange(N) < length, err_msg=f"row {row}")
    assert (tokens[row, length:] == PAD).all() and (logprobs[row, length:] == 0).all()
    assert (logprobs[row, :length] < 0).all()
    stopped_early += length < N
  assert stopped_early >= 2


# ----------------------------------------------------------------------------------------------
# The skip guard
# ----------------------------------------------------------------------------------------------


def test_skip_guard_leaves_state_untouched():
  graphdef, trainable, base = make_policy()
  trainable = randomized(trainable, 7)
  prompt_bt, mask_bt = prompts()
  scores_fn = lambda gen: np.random.default_rng(2).normal(size=B).astype(np.float32)
  _, batch, _ = pipeline_batch(graphdef, trainable, base, trainable, prompt_bt, mask_bt, 7,
                               scores_fn)
  # One real step first, so that the optimiser state is not all zeros.
  state, metrics = update(new_state(trainable, step=5), graphdef, base, batch, 0)
  assert float(metrics["ppo/skipped"]) == 0 and int(state.step) == 6

  valid = batch.response_mask_br
  bad_batches = {
      "nan_advantage": batch.replace(advantages_br=batch.advantages_br.at[0, 0].set(jnp.nan)),
      "exploding_ratio": batch.replace(
          old_logp_br=jnp.where(valid, batch.old_logp_br - 5.0, batch.old_logp_br)),
  }
  for name, bad in bad_batches.items():
    skipped_state, metrics = update(state, graphdef, base, bad, 1)
    assert float(metrics["ppo/skipped"]) == 1, name
    assert int(skipped_state.step) == int(state.step), name
    assert_trees_equal(skipped_state.trainable, state.trainable)
    assert_trees_equal(skipped_state.opt_state, state.opt_state)
  assert float(metrics["policy/ratio"]) > GAE.ratio_threshold

  stepped, metrics = update(state, graphdef, base, batch, 1)
  assert float(metrics["ppo/skipped"]) == 0 and int(stepped.step) == int(state.step) + 1
  assert not np.array_equal(flat(stepped.trainable)["value_head/kernel"],
                            flat(state.trainable)["value_head/kernel"])


# ----------------------------------------------------------------------------------------------
# The loss against NumPy
# ----------------------------------------------------------------------------------------------


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_loss_matches_numpy(advantage):
  temperature, kl_coef = 0.7, 0.3
  if advantage == "gae":
    config = ppo.PPOConfig(vf_coef=0.5, ent_coef=0.05, cliprange=0.2, cliprange_value=0.15)
  else:
    config = ppo.PPOConfig(advantage="grpo", group_size=2, ent_coef=0.05, cliprange=0.2)
  graphdef, trainable, base = make_policy()
  trainable = randomized(trainable, 8)
  rng = np.random.default_rng(9)
  prompt_bt, prompt_mask_bt = prompts()
  response_mask_br = np.arange(N)[None] < np.array([N, 5, 3, 1])[:, None]
  response_br = np.where(response_mask_br, rng.integers(3, VOCAB, (B, N)), PAD).astype(np.int32)
  tokens_bt = np.concatenate([prompt_bt, response_br], axis=1)
  mask_bt = np.concatenate([prompt_mask_bt, response_mask_br.astype(np.int32)], axis=1)

  # Independent reference: full-sequence logits and hidden states; position P - 1 + i
  # predicts response token i.
  logits_btv, hidden_btd = _policy_forward(graphdef, trainable, base, tokens_bt, mask_bt)
  logp_brv = log_softmax(np.asarray(logits_btv, np.float64)[:, P - 1:-1] / temperature)
  logp_br = np.take_along_axis(logp_brv, response_br[..., None], -1)[..., 0]
  head = flat(trainable)
  values_br = (np.asarray(hidden_btd, np.float64)[:, P - 1:-1] @ head["value_head/kernel"]
               + head["value_head/bias"])
  noise = lambda: rng.normal(0, 0.3, (B, N))
  old_logp_br, ref_logp_br = logp_br + noise(), logp_br + noise()
  old_values_br = values_br + noise()
  returns_br, adv_br = rng.normal(size=(B, N)), rng.normal(size=(B, N))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  batch = ppo.Batch(prompt_layout.Prompts(tokens_bt, mask_bt), response_br, response_mask_br,
                    f32(old_logp_br), f32(ref_logp_br), f32(old_values_br), f32(adv_br),
                    f32(returns_br))
  loss, (metrics, _) = _loss(trainable, graphdef, base, batch, None, jnp.float32(kl_coef),
                             config=config, temperature=temperature)

  m = response_mask_br
  ratio = np.exp(logp_br - old_logp_br)
  pg_losses = -adv_br * ratio
  pg_clipped = -adv_br * np.clip(ratio, 1 - config.cliprange, 1 + config.cliprange)
  pg = np.maximum(pg_losses, pg_clipped)[m].mean()
  clipfrac = (pg_clipped > pg_losses)[m].mean()
  assert 0 < clipfrac < 1                      # both branches of the clip are exercised
  entropy = (-(np.exp(logp_brv) * logp_brv).sum(-1))[m].mean()
  expected = pg - config.ent_coef * entropy
  if advantage == "gae":
    eps = config.cliprange_value
    v_clipped = old_values_br + np.clip(values_br - old_values_br, -eps, eps)
    vf_losses, vf_clipped = (values_br - returns_br) ** 2, (v_clipped - returns_br) ** 2
    vf = 0.5 * np.maximum(vf_losses, vf_clipped)[m].mean()
    expected += config.vf_coef * vf
    np.testing.assert_allclose(metrics["loss/value"], vf, rtol=1e-5)
    np.testing.assert_allclose(metrics["val/clipfrac"], (vf_clipped > vf_losses)[m].mean())
    np.testing.assert_allclose(metrics["val/vpred"], values_br[m].mean(), rtol=1e-5, atol=1e-6)
  else:
    log_r = ref_logp_br - logp_br
    kl = (np.expm1(log_r) - log_r)[m].mean()
    expected += kl_coef * kl
    np.testing.assert_allclose(metrics["loss/kl"], kl, rtol=1e-5)
    assert "loss/value" not in metrics
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss/total"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss/policy"], pg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["objective/entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(metrics["policy/clipfrac"], clipfrac)
  np.testing.assert_allclose(metrics["policy/ratio"], ratio[m].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Critic-free group baselines (GRPO, RLOO)
# ----------------------------------------------------------------------------------------------


def test_grpo_advantages_are_group_normalised():
  rng = np.random.default_rng(10)
  scores_b = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, -1.0, 0.5, 3.0, 0.0], np.float32)
  rows = len(scores_b)
  mask_br = np.arange(N)[None] < rng.integers(1, N + 1, rows)[:, None]
  old_logp_br = rng.normal(size=(rows, N)).astype(np.float32)
  ref_logp_br = rng.normal(size=(rows, N)).astype(np.float32)
  zeros_br = np.zeros((rows, N), np.float32)
  groups_gk = scores_b.astype(np.float64).reshape(-1, 4)
  expected_b = ((groups_gk - groups_gk.mean(1, keepdims=True))
                / (groups_gk.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
  expected_br = np.where(mask_br, expected_b[:, None], 0.0)
  assert (expected_b[4:8] == 0).all()      # a group of equal scores teaches nothing

  raw = ppo.PPOConfig(advantage="grpo", group_size=4, whiten_advantages=False)
  adv, returns, kl = _advantages(scores_b, old_logp_br, ref_logp_br, zeros_br, mask_br,
                                 jnp.float32(0.1), config=raw)
  np.testing.assert_allclose(adv, expected_br, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(returns, 0.0)
  # The KL reported for group advantages is the k3 estimate the loss penalises.
  log_r_br = ref_logp_br - old_logp_br
  np.testing.assert_allclose(kl, np.where(mask_br, np.expm1(log_r_br) - log_r_br, 0.0),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_advantages_keep_their_sign_under_default_whitening(kind):
  # Group 1 beats its mean with long answers, group 2 with one long answer; the losers are
  # short, so the token-weighted batch mean of the group advantages is far above 0.
  scores_b = np.array([0, 1, 1, 1, 0, 0, 0, 1], np.float32)
  mask_br = np.arange(N)[None] < np.array([1, 8, 8, 8, 1, 1, 1, 8])[:, None]
  zeros_br = np.zeros(mask_br.shape, np.float32)
  groups_gk = scores_b.reshape(-1, 4)
  beats_group_b = (groups_gk > groups_gk.mean(1, keepdims=True)).reshape(-1)
  adv, _, _ = _advantages(scores_b, zeros_br, zeros_br, zeros_br, mask_br, jnp.float32(0.1),
                          config=ppo.PPOConfig(advantage=kind, group_size=4))
  sign_br = np.broadcast_to(np.where(beats_group_b, 1.0, -1.0)[:, None], mask_br.shape)
  np.testing.assert_array_equal(np.sign(np.asarray(adv))[mask_br], sign_br[mask_br])


def test_grpo_update_trains_adapters_with_kl_term_and_no_critic():
  config = ppo.PPOConfig(advantage="grpo", group_size=4, minibatch_size=4, ppo_epochs=1,
                         kl=ppo_math.KLControlConfig(kind="fixed", init_coef=0.05))
  graphdef, trainable, base = make_policy()
  reference = jax.tree.map(jnp.copy, trainable)
  # One prompt, four samples: one group.
  prompt_bt, mask_bt = (np.repeat(x[1:2], B, axis=0) for x in prompts(seed=11))
  scores_fn = lambda gen: np.array([1.0, -1.0, 0.5, 2.0], np.float32)
  gen, batch, _ = pipeline_batch(graphdef, trainable, base, reference, prompt_bt, mask_bt, 12,
                                 scores_fn, config=config)
  np.testing.assert_array_equal(batch.old_values_br, 0.0)     # no critic forward
  adv = np.asarray(batch.advantages_br)[np.asarray(gen.mask_br)]
  assert (adv != 0).all()
  before = flat(trainable)
  state = new_state(trainable)
  for i in range(2):
    state, metrics = update(state, graphdef, base, batch, i, config=config)
    assert float(metrics["ppo/skipped"]) == 0
    assert "loss/kl" in metrics
    assert not any(k == "loss/value" or k.startswith("val/") for k in metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    if i == 0:   # the policy is still the reference
      assert abs(float(metrics["loss/kl"])) <= 1e-6
  after = flat(state.trainable)
  for name in ("value_head/kernel", "value_head/bias"):
    np.testing.assert_array_equal(after[name], before[name])
  for name in before:
    if name.endswith("/b"):
      assert not np.array_equal(after[name], before[name]), name


# ----------------------------------------------------------------------------------------------
# Whole iterations: PPO by hand learning a reward, and the trainer
# ----------------------------------------------------------------------------------------------


def test_ppo_by_hand_raises_a_token_reward():
  """Reward = fraction of response tokens equal to TARGET, which starts near 1 / VOCAB.

  Each iteration rolls out two batches of B prompts and makes 2 epochs x 2 minibatches of B
  rows. Responses are two tokens long (`limit`, no recompile): a sequence-level score spread
  over eight tokens learns too slowly for a test.
  """
  graphdef, trainable, base = make_policy()
  reference = jax.tree.map(jnp.copy, trainable)
  state = new_state(trainable)
  halves = [prompts(seed=13), prompts(seed=14)]
  rng = np.random.default_rng(15)
  rewards = []
  for it in range(30):
    parts = [pipeline_batch(graphdef, state.trainable, base, reference, prompt_bt, mask_bt,
                            100 * it + h, target_fraction, limit=2)
             for h, (prompt_bt, mask_bt) in enumerate(halves)]
    batch = jax.tree.map(lambda *x: jnp.concatenate(x), *(part[1] for part in parts))
    rewards.append(float(np.mean([part[2] for part in parts])))
    for epoch in range(GAE.ppo_epochs):
      order = rng.permutation(2 * B)
      for j, rows in enumerate((order[:B], order[B:])):
        minibatch = jax.tree.map(lambda x, rows=rows: x[rows], batch)
        state, metrics = update(state, graphdef, base, minibatch, 1000 * it + 10 * epoch + j)
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
  assert first < 0.15 and last > first + 0.3, np.round(rewards, 2)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer(texts):
  """A word-level tokenizer over the words of `texts`, with a ChatML template.

  Ids 0, 1, 2 are pad, BOS and EOS as in `LlamaConfig.tiny`. Loading SmolLM2's tokenizer from
  its GGUF takes ~8 s; this takes milliseconds and exercises the same chat path.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
  split = pre_tokenizers.Whitespace()
  words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)} - set(specials))
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)},
                                       unk_token="<unk>"))
  backend.pre_tokenizer = split
  return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                 eos_token="<|im_end|>", unk_token="<unk>",
                                 additional_special_tokens=["<|im_start|>"],
                                 chat_template=CHATML, padding_side="left")


SENTENCES = ["a gorgeous, witty film", "dull and far too long", "the cast is superb"]


def tiny_trainer(output_dir=None, lora_dropout: float = 0.05, sentences=SENTENCES,
                 reward: dict | None = None, ppo_options: dict | None = None,
                 checkpoint=None, **rollout):
  """A `PPOTrainer` on SST-2 chat prompts and a tiny random model with a word-level tokenizer;
  `reward`, `ppo_options`: fields of its `RewardConfig` and `PPOConfig`; `rollout`: of its
  `RolloutConfig`."""
  from jax_nlu_ppo.nlu import answer
  from jax_nlu_ppo import config as config_lib
  from jax_nlu_ppo.nlu import tasks
  from jax_nlu_ppo.rl import trainer as trainer_lib

  task = tasks.get_task("sst2")
  examples = [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(sentences)]
  texts = [m["content"] for ex in examples for m in tasks.build_prompt(task, ex, "chat")]
  tokenizer = tiny_chat_tokenizer(texts + ["system user assistant", *task.label_words])
  llama_config = LlamaConfig.tiny(vocab_size=len(tokenizer), hidden_size=32,
                                  intermediate_size=64, head_dim=8)
  lm = pretrained.LanguageModel(llama_config, *random_llama(llama_config), tokenizer)
  config = config_lib.TrainConfig(
      lora=lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=lora_dropout,
                               targets=("q_proj", "v_proj")),
      ppo=ppo.PPOConfig(**{"ppo_epochs": 2, "minibatch_size": 2, **(ppo_options or {})}),
      rollout=config_lib.RolloutConfig(batch_size=4, min_new_tokens=3, max_new_tokens=5,
                                       **rollout),
      # Lenient extraction finds label words anywhere, so random text earns varied rewards.
      reward=answer.RewardConfig(lenient=True, **(reward or {})),
      output_dir=output_dir, **({"checkpoint": checkpoint} if checkpoint else {}))
  return trainer_lib.PPOTrainer(config, lm=lm, train_examples=examples)


def test_trainer_runs_ppo_iterations(tmp_path):
  """`PPOTrainer` end to end (chat prompts, rollout, reward, update) on a tiny random model."""
  trainer = tiny_trainer(str(tmp_path))
  base_before, reference_before = flat(trainer.base), flat(trainer.reference)
  trainable_before = flat(trainer.state.trainable)

  history = trainer.train(steps=2)
  assert len(history) == 2 and trainer.iteration == 2 and trainer.position == 8
  for metrics in history:
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["ppo/skipped"] == 0
    assert 3 <= metrics["tokens/max_new_tokens"] <= 5
    assert metrics["tokens/prompt_len"] == 64
    assert {"loss/value", "loss/policy", "objective/kl", "env/reward_mean"} <= metrics.keys()
  # Every jitted program is compiled in the first iteration, none after it.
  assert history[0]["jit/compilations"] > 0 and history[1]["jit/compilations"] == 0
  # Policy == reference in the first iteration: only decode-vs-forward rounding is left.
  assert abs(history[0]["objective/kl"]) <= 1e-4
  # Two iterations x two epochs x two minibatches of two.
  assert int(trainer.state.step) == 8
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["iteration"] for line in lines] == [1, 2]

  for before, after in ((base_before, flat(trainer.base)),
                        (reference_before, flat(trainer.reference))):
    assert before.keys() == after.keys()
    for name in before:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  trainable_after = flat(trainer.state.trainable)
  assert all(not np.array_equal(trainable_after[k], v) for k, v in trainable_before.items())
  assert len(trainer.last_responses()) == 4


def test_a_run_whose_rewards_turn_nan_stops_with_its_last_good_checkpoint(tmp_path):
  """From iteration 3 the rewards are NaN (as a broken reward could make them): every update is
  skipped, and after `max_skipped_steps` such iterations the run stops, its latest checkpoint
  the last one that trained; the same command then continues from there."""
  from jax_nlu_ppo import checkpoint as checkpoint_lib
  from jax_nlu_ppo.rl import run_loop
  every_step = checkpoint_lib.CheckpointConfig(every_steps=1, keep=9)
  trainer = tiny_trainer(str(tmp_path), checkpoint=every_step)
  trainer.config = dataclasses.replace(trainer.config, max_skipped_steps=2, steps=6)
  rewards = trainer._rewards

  def nan_after_two(*args):
    preds, scores = rewards(*args)
    return preds, scores * np.nan if trainer.iteration >= 2 else scores
  trainer._rewards = nan_after_two
  with pytest.raises(run_loop.RunawayLossError, match=r"iterations 3\.\.4.*step 2"):
    trainer.train()
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["ppo/skipped"] for m in lines] == [0, 0, 1, 1]
  assert trainer.checkpointer.steps() == [1, 2]
  # The skipped updates left the adapters as iteration 2 made them.
  skipped_state = flat(trainer.state.trainable)
  trainer.checkpointer.close()

  resumed = tiny_trainer(str(tmp_path), checkpoint=every_step)
  assert resumed.iteration == 2
  for name, value in flat(resumed.state.trainable).items():
    np.testing.assert_array_equal(value, skipped_state[name], err_msg=name)
  history = resumed.train(steps=2)
  assert [m["ppo/skipped"] for m in history] == [0, 0] and resumed.iteration == 4


def test_trainer_prompt_layout_changes_no_metric():
  """Two iterations with the prompts laid out to run less (the shared start once; rows sorted by
  length, the shorter half skipping padding in rollout, experience and minibatches that keep
  the halves; no adapter dropout) and the same rows run whole: the same metrics and adapters."""
  words = "the film is a long and winding story of love loss and hope".split()
  sentences = ["superb", " ".join(words * 2), "dull", " ".join(words[::-1] * 2)]
  whole = prompt_layout.PromptLayout()
  runs = {}
  for laid_out in (True, False):
    trainer = tiny_trainer(lora_dropout=0.0, sentences=sentences, sort_by_length=True)
    if not laid_out:     # the same rows in the same order, every step's layout dropped
      steps = trainer.steps
      trainer.steps = dataclasses.replace(
          steps,
          rollout=lambda base, trainable, rows, *a, s=steps: s.rollout(
              base, trainable, rows.replace(layout=whole), *a),
          experience=lambda base, trainable, reference, rows, *a, s=steps: s.experience(
              base, trainable, reference, rows.replace(layout=whole), *a),
          update=lambda state, base, batch, *a, s=steps: s.update(
              state, base, batch.replace(sequences=batch.sequences.replace(layout=whole)), *a))
    runs[laid_out] = trainer.train(steps=2), flat(trainer.state.trainable)
  (history, params), (whole_history, whole_params) = runs[True], runs[False]
  assert all(m["tokens/shared_prefix"] >= 8 and m["tokens/skipped"] >= 16 for m in history)
  for metrics, other in zip(history, whole_history):
    for name, value in other.items():
      if not name.startswith(("time/", "jit/", "tokens/per_s")):
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  for name, value in whole_params.items():
    np.testing.assert_allclose(params[name], value, rtol=1e-4,
                               atol=1e-5 * float(np.abs(value).max()), err_msg=name)
  # Both options off: rows whole, in the order they came.
  trainer = tiny_trainer(sentences=sentences, shared_prefix=False, sort_by_length=False)
  ids = [trainer._prompt_ids(example) for example in trainer.train_examples]
  assert trainer._shared_prefix(ids) == 0 and trainer._skip(ids, 0, 64) == 0
