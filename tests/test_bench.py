"""The benchmark's FLOP count against XLA's own cost analysis, and its run on a tiny model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_nlu_ppo.tools import bench
from jax_nlu_ppo.model import decoder as model_lib
from jax_nlu_ppo.model import pretrained
from jax_nlu_ppo.model import prompts as prompt_layout
from jax_nlu_ppo.model.prompts import PromptLayout
from jax_nlu_ppo.model.llama_config import LlamaConfig
from tests.test_ppo_core import random_llama

# Wide enough that matmuls dominate XLA's count, as they do in real models.
CONFIG = LlamaConfig.tiny(vocab_size=512, hidden_size=256, intermediate_size=512, num_heads=4,
                          num_kv_heads=2, head_dim=64)


def test_forward_flops_match_xla_cost_analysis():
  """Our shape-based count of a full forward (logits at every position) against XLA's count of
  the compiled program, which also counts softmax, norms and other elementwise work. One layer:
  XLA's cost analysis counts a loop's body once, whatever its trip count (the layer scan)."""
  config = dataclasses.replace(CONFIG, num_layers=1)
  graphdef, params = random_llama(config)
  b, t = 4, 64
  tokens = jnp.zeros((b, t), jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)
  forward = jax.jit(lambda p, x, m: model_lib.forward_logits(nnx.merge(graphdef, p), x, m))
  analysis = forward.lower(params, tokens, mask).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  ours = bench.forward_flops(config, tokens=b * t, keys=t, logits=b * t)
  assert ours == pytest.approx(analysis["flops"], rel=0.05)


def test_phase_flops_follow_the_workload():
  w = bench.Workload(batch=2, prompt_len=8, new_tokens=4)
  flops = bench.phase_flops(CONFIG, w)
  assert flops["rollout"] == flops["prefill"] + flops["decode"]
  assert flops["update"] == 2 * flops["experience"]
  # The decode: a forward and a vocabulary projection per new token after the first (which
  # the prefill's logits give); the last token is never run through the model.
  head = 2 * w.batch * (w.new_tokens - 1) * CONFIG.hidden_size * CONFIG.vocab_size
  no_head = bench.forward_flops(CONFIG, w.batch * (w.new_tokens - 1), 12, 0)
  assert flops["decode"] == no_head + head


def test_bench_ours_runs_the_trainer_steps_without_recompiling(tmp_path):
  lm = pretrained.LanguageModel(CONFIG, *random_llama(CONFIG))
  w = bench.Workload(batch=4, prompt_len=8, new_tokens=4, minibatch=2)
  out = bench.bench_ours(lm, w, iterations=2, progress=lambda _: None, profile=str(tmp_path))
  assert out["compilations_first_iteration"] >= 4           # rollout, experience, minibatch, update
  assert out["recompilations_after_first_iteration"] == 0
  assert all(np.isfinite(v) and v > 0 for v in out["median_s"].values())
  # The profile: ops of all three steps, each found in its program (the update's backward pass
  # among them), longest first. Which ops rank first is the machine's timing, so no assertion
  # reads the ranking: an op XLA made itself (a copy, a fill) has no JAX source and can rank
  # anywhere on a busy machine.
  ops = out["profile_ops"]
  steps = [op for op in ops if op["module"] in ("jit_rollout", "jit_experience_batch",
                                                "jit_update")]
  assert {op["module"] for op in steps} == {"jit_rollout", "jit_experience_batch", "jit_update"}
  assert all(op["shape"] for op in steps), [op["op"] for op in steps if not op["shape"]]
  backward = [op for op in steps if "transpose(jvp" in op["source"]]
  assert backward and all(op["module"] == "jit_update" for op in backward)
  assert sum(bool(op["source"]) for op in steps) > len(steps) / 2
  assert not any(op["op"].startswith("while") for op in ops)
  assert all(a["seconds"] >= b["seconds"] for a, b in zip(ops, ops[1:]))


def test_table_prints_a_decode_lost_in_the_noise_as_not_available():
  """The decode's time is the rollout's median less the prefill's; where a slow spell made that
  zero or negative, its MFU reads n/a, not a figure from a 1e-9 s decode."""
  seconds = dict(zip(bench.PHASES, (4.0, 3.0, 8.0, 15.0)))
  ours = {"median_s": seconds, "first_s": seconds, "shared_prefix": 0, "skip": 0,
          "prompt_len": 64, "compilations_first_iteration": 4, "cache_hits_first_iteration": 0,
          "recompilations_after_first_iteration": 0}
  result = {"ours": ours, "rollout_tokens_per_s": 128.0, "device": "cpu:0",
            "matmul_peak_gflops": 300.0, "workload": {"dtype": "float32"},
            "mfu": {"prefill": 0.5, "decode": None, "rollout": 0.4, "experience": 0.6,
                    "update": 0.45}}
  text = bench.table(result)
  assert "MFU: prefill 50.0%, decode n/a, experience 60.0%, update 45.0%" in text


def test_torch_side_runs_a_random_weight_model_without_a_tokenizer():
  """The PyTorch side as `--preset` runs it: our export carries the random weights over, the
  prompts are random ids, and there is no TRL step (it needs a tokenizer)."""
  pytest.importorskip("peft")
  from jax_nlu_ppo.tools import bench_torch
  lm = pretrained.LanguageModel(CONFIG, *random_llama(CONFIG))
  w = bench.Workload(batch=4, prompt_len=8, new_tokens=4, minibatch=2)
  out = bench_torch.run(lm, w, iterations=1, trl=False, progress=lambda _: None)
  assert set(out["median_s"]) == set(bench.PHASES)
  assert all(np.isfinite(v) and v > 0 for v in out["median_s"].values())
  assert out["device"].startswith(("cpu", "NVIDIA"))
  assert out["rollout_tokens_per_s"] == pytest.approx(16 / out["median_s"]["rollout"])
  assert "trl_step_s" not in out


def test_a_tokenizer_folder_loads_without_its_model(tmp_path):
  """`bench --preset ... --tokenizer DIR`: a folder of tokenizer files alone (no config.json,
  no weights) gives the tokenizer that saved it, chat template and padding included."""
  from tests.test_ppo_core import tiny_chat_tokenizer
  tokenizer = tiny_chat_tokenizer(["a gorgeous film", "system user assistant"])
  tokenizer.save_pretrained(tmp_path)
  loaded = pretrained.tokenizer_only(str(tmp_path))
  messages = [{"role": "user", "content": "a gorgeous film"}]
  assert (pretrained.render_prompt(loaded, messages, True)
          == pretrained.render_prompt(tokenizer, messages, True))
  assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.padding_side == "left"
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    pretrained.tokenizer_only(str(tmp_path / "missing"))


def test_task_prompts_run_their_shared_start_once(glue_dir):
  """`--prompts task`: the trainer's SST-2 chat prompts, laid out [shared start | padding | rest],
  through the same steps (a tiny tokenizer: its unknown words do not matter for speed)."""
  from jax_nlu_ppo.nlu import tasks
  from tests.test_ppo_core import tiny_chat_tokenizer
  task = tasks.get_task("sst2")
  example = {"sentence": "a film", "label": 1, "idx": 0}
  texts = [m["content"] for m in tasks.build_prompt(task, example, "chat")]
  tokenizer = tiny_chat_tokenizer(texts + ["system user assistant"])
  config = dataclasses.replace(CONFIG, vocab_size=len(tokenizer))
  lm = pretrained.LanguageModel(config, *random_llama(config), tokenizer)
  w = bench.Workload(batch=4, new_tokens=4, minibatch=2, prompts="task", sort_by_length=True)
  rows = bench.prompt_rows(tokenizer, w, config.vocab_size)
  assert len(rows) == 4 and len({len(r) for r in rows}) > 1        # real, uneven prompts
  out = bench.bench_ours(lm, w, iterations=1, progress=lambda _: None)
  shared = prompt_layout.shared_prefix_length(rows)
  assert out["shared_prefix"] == shared >= 8
  assert out["prompt_len"] == prompt_layout.padded_length(rows, shared)
  assert out["recompilations_after_first_iteration"] == 0
  lengths = sorted(len(r) for r in rows)
  assert out["skip"] == prompt_layout.short_half_skip(lengths, 1, shared, out["prompt_len"])
  whole = bench.phase_flops(config, w, out["prompt_len"])
  flops = bench.phase_flops(config, w, out["prompt_len"], PromptLayout(shared))
  skipping = bench.phase_flops(config, w, out["prompt_len"], PromptLayout(shared, 8))
  for phase in ("prefill", "experience", "update"):
    assert skipping[phase] < flops[phase] < whole[phase]
  # Half the rows skip 8 columns: 2 x 8 fewer token positions in each forward.
  per_token = bench.forward_flops(config, 1, out["prompt_len"] + w.new_tokens, 0)
  np.testing.assert_allclose(flops["prefill"] - skipping["prefill"], 16 * per_token)
  assert flops["decode"] == whole["decode"] == skipping["decode"]
  with pytest.raises(ValueError, match="prompts must be"):
    bench.Workload(prompts="chat")
