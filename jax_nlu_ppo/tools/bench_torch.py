"""The PyTorch side of `jax-nlu-ppo bench`: the same PPO iteration with the stack a user would
pick instead (needs torch, peft and, for the end-to-end step, trl; none is a dependency of the
library).

- rollout: transformers `generate` (sampling at temperature 1, exactly `new_tokens` tokens) on
  the peft-wrapped model;
- experience: TRL's legacy PPO way, a policy forward (log-probs and values from the last hidden
  state) and a reference forward with the adapter disabled;
- update: one epoch of minibatches, forward and backward through peft's LoRA model with the
  clipped PPO and value losses, AdamW on the adapters and value head;
- TRL `GRPOTrainer` (its PPO trainer is gone from current TRL): seconds per optimiser step with
  8 prompts x 4 generations, `new_tokens` new tokens, LoRA on all linear layers.

The prompts are the workload's (`workload_lib.prompt_rows`), left-padded to the longest as a tokenizer
pads a batch; the forwards take positions from the mask, as `generate` does.

transformers loads the embedded GGUF dequantised, but will neither train nor save a model
loaded from a quantised file, so our export writes it once as a plain Hugging Face folder (equal
to ours within tests/test_export.py's tolerance) and both PyTorch sides load that. The same export
carries a `--preset`'s random weights over, so both stacks run the same model there too.

PyTorch runs on CUDA when it sees a GPU, in the workload's dtype (the adapters stay float32, as
peft keeps them and as ours are), and each phase's clock stops after a device synchronisation.
"""
from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

from jax_nlu_ppo.tools import workload as workload_lib
from jax_nlu_ppo.runs import export
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompts_lib


def plain_folder(lm: pretrained.LanguageModel, folder: str, dtype: str = "float32") -> str:
  """`lm` as a plain Hugging Face folder (weights and tokenizer), by our own export."""
  return export.export_merged(lm, None, None, os.path.join(folder, "model"), dtype=dtype)


def _now(device: str) -> float:
  """The clock, read once the device has finished the work queued on it."""
  import torch
  if device == "cuda":
    torch.cuda.synchronize()
  return time.perf_counter()


def _lora(rank: int, targets):
  import peft
  return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                         task_type="CAUSAL_LM")


def run(lm: pretrained.LanguageModel, w: workload_lib.Workload, iterations: int, trl: bool = True,
        trl_steps: int = 3, progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Seconds per phase of `iterations` iterations after a first; `trl` adds the GRPOTrainer
  step (it needs `lm`'s tokenizer: a random-weight preset has none)."""
  import peft
  import torch
  import transformers
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, w.dtype)
  now = functools.partial(_now, device)
  with tempfile.TemporaryDirectory() as tmp:
    folder = plain_folder(lm, tmp, w.dtype)
    tokenizer = (transformers.AutoTokenizer.from_pretrained(folder)
                 if lm.tokenizer is not None else None)
    pad_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    policy = peft.get_peft_model(base, _lora(w.rank, list(_TARGETS)))
    value_head = torch.nn.Linear(base.config.hidden_size, 1, device=device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    # Left-padded to the longest prompt, as a tokenizer pads a batch for generate.
    rows = workload_lib.prompt_rows(tokenizer, w, base.config.vocab_size)
    prompt, mask = (torch.as_tensor(x, dtype=torch.long, device=device)
                    for x in prompts_lib.pad_left(rows, pad_id, max(map(len, rows))))
    prompt_len = prompt.shape[1]

    def iteration() -> dict[str, float]:
      times = {}
      start = now()
      policy.eval()
      with torch.no_grad():
        tokens = policy.generate(input_ids=prompt, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,
                                 pad_token_id=pad_id)
      times["rollout"] = now() - start
      start = now()
      full_mask = torch.cat([mask, torch.ones_like(tokens[:, prompt_len:])], dim=1)
      forward = functools.partial(_logp_values, policy, value_head, prompt_len=prompt_len,
                                  new_tokens=w.new_tokens)
      with torch.no_grad():
        old_logp, old_values = forward(tokens, full_mask)
        with policy.disable_adapter():
          forward(tokens, full_mask)
      advantages = torch.randn(old_logp.shape, device=device)
      returns = old_values + advantages
      times["experience"] = now() - start
      start = now()
      policy.train()
      order = torch.randperm(w.batch, device=device)
      for begin in range(0, w.batch, w.minibatch):
        picked = order[begin:begin + w.minibatch]
        logp, values = forward(tokens[picked], full_mask[picked])
        ratio = torch.exp(logp - old_logp[picked])
        adv = advantages[picked]
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        vf = 0.5 * ((values - returns[picked]) ** 2).mean()
        loss = pg + 0.1 * vf
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
      times["update"] = now() - start
      times["iteration"] = sum(times.values())
      return times

    first = iteration()
    progress(f"PyTorch: first iteration {first['iteration']:.1f} s")
    runs = []
    for i in range(iterations):
      runs.append(iteration())
      progress(f"PyTorch: iteration {i + 1}/{iterations} {runs[-1]['iteration']:.2f} s")
    median = {k: statistics.median(r[k] for r in runs) for k in workload_lib.PHASES}
    out = {"first_s": first, "median_s": median, "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "device": (torch.cuda.get_device_name() if device == "cuda"
                      else f"cpu, {torch.get_num_threads()} threads"),
           "rollout_tokens_per_s": w.batch * w.new_tokens / median["rollout"]}
    if trl:
      out |= _trl_step(folder, tokenizer, w, rows, trl_steps, device, progress)
  return out


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _logp_values(policy, value_head, tokens, mask, *, prompt_len: int, new_tokens: int):
  """Log-probs of the response tokens and values at the positions predicting them."""
  import torch
  # Positions from the mask, as generate computes them: left padding does not shift a row.
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  out = policy(input_ids=tokens, attention_mask=mask, position_ids=positions,
               output_hidden_states=True)
  start = prompt_len - 1
  logits = out.logits[:, start:start + new_tokens].float()
  logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, prompt_len:, None])[..., 0]
  hidden = out.hidden_states[-1][:, start:start + new_tokens].float()
  return logp, value_head(hidden)[..., 0]


def _trl_step(folder: str, tokenizer, w: workload_lib.Workload, rows: list[list[int]], steps: int,
              device: str, progress: Callable[[str], None]) -> dict[str, Any]:
  """Median seconds of TRL GRPOTrainer optimiser steps after the first, on the first 8 of the
  workload's prompts (`rows`), 4 generations each."""
  import datasets
  import transformers
  import trl
  prompts, generations = 8, 4
  text = tokenizer.batch_decode(rows[:prompts])
  rng = np.random.default_rng(0)

  def reward(completions, **_):
    return [float(x) for x in rng.choice([-1.0, 1.0], len(completions))]

  times: list[float] = []

  now = functools.partial(_now, device)

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      self.start = now()

    def on_step_end(self, args, state, control, **kwargs):
      times.append(now() - self.start)
      progress(f"TRL GRPOTrainer: step {len(times)}/{steps + 1} {times[-1]:.1f} s")

  with tempfile.TemporaryDirectory() as out_dir:
    config = trl.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=prompts * generations,
        num_generations=generations, max_completion_length=w.new_tokens, max_steps=steps + 1,
        learning_rate=1e-4, logging_strategy="no", report_to=[], save_strategy="no",
        use_cpu=device == "cpu", bf16=w.dtype == "bfloat16", temperature=1.0, disable_tqdm=True)
    trainer = trl.GRPOTrainer(
        model=folder, reward_funcs=reward, args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": text * (steps + 1)}),
        processing_class=tokenizer, peft_config=_lora(w.rank, "all-linear"),
        callbacks=[Clock()])
    trainer.train()
  return {"trl": trl.__version__, "trl_step_s": statistics.median(times[1:] or times),
          "trl_first_step_s": times[0],
          "trl_workload": f"{prompts} prompts x {generations} generations x {w.new_tokens} "
                          f"tokens, LoRA r{w.rank} all linear"}
