"""`jax-nlu-ppo bench`: one PPO iteration timed phase by phase, beside the PyTorch stack, with
the machine's matmul ceiling and the model FLOPs utilisation (MFU) of each phase.

Workload (the issue's): the embedded 135M model, 32 prompts of 64 tokens of SST-2 text, 16 new
tokens sampled at temperature 1 with EOS ignored (every row generates all of them), LoRA rank 8
on every projection plus a value head, one PPO epoch in minibatches of 8. `prompts="task"`
gives both stacks the trainer's SST-2 prompts instead (chat format, left-padded: 74 to 115
tokens, the first 58 shared by all), whose shared start ours runs once per call
(`model.prefill`) unless `shared_prefix=False`; with `sort_by_length=True` ours also sorts the
rows, the shorter half skipping half the columns (the trainer's option of that name), and with a
random-weight `preset` a `tokenizer` folder renders those prompts. Ours runs the trainer's own
set-up and iteration (`steps.setup`, `iteration.run`); the PyTorch side (`bench_torch`) runs transformers
`generate`, transformers + peft forward/backward, and TRL's `GRPOTrainer`.

FLOPs are counted from the model shape (`forward_flops`): 2 per multiply-add of every
projection, of attention scores and values over the keys each query sees in our programs (the
whole padded sequence or KV cache), and of the vocabulary projection where logits are taken.
The update is two forwards' worth: the backward pass computes activation gradients (as many
FLOPs as the forward) but no weight gradients for the frozen base; the LoRA terms are left out
(under 1%).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nlu_ppo import compiles
from jax_nlu_ppo.tools import bench_torch
from jax_nlu_ppo.tools import op_profile
from jax_nlu_ppo.tools.workload import PHASES, Workload, prompt_rows
from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.model import kernels as kernels_lib
from jax_nlu_ppo.rl import iteration as iteration_lib
from jax_nlu_ppo.rl import steps as ppo_steps
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompt_layout
from jax_nlu_ppo import sharding as sharding_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig
from jax_nlu_ppo.model.prompts import PromptLayout

def forward_flops(config: LlamaConfig, tokens: int, keys: int, logits: int) -> float:
  """FLOPs of one forward: `tokens` query positions, each attending over `keys` keys, and the
  vocabulary projection at `logits` positions (see the module docstring)."""
  d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_heads,
                   config.num_kv_heads, config.head_dim)
  projections = d * h * (n + 2 * k) + n * h * d + 3 * d * f
  attention = 2 * n * h * keys
  return 2.0 * (tokens * config.num_layers * (projections + attention)
                + logits * d * config.vocab_size)


def phase_flops(config: LlamaConfig, w: Workload, prompt_len: int | None = None,
                layout: PromptLayout = PromptLayout()) -> dict[str, float]:
  """FLOPs of each phase of one iteration (prefill and decode are the rollout's two parts), for
  prompts padded to `prompt_len` (default the workload's) and laid out by `layout`: the shared
  start runs once per call (once per rollout and experience, once per minibatch in the update),
  and half the rows skip `layout.skip` columns in every phase."""
  t = prompt_len or w.prompt_len
  length, responses = t + w.new_tokens, w.batch * w.new_tokens
  rows = w.batch * (t - layout.shared) - w.batch // 2 * layout.skip
  # The prefill's logits give each row its first token; each later one costs a forward of the
  # token before it and a vocabulary projection (nothing runs the last token through the model).
  prefill = forward_flops(config, layout.shared + rows, length, w.batch)
  decode = forward_flops(config, responses - w.batch, length, responses - w.batch)
  forward = forward_flops(config, layout.shared + rows + responses, length, responses)
  update = 2 * forward_flops(config, w.batch // w.minibatch * layout.shared + rows + responses,
                             length, responses)
  return {"prefill": prefill, "decode": decode, "rollout": prefill + decode,
          "experience": forward, "update": update}


def matmul_ceiling(dtype, kernels: kernels_lib.Kernels, size: int | None = None,
                   repeats: int = 15) -> float:
  """GFLOP/s of a jitted (size x size) @ (size x size) matmul, best of `repeats`: the machine's
  practical peak for the product the model runs (`kernels.project`). The default size is 2048 on
  CPU and 8192 on accelerators, where a smaller one would time the launch rather than the
  arithmetic."""
  size = size or (2048 if jax.devices()[0].platform == "cpu" else 8192)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
  return kernels_lib.gflops(functools.partial(kernels.project, "ij,jk->ik"), x, x, repeats)


def random_model(preset: str, dtype: str) -> pretrained.LanguageModel:
  """A preset's shape with random weights: speed does not depend on the weights' values."""
  config = getattr(LlamaConfig, preset)()
  jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  kernels = kernels_lib.resolve("auto", jdtype)
  build = lambda: model_lib.Llama(config, dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0),
                                  kernels=kernels)
  graphdef, params = nnx.split(jax.jit(build)())
  return pretrained.LanguageModel(config, graphdef, params, dtype=jdtype)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def bench_ours(lm: pretrained.LanguageModel, w: Workload, iterations: int,
               progress: Callable[[str], None] = print,
               profile: str | None = None) -> dict[str, Any]:
  """Seconds per phase of `iterations` PPO iterations after a first (compiling) one, on one
  device: the trainer's own set-up (`steps.setup`) and iteration (`iteration.run`), with random
  fixed rewards in place of the tasks' answers; and compilations after the first. With
  `profile` (a folder), one more iteration is traced there and its ops tabulated."""
  config = config_lib.load_config(None, [
      f"lora.rank={w.rank}", "lora.dropout=0.0", "value_dropout=0.0",
      f"rollout.batch_size={w.batch}", f"rollout.min_new_tokens={w.new_tokens}",
      f"rollout.max_new_tokens={w.new_tokens}", "rollout.temperature=1.0",
      f"ppo.minibatch_size={w.minibatch}", "ppo.ppo_epochs=1", "mesh.fsdp=1",
      f"remat={w.remat}"])
  mesh = sharding_lib.LogicalMesh.create(config.mesh, jax.devices()[:1])
  # No EOS: every row generates all `new_tokens`, as on the PyTorch side.
  run = ppo_steps.setup(lm.graphdef, lm.params, config, mesh, eos_ids=(), pad_id=0)
  rows = prompt_rows(lm.tokenizer, w, lm.config.vocab_size)
  _, prompts = prompt_layout.lay_out(rows, lm.pad_id, share=w.shared_prefix,
                                     sort=w.sort_by_length)
  scores_b = np.random.default_rng(0).choice([-1.0, 1.0], w.batch).astype(np.float32)
  reward = lambda generation, local: ([None] * w.batch, scores_b)
  host_rng, key = np.random.default_rng(0), jax.random.key(0)
  calls = {}    # with `profile`: each step's last arguments (as shapes), for its program text
  steps = _recording(run.steps, calls) if profile else run.steps

  def iteration(state, key):
    out = iteration_lib.run(steps, run.base, run.reference, state, prompts, reward, key,
                            host_rng, config)
    times = {phase: out.times[f"time/{phase}"] for phase in ("rollout", "experience", "update")}
    times["iteration"] = sum(out.times.values())
    return out.state, out.key, times

  compiled, loaded = compiles.count(), compiles.cache_hits()
  state, key, first = iteration(run.state, key)
  first_compiles, first_loaded = compiles.count() - compiled, compiles.cache_hits() - loaded
  progress(f"ours: first iteration {first['iteration']:.1f} s ({first_compiles} compilations, "
           f"{first_loaded} of them loaded from the persistent cache)")
  compiled = compiles.count()
  runs, prefill = [], []
  for i in range(iterations):
    state, key, times = iteration(state, key)
    runs.append(times)
    progress(f"ours: iteration {i + 1}/{iterations} {times['iteration']:.2f} s")
    # The prefill alone: the rollout stopped after its first token (`limit` is traced: no
    # compile), timed beside each iteration so that its median and the rollout's, whose
    # difference is the decode, meet the same spells of a shared machine.
    prefill.append(_timed(lambda: run.steps.rollout(run.base, state.trainable, prompts,
                                                    jax.random.key(99), 1))[1])
  median = {k: statistics.median(r[k] for r in runs) for k in PHASES}
  prefill_s = statistics.median(prefill)
  decode_s = median["rollout"] - prefill_s
  out = {"first_s": first, "median_s": median, "compile_s": {
             k: first[k] - median[k] for k in PHASES},
         "prefill_s": prefill_s, "prompt_len": prompts.ids_bt.shape[1],
         "shared_prefix": prompts.layout.shared, "skip": prompts.layout.skip,
         "decode_s": decode_s if decode_s > 0 else None,   # None: lost in the noise
         "compilations_first_iteration": first_compiles,
         "cache_hits_first_iteration": first_loaded,
         "recompilations_after_first_iteration": compiles.count() - compiled}
  if profile:
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      iteration(state, key)
    # Compiled again ahead of time for their text (op names, shapes, JAX source), after the
    # recompilation count above was taken.
    programs = [step.lower(*args).compile().as_text() for step, args in calls.items()]
    ops = op_profile.op_times(op_profile.latest_trace(profile), programs)
    out["profile_ops"] = [dataclasses.asdict(op) for op in ops]
    progress(f"one iteration traced in {profile}; its longest ops:\n{op_profile.table(ops)}")
  return out


def _recording(steps: ppo_steps.Steps, calls: dict) -> ppo_steps.Steps:
  """`steps` noting each jitted step's last arguments as shapes in `calls`, so that its program
  can be compiled again ahead of time for its text."""
  def recorded(step):
    def call(*args):
      calls[step] = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
          if isinstance(x, jax.Array) else x, args)
      return step(*args)
    return call
  return dataclasses.replace(steps, rollout=recorded(steps.rollout),
                             experience=recorded(steps.experience),
                             update=recorded(steps.update))


def run(model: str = pretrained.DEFAULT_MODEL, preset: str | None = None,
        workload: Workload = Workload(), iterations: int = 3, torch_side: bool = True,
        trl: bool = True, trl_steps: int = 3, output: str | None = None,
        profile: str | None = None, progress: Callable[[str], None] = print,
        tokenizer: str | None = None) -> dict[str, Any]:
  """The whole benchmark: ceiling, ours, PyTorch; prints the table and returns the figures.
  `tokenizer` (a tokenizer folder or a model) renders task prompts for a `preset`."""
  w = workload
  lm = (random_model(preset, w.dtype) if preset
        else pretrained.load_pretrained(model, dtype=w.dtype))
  if preset and tokenizer:
    lm.tokenizer = pretrained.tokenizer_only(tokenizer)
  prompts = f"{w.prompt_len}-token" if w.prompts == "text" else "SST-2 task"
  progress(f"devices {jax.devices()}; model {preset or model} {w.dtype}; batch {w.batch} x "
           f"{prompts} prompt x {w.new_tokens} new tokens, LoRA r{w.rank}, minibatch "
           f"{w.minibatch}")
  # Each dtype's ceiling for the product a model of that dtype runs here.
  ceiling = {name: matmul_ceiling(dtype, kernels_lib.resolve("auto", dtype))
             for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
  progress(f"matmul ceiling: {ceiling['float32']:.1f} GFLOP/s float32, "
           f"{ceiling['bfloat16']:.1f} bfloat16")
  ours = bench_ours(lm, w, iterations, progress, profile)
  flops = phase_flops(lm.config, w, ours["prompt_len"],
                      PromptLayout(ours["shared_prefix"], ours["skip"]))
  peak = ceiling[w.dtype] * 1e9
  seconds = {**ours["median_s"], "prefill": ours["prefill_s"], "decode": ours["decode_s"]}
  mfu = {k: flops[k] / seconds[k] / peak if seconds[k] else None
         for k in ("prefill", "decode", "rollout", "experience", "update")}
  new_tokens = w.batch * w.new_tokens
  result: dict[str, Any] = {
      "device": str(jax.devices()[0]), "model": preset or model, "workload": dataclasses.asdict(w),
      "matmul_peak_gflops": ceiling[w.dtype], "matmul_peak_gflops_by_dtype": ceiling,
      "ours": ours, "flops": flops, "mfu": mfu, "update_mfu": mfu["update"],
      "rollout_tokens_per_s": new_tokens / ours["median_s"]["rollout"],
      "iteration_s": ours["median_s"]["iteration"],
      "recompilations_after_first_iteration": ours["recompilations_after_first_iteration"]}
  if torch_side:
    if trl and lm.tokenizer is None:
      progress("no TRL step: GRPOTrainer needs a tokenizer, which a --preset's random weights "
               "do not have")
      trl = False
    theirs = bench_torch.run(lm, w, iterations, trl=trl, trl_steps=trl_steps,
                             progress=progress)
    result["torch"] = theirs
    result["rollout_ratio_vs_torch"] = (result["rollout_tokens_per_s"]
                                        / theirs["rollout_tokens_per_s"])
    result["iteration_ratio_vs_torch"] = theirs["median_s"]["iteration"] / result["iteration_s"]
  print(table(result))
  if output:
    pathlib.Path(output).write_text(json.dumps(result, indent=2) + "\n")
  return result


def table(result: dict[str, Any]) -> str:
  """Phase | ours | theirs | ratio, then MFU and compilations."""
  ours, theirs = result["ours"], result.get("torch")
  lines = ["", "| phase | ours (s) | first call, compile + run (s) | PyTorch (s) | speed-up |",
           "|---|---:|---:|---:|---:|"]
  for phase in PHASES:
    mine = ours["median_s"][phase]
    other = theirs["median_s"][phase] if theirs else None
    lines.append(f"| {phase} | {mine:.3f} | {ours['first_s'][phase]:.2f} | "
                 + (f"{other:.3f} | {other / mine:.2f}x |" if other else "- | - |"))
  tokens = f"{result['rollout_tokens_per_s']:.0f}"
  if theirs:
    tokens += (f" vs {theirs['rollout_tokens_per_s']:.0f} "
               f"({result['rollout_ratio_vs_torch']:.2f}x)")
    if theirs.get("trl_step_s"):
      lines.append(f"| TRL GRPOTrainer step ({theirs['trl_workload']}) | | | "
                   f"{theirs['trl_step_s']:.2f} | |")
  mfu = result["mfu"]
  devices = f"ours on {result['device']}" + (f", PyTorch on {theirs['device']}" if theirs else "")
  shared, skip = ours["shared_prefix"], ours["skip"]
  lines += ["", devices,
            f"prompts: {ours['prompt_len']} tokens padded"
            + (f", the first {shared} shared by all and run once by ours" if shared else "")
            + (f", the shorter half's {skip} extra padding columns skipped by ours" if skip
               else ""),
            f"rollout new tokens/s: {tokens}",
            f"matmul ceiling {result['matmul_peak_gflops']:.1f} GFLOP/s "
            f"({result['workload']['dtype']}); MFU: "
            + ", ".join(f"{k} {'n/a' if mfu[k] is None else f'{mfu[k]:.1%}'}"
                        for k in ("prefill", "decode", "experience", "update")),
            f"compilations: {ours['compilations_first_iteration']} in the first iteration "
            f"({ours['cache_hits_first_iteration']} loaded from the persistent cache), "
            f"{ours['recompilations_after_first_iteration']} after it"]
  return "\n".join(lines)
