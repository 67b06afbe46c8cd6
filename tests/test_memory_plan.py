"""The memory plan: exact parts against the parameter arithmetic, and the shipped configs."""
import json
import os
import subprocess
import sys

import pytest

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo.tools import memory_plan
from jax_nlu_ppo import sharding
from jax_nlu_ppo.model.llama_config import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "jax_nlu_ppo", "plan", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _norm_params(config: LlamaConfig) -> int:
  # RMSNorm scales are replicated (`norm` maps to no mesh axis): two per layer and the final.
  return (2 * config.num_layers + 1) * config.hidden_size


def test_llama2_7b_on_8_devices_matches_the_parameter_arithmetic(tmp_path):
  out = tmp_path / "plan.json"
  done = _plan_cli("--config", "configs/scale/llama2_7b_tpu_v5e8/sst2.yaml", "--output",
                   str(out), "--device-memory-gib", "16")
  assert done.returncode == 0, done.stderr[-3000:]
  plan = json.loads(out.read_text())
  config = LlamaConfig.llama2_7b()
  assert plan["num_params"] == config.num_params == 6_738_415_616
  assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  base = plan["parts"][memory_plan.BASE]
  # bfloat16 = 2 bytes, every matrix split 8 ways, the norms on every device.
  norms = _norm_params(config)
  assert base == (config.num_params - norms) * 2 // 8 + norms * 2
  assert abs(base - 6.74e9 * 2 / 8) / (6.74e9 * 2 / 8) < 1e-3
  # The compiled steps were measured, and the table says whether it fits.
  assert plan["parts"][memory_plan.UPDATE] > 0 and plan["parts"][memory_plan.ROLLOUT] > 0
  assert plan["peak_bytes"] > plan["resident_bytes"] > base
  assert "fits in 16 GiB per device" in done.stdout
  assert "frozen base weights" in done.stdout


def test_exact_parts_by_hand_for_lora_optimizer_and_cache():
  """A 1-device plan of a small shape, each part recomputed from the shapes."""
  model = LlamaConfig.tiny()
  config = config_lib.load_config(None, [
      "lora.rank=4", "lora.targets=[q_proj,v_proj]", "optimizer.name=adamw",
      "rollout.batch_size=4", "rollout.min_new_tokens=2", "rollout.max_new_tokens=8",
      "ppo.minibatch_size=4",
      "mesh.fsdp=1"])
  mesh = sharding.LogicalMesh.create(config.mesh)
  plan = memory_plan.plan(config, model, mesh, prompt_len=24, compile_steps=False)
  parts = {p.name: p.bytes_per_device for p in plan.parts}
  d, l, n, k, h = (model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads,
                   model.head_dim)
  assert parts[memory_plan.BASE] == model.num_params * 4
  lora = l * 4 * (d + n * h) + l * 4 * (d + k * h)     # A: in x r, B: r x out, float32 params
  trainable = (lora + d + 1) * 4                        # + value head kernel and bias
  assert parts[memory_plan.TRAINABLE] == parts[memory_plan.REFERENCE] == trainable
  # Adam mu and nu, and two int32 step counts (Adam's and the learning-rate schedule's).
  assert parts[memory_plan.OPTIMIZER] == 2 * trainable + 2 * 4
  assert parts[memory_plan.KV_CACHE] == 2 * l * 4 * (24 + 8) * k * h * 4
  assert plan.peak == plan.resident == sum(parts[p] for p in memory_plan.RESIDENT)


def test_plan_refuses_a_mesh_the_model_cannot_use():
  done = _plan_cli("--config", "configs/scale/llama2_7b_tpu_v5e8/sst2.yaml", "--set",
                   "mesh.fsdp=2", "mesh.tensor=3", "--no-compile")
  assert done.returncode == 2
  assert "32 heads, which the mesh's tensor=3 cannot split" in done.stderr


@pytest.mark.parametrize("name, memory", [("llama2_7b_gpu_80gb", "80"),
                                          ("llama2_13b_tpu_v4_32", "32")])
def test_shipped_scale_configs_fit_their_hardware_without_compiling(name, memory):
  done = _plan_cli("--config", f"configs/scale/{name}/mnli.yaml", "--device-memory-gib", memory,
                   "--no-compile")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"fits in {memory} GiB per device" in done.stdout


def test_every_scale_config_is_the_papers_task_on_its_machine():
  for machine, mesh in [("llama2_7b_tpu_v5e8", dict(fsdp=8)),
                        ("llama2_7b_gpu_80gb", dict(fsdp=1)),
                        ("llama2_13b_tpu_v4_32", dict(fsdp=8, tensor=2))]:
    for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
      config = config_lib.load_config(f"{ROOT}/configs/scale/{machine}/{task}.yaml")
      paper = config_lib.load_config(f"{ROOT}/configs/paper/{task}.yaml")
      assert config.data.task == task and config.mesh == sharding.MeshConfig(data=1, **mesh)
      assert (config.lora, config.ppo, config.optimizer, config.rollout) == (
          paper.lora, paper.ppo, paper.optimizer, paper.rollout)
      assert config.model.name.endswith("13b-chat-hf" if "13b" in machine else "7b-chat-hf")
