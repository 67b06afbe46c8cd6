"""Seconds per phase of one PPO iteration: rollout, experience, advantages, update.

    python scripts/bench_ppo_step.py                         # embedded 135M model, batch 32
    python scripts/bench_ppo_step.py --preset llama3p2_1b --dtype bfloat16   # random weights

The workload of the issues' benchmarks: `--batch` prompts of `--prompt-len` tokens (SST-2 dev
text when it is here), `--new-tokens` sampled at temperature 1 with EOS ignored (every row
generates them all), LoRA rank `--rank` on every projection plus the value head, one PPO epoch
in minibatches of `--minibatch`. Rewards are random: speed does not depend on them. The first
call of each jitted phase (compile + run) is reported beside the median of `--repeats` calls.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_foundation import prompt_ids, random_model  # noqa: E402

import jax_nlu_ppo  # noqa: E402
from jax_nlu_ppo import lora, policy, ppo, pretrained, sampling  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=pretrained.DEFAULT_MODEL)
  parser.add_argument("--preset", help="a LlamaConfig preset with random weights")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--minibatch", type=int, default=8)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--recompute", action="store_true",
                      help="recompute pi_old and V_old in the experience phase (TRL's way) "
                      "instead of taking them from the rollout")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--output", help="write the figures as JSON here")
  args = parser.parse_args(argv)

  if args.preset:
    lm = random_model(args)
    ids_bt = np.random.default_rng(0).integers(100, lm.config.vocab_size,
                                               (args.batch, args.prompt_len)).astype(np.int32)
  else:
    lm = jax_nlu_ppo.load_pretrained(args.model, dtype=args.dtype)
    ids_bt = prompt_ids(lm.tokenizer, args.batch, args.prompt_len)
  mask_bt = np.ones_like(ids_bt)
  print(f"devices: {jax.devices()}  model {args.preset or args.model}  {args.dtype}  batch "
        f"{args.batch} x {args.prompt_len} prompt x {args.new_tokens} new tokens, LoRA r{args.rank}"
        f", minibatch {args.minibatch}, {'recomputed' if args.recompute else 'reused'} pi_old")

  llama = nnx.merge(lm.graphdef, lm.params)
  pol = policy.make_policy(llama, lora.LoraConfig(rank=args.rank, dropout=0.0), 0.0, seed=0)
  graphdef, trainable, base = policy.split(pol)
  reference = jax.tree.map(jnp.copy, trainable)
  config = ppo.PPOConfig(minibatch_size=args.minibatch, ppo_epochs=1)
  tx = ppo.make_optimizer(ppo.OptimizerConfig())
  state = ppo.PPOState(jnp.int32(0), trainable, tx.init(trainable), jnp.float32(0.2))
  sample_cfg = sampling.SamplingConfig(1.0)

  rollout = jax.jit(functools.partial(ppo.rollout, max_new_tokens=args.new_tokens,
                                      sampling=sample_cfg, eos_ids=(), pad_id=0),
                    static_argnums=0)
  experience = jax.jit(functools.partial(ppo.experience, temperature=1.0,
                                         reuse_rollout=not args.recompute), static_argnums=0)
  advantages = jax.jit(functools.partial(ppo.advantages, config=config))
  update = jax.jit(functools.partial(ppo.update_minibatch, tx=tx, config=config,
                                     temperature=1.0), static_argnums=1)
  scores_b = np.random.default_rng(0).choice([-1.0, 1.0], args.batch).astype(np.float32)

  phases: dict[str, list[float]] = {k: [] for k in ("rollout", "experience", "advantages",
                                                    "update", "iteration")}
  for _ in range(1 + args.repeats):
    times = {}
    start = time.perf_counter()
    gen = jax.block_until_ready(rollout(graphdef, base, state.trainable, ids_bt, mask_bt,
                                        jax.random.key(0), args.new_tokens))
    times["rollout"] = time.perf_counter() - start
    tokens_bt = jnp.concatenate([ids_bt, gen.tokens_bn], axis=1)
    full_mask_bt = jnp.concatenate([mask_bt, gen.mask_bn.astype(mask_bt.dtype)], axis=1)
    start = time.perf_counter()
    old_logp, old_values, ref_logp = jax.block_until_ready(experience(
        graphdef, base, state.trainable, reference, tokens_bt, full_mask_bt, gen))
    times["experience"] = time.perf_counter() - start
    start = time.perf_counter()
    adv, returns, _ = jax.block_until_ready(advantages(scores_b, old_logp, ref_logp, old_values,
                                                       gen.mask_bn, state.kl_coef))
    times["advantages"] = time.perf_counter() - start
    batch = ppo.Batch(tokens_bt, full_mask_bt, gen.tokens_bn, gen.mask_bn, old_logp, ref_logp,
                      old_values, adv, returns)
    start = time.perf_counter()
    for begin in range(0, args.batch, args.minibatch):
      rows = slice(begin, begin + args.minibatch)
      state, metrics = update(state, graphdef, base, jax.tree.map(lambda x: x[rows], batch),
                              jax.random.key(1))
    jax.block_until_ready(metrics)
    times["update"] = time.perf_counter() - start
    times["iteration"] = sum(times.values())
    for k, v in times.items():
      phases[k].append(v)

  new_tokens = args.batch * args.new_tokens
  result = {"device": str(jax.devices()[0]), "config": vars(args),
            "first_s": {k: v[0] for k, v in phases.items()},
            "median_s": {k: statistics.median(v[1:]) for k, v in phases.items()}}
  result["compile_s"] = {k: result["first_s"][k] - result["median_s"][k] for k in phases}
  result["rollout_new_tokens_per_s"] = new_tokens / result["median_s"]["rollout"]
  print(f"\n| phase | median s | first call s (compile + run) |\n|---|---|---|")
  for k in phases:
    print(f"| {k} | {result['median_s'][k]:.3f} | {result['first_s'][k]:.2f} |")
  print(f"\nrollout: {result['rollout_new_tokens_per_s']:.0f} new tokens/s")
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
