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

transformers loads the embedded GGUF dequantised, but will neither train nor save a model
loaded from a quantised file, so our export writes it once as a plain Hugging Face folder (equal
to ours within 4.4e-6, tests/test_export.py) and both PyTorch sides load that.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

from jax_nlu_ppo import bench
from jax_nlu_ppo import export
from jax_nlu_ppo import pretrained


def plain_folder(lm: pretrained.LanguageModel, folder: str) -> str:
  """`lm` as a plain float32 Hugging Face folder (weights and tokenizer), by our own export."""
  return export.export_merged(lm, None, None, os.path.join(folder, "model"))


def _lora(rank: int, targets):
  import peft
  return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                         task_type="CAUSAL_LM")


def run(lm: pretrained.LanguageModel, w: bench.Workload, iterations: int, trl: bool = True,
        trl_steps: int = 3, progress: Callable[[str], None] = print) -> dict[str, Any]:
  import peft
  import torch
  import transformers
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as tmp:
    folder = plain_folder(lm, tmp)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    policy = peft.get_peft_model(base, _lora(w.rank, list(_TARGETS)))
    value_head = torch.nn.Linear(base.config.hidden_size, 1)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    prompt = torch.as_tensor(bench.prompt_ids(tokenizer, w.batch, w.prompt_len,
                                              base.config.vocab_size), dtype=torch.long)
    mask = torch.ones_like(prompt)

    def iteration() -> dict[str, float]:
      times = {}
      start = time.perf_counter()
      policy.eval()
      with torch.no_grad():
        tokens = policy.generate(input_ids=prompt, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens,
                                 pad_token_id=tokenizer.pad_token_id or 0)
      times["rollout"] = time.perf_counter() - start
      start = time.perf_counter()
      full_mask = torch.ones_like(tokens)
      with torch.no_grad():
        old_logp, old_values = _logp_values(policy, value_head, tokens, full_mask, w)
        with policy.disable_adapter():
          _logp_values(policy, value_head, tokens, full_mask, w)
      advantages = torch.randn(old_logp.shape)
      returns = old_values + advantages
      times["experience"] = time.perf_counter() - start
      start = time.perf_counter()
      policy.train()
      order = torch.randperm(w.batch)
      for begin in range(0, w.batch, w.minibatch):
        rows = order[begin:begin + w.minibatch]
        logp, values = _logp_values(policy, value_head, tokens[rows], full_mask[rows], w)
        ratio = torch.exp(logp - old_logp[rows])
        adv = advantages[rows]
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        vf = 0.5 * ((values - returns[rows]) ** 2).mean()
        loss = pg + 0.1 * vf
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
      times["update"] = time.perf_counter() - start
      times["iteration"] = sum(times.values())
      return times

    first = iteration()
    progress(f"PyTorch: first iteration {first['iteration']:.1f} s")
    runs = []
    for i in range(iterations):
      runs.append(iteration())
      progress(f"PyTorch: iteration {i + 1}/{iterations} {runs[-1]['iteration']:.2f} s")
    median = {k: statistics.median(r[k] for r in runs) for k in bench.PHASES}
    out = {"first_s": first, "median_s": median, "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "threads": torch.get_num_threads(),
           "rollout_tokens_per_s": w.batch * w.new_tokens / median["rollout"]}
    if trl:
      out |= _trl_step(folder, tokenizer, w, trl_steps, progress)
  return out


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _logp_values(policy, value_head, tokens, mask, w: bench.Workload):
  """Log-probs of the response tokens and values at the positions predicting them."""
  import torch
  out = policy(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
  start = w.prompt_len - 1
  logits = out.logits[:, start:start + w.new_tokens].float()
  logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, w.prompt_len:, None])[..., 0]
  hidden = out.hidden_states[-1][:, start:start + w.new_tokens]
  return logp, value_head(hidden)[..., 0]


def _trl_step(folder: str, tokenizer, w: bench.Workload, steps: int,
              progress: Callable[[str], None]) -> dict[str, Any]:
  """Median seconds of TRL GRPOTrainer optimiser steps after the first."""
  import datasets
  import transformers
  import trl
  prompts, generations = 8, 4
  text = tokenizer.batch_decode(bench.prompt_ids(tokenizer, prompts, w.prompt_len, 0))
  rng = np.random.default_rng(0)

  def reward(completions, **_):
    return [float(x) for x in rng.choice([-1.0, 1.0], len(completions))]

  times: list[float] = []

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter() - self.start)
      progress(f"TRL GRPOTrainer: step {len(times)}/{steps + 1} {times[-1]:.1f} s")

  with tempfile.TemporaryDirectory() as out_dir:
    config = trl.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=prompts * generations,
        num_generations=generations, max_completion_length=w.new_tokens, max_steps=steps + 1,
        learning_rate=1e-4, logging_strategy="no", report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, temperature=1.0, disable_tqdm=True)
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
