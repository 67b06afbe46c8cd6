"""Load time, prefill and decode throughput of the embedded model, next to transformers.

    python scripts/bench_foundation.py [--batch 32 --prompt-len 64 --new-tokens 16] [--output F]
    python scripts/bench_foundation.py --preset llama3p2_1b --dtype bfloat16   # random weights

Both sides run on the same machine in this one process, float32, greedy, exactly
`--new-tokens` tokens per row (EOS ignored). Compile seconds are reported beside run seconds:
the first call of each jitted function is timed separately from the steady-state median.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

import jax_nlu_ppo
from jax_nlu_ppo.tools import bench
from jax_nlu_ppo.tools import workload
from jax_nlu_ppo.model import pretrained, prompts, sampling

def timed(fn, repeats: int) -> tuple[float, float]:
  """(first-call seconds, median of the next `repeats` calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - start)
  return first, statistics.median(runs)


def bench_ours(args, ids_bt):
  start = time.perf_counter()
  lm = (bench.random_model(args.preset, args.dtype) if args.preset
        else jax_nlu_ppo.load_pretrained(args.model, dtype=args.dtype))
  load_s = time.perf_counter() - start
  mask_bt = np.ones_like(ids_bt)
  greedy = sampling.SamplingConfig(temperature=0.0)

  def run(new_tokens):
    return lambda: pretrained._generate(  # pylint: disable=protected-access
        lm.graphdef, lm.params, prompts.Prompts(ids_bt, mask_bt), jax.random.key(0),
        max_new_tokens=new_tokens,
        sampling=greedy, eos_ids=(), pad_id=0).tokens_br

  # Prefill = prompt forward plus the first sampled token; decode = the rest.
  prefill_first, prefill_s = timed(run(1), args.repeats)
  gen_first, gen_s = timed(run(args.new_tokens), args.repeats)
  return dict(load_s=load_s, prefill_s=prefill_s, generate_s=gen_s,
              compile_s=prefill_first - prefill_s + gen_first - gen_s)


def bench_torch(args, ids_bt):
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  start = time.perf_counter()
  if args.preset:
    config = getattr(jax_nlu_ppo.LlamaConfig, args.preset)()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
  else:
    folder, name = os.path.split(pretrained.embedded_model_path(args.model))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
  model = model.to(device=device, dtype=dtype).eval()
  load_s = time.perf_counter() - start
  ids = torch.tensor(ids_bt, dtype=torch.long, device=device)

  def run(new_tokens):
    def go():
      with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
      if device == "cuda":
        torch.cuda.synchronize()
      return out
    return go

  _, prefill_s = timed(run(1), args.repeats)
  _, gen_s = timed(run(args.new_tokens), args.repeats)
  return dict(load_s=load_s, prefill_s=prefill_s, generate_s=gen_s, compile_s=0.0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=pretrained.DEFAULT_MODEL)
  parser.add_argument("--preset", help="a LlamaConfig preset with random weights, e.g. "
                      "llama3p2_1b, instead of the embedded model")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-torch", action="store_true", help="only measure jax_nlu_ppo")
  parser.add_argument("--output", help="write the figures as JSON here")
  args = parser.parse_args(argv)

  print(f"devices: {jax.devices()}  model {args.preset or args.model}  batch {args.batch} x "
        f"{args.prompt_len} prompt tokens x {args.new_tokens} new tokens, {args.dtype}, greedy")
  if args.preset:
    vocab = getattr(jax_nlu_ppo.LlamaConfig, args.preset)().vocab_size
    ids_bt = np.random.default_rng(0).integers(100, vocab, (args.batch, args.prompt_len))
    ids_bt = ids_bt.astype(np.int32)
  else:
    from transformers import AutoTokenizer
    path = pretrained.embedded_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path))
    ids_bt = workload.prompt_ids(tokenizer, args.batch, args.prompt_len, tokenizer.vocab_size)
  results = {"ours": bench_ours(args, ids_bt)}
  if not args.skip_torch:
    results["transformers"] = bench_torch(args, ids_bt)

  prefill_tokens = args.batch * args.prompt_len
  decode_tokens = args.batch * (args.new_tokens - 1)
  for r in results.values():
    r["prefill_tokens_per_s"] = prefill_tokens / r["prefill_s"]
    r["decode_tokens_per_s"] = decode_tokens / (r["generate_s"] - r["prefill_s"])
    r["generate_new_tokens_per_s"] = args.batch * args.new_tokens / r["generate_s"]

  rows = [("load (s)", "load_s"), ("compile (s)", "compile_s"), ("prefill (s)", "prefill_s"),
          ("generate (s)", "generate_s"), ("prefill tokens/s", "prefill_tokens_per_s"),
          ("decode tokens/s", "decode_tokens_per_s"),
          ("generate new tokens/s", "generate_new_tokens_per_s")]
  names = list(results)
  print(f"\n| {'metric':<24} | " + " | ".join(f"{n:>12}" for n in names)
        + (" | ours/theirs |" if len(names) == 2 else " |"))
  print("|" + "-" * 26 + "|" + "|".join("-" * 14 for _ in names)
        + ("|-------------|" if len(names) == 2 else "|"))
  for label, key in rows:
    values = [results[n][key] for n in names]
    ratio = (f" | {values[0] / values[1]:>11.2f} |" if len(names) == 2 and values[1]
             else (" | " + " " * 11 + " |" if len(names) == 2 else " |"))
    print(f"| {label:<24} | " + " | ".join(f"{v:>12.2f}" for v in values) + ratio)
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(
        {"config": vars(args), "device": str(jax.devices()[0]), **results}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
