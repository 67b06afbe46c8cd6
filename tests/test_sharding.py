"""Sharding: the mesh, the logical-axis rules, validation, and PPO on meshes of fake devices.

The PPO runs happen in processes of their own (`tests.sharded_ppo_run`, `tests.multihost_run`),
since the number of CPU devices is fixed when JAX starts. Each mesh must reproduce the one-device
run: the same metrics and trained adapters within float32 rounding (sharded matmuls sum in
another order), with every array split as the rules say.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jax_nlu_ppo import config as config_lib
from jax_nlu_ppo import sharding
from jax_nlu_ppo.rl import trainer as trainer_lib
from jax_nlu_ppo.model.llama_config import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logical_mesh(data=1, fsdp=1, tensor=1, **rules) -> sharding.LogicalMesh:
  """A logical mesh over an abstract mesh: rules and checks without devices."""
  config = sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=rules)
  return sharding.LogicalMesh(AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES),
                              config.logical_rules)


# --------------------------------------------------------------------------------------------
# Rules and validation.

def test_default_rules_give_fsdp_and_tensor_parallel_specs():
  mesh = logical_mesh(data=2, fsdp=2, tensor=2)
  assert mesh.spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert mesh.spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor")
  assert mesh.spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
  assert mesh.spec(("layers", "embed", "lora")) == P(None, "fsdp")
  assert mesh.spec(("batch", "length")) == P(("data", "fsdp"))
  # Axes of size 1 drop out of the spec.
  assert logical_mesh(fsdp=8).spec(("batch", "length")) == P("fsdp")
  assert logical_mesh(data=8).spec(("vocab", "embed")) == P()


def test_rules_are_overridden_per_logical_name():
  mesh = logical_mesh(fsdp=4, tensor=2, embed=[], mlp=["fsdp", "tensor"])
  assert mesh.spec(("layers", "embed", "mlp")) == P(None, None, ("fsdp", "tensor"))
  assert mesh.spec(("vocab", "embed")) == P("tensor")


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=-1, fsdp=-1), "only one of"),
    (dict(tensor=0), "mesh.tensor must be a positive size"),
    (dict(rules={"embd": ["fsdp"]}), "mesh.rules.embd: unknown logical axis"),
    (dict(rules={"embed": ["model"]}), "unknown mesh axis 'model'"),
    (dict(rules={"mlp": ["tensor", "tensor"]}), "names a mesh axis twice"),
])
def test_bad_mesh_configs_name_the_option(kwargs, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.MeshConfig(**kwargs)


def test_mesh_shape_resolves_the_rest_and_says_how_to_fix_a_mismatch():
  assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
  assert sharding.MeshConfig().shape(8) == (1, 8, 1)
  with pytest.raises(sharding.ShardingError, match="needs 4 devices but 8 are available; set one"):
    sharding.MeshConfig(data=2, fsdp=2).shape(8)
  with pytest.raises(sharding.ShardingError, match="3 does not divide 8"):
    sharding.MeshConfig(data=3).shape(8)


def test_conflicting_rules_and_uneven_splits_are_errors_naming_the_array():
  with pytest.raises(sharding.ShardingError,
                     match=r"embed_tokens: logical axes 'vocab' and 'embed' both map to mesh axis "
                           r"'fsdp'; change mesh.rules"):
    logical_mesh(fsdp=4, vocab=["fsdp"]).spec(("vocab", "embed"), (256, 64), "embed_tokens")
  with pytest.raises(sharding.ShardingError,
                     match=r"lm_head: axis 'vocab' of size 250 cannot be split 4 ways"):
    logical_mesh(tensor=4).spec(("embed", "vocab"), (64, 250), "lm_head")


def test_heads_must_divide_the_tensor_axis():
  config = LlamaConfig.tiny(num_heads=4, num_kv_heads=2)
  sharding.check_model(logical_mesh(tensor=2), config)
  with pytest.raises(sharding.ShardingError, match=r"2 kv heads, which the mesh's tensor=4 cannot "
                                                   r"split.*mesh.rules.kv_heads: \[\]"):
    sharding.check_model(logical_mesh(tensor=4), config)


def test_batch_sizes_must_divide_the_data_parallel_axes():
  config = config_lib.load_config(None, ["rollout.batch_size=12", "ppo.minibatch_size=4"])
  assert trainer_lib.check_mesh(config, logical_mesh(data=2, fsdp=2)) == 12
  with pytest.raises(sharding.ShardingError, match=r"rollout.batch_size x ppo.group_size \(12\) "
                                                   r"must be divisible .* \(8 = data=2 x fsdp=4\)"):
    trainer_lib.check_mesh(config, logical_mesh(data=2, fsdp=4))
  with pytest.raises(sharding.ShardingError, match=r"ppo.minibatch_size / "
                                                   r"ppo.gradient_accumulation_steps \(2\)"):
    trainer_lib.check_mesh(
        config_lib.load_config(None, ["rollout.batch_size=12", "ppo.minibatch_size=4",
                                      "ppo.gradient_accumulation_steps=2"]),
        logical_mesh(fsdp=4))


def test_mesh_config_reads_from_yaml_overrides_and_fails_before_any_model_load():
  config = config_lib.load_config(None, ["mesh.data=2", "mesh.tensor=2", "mesh.rules.embed=[]"])
  assert config.mesh == sharding.MeshConfig(data=2, tensor=2, rules={"embed": []})
  with pytest.raises(config_lib.ConfigError, match="mesh.rules.embedding: unknown logical axis"):
    config_lib.load_config(None, ["mesh.rules.embedding=[fsdp]"])
  # This process has one device: the mesh is refused before the (missing) model is looked for.
  bad = config_lib.load_config(None, ["mesh.data=2", "mesh.fsdp=1",
                                      "model.name=/nonexistent/model"])
  with pytest.raises(sharding.ShardingError, match="needs 2 devices but 1 are available"):
    trainer_lib.PPOTrainer(bad)


# --------------------------------------------------------------------------------------------
# PPO on meshes of 8 fake devices, against one device.

MESHES = ["data8", "fsdp8", "tensor2_fsdp4", "data2_fsdp2_tensor2"]

# What the rules say each array's partition spec is, mesh by mesh (size-1 axes left out).
EXPECTED_SPECS = {
    "data8": dict(embed_tokens=(), q_kernel=(), lora_a=(), lora_b=(), value_kernel=(),
                  batch_tokens=("data",)),
    "fsdp8": dict(embed_tokens=(None, "fsdp"), q_kernel=(None, "fsdp"),
                  o_kernel=(None, None, None, "fsdp"), down_kernel=(None, None, "fsdp"),
                  lora_a=(None, "fsdp"), lora_b=(), value_kernel=("fsdp",),
                  adam_mu_lora_a=(None, "fsdp"), batch_tokens=("fsdp",),
                  batch_advantages=("fsdp",)),
    "tensor2_fsdp4": dict(embed_tokens=("tensor", "fsdp"), q_kernel=(None, "fsdp", "tensor"),
                          k_kernel=(None, "fsdp", "tensor"),
                          o_kernel=(None, "tensor", None, "fsdp"),
                          down_kernel=(None, "tensor", "fsdp"), lora_a=(None, "fsdp"),
                          lora_b=(None, None, "tensor"), value_kernel=("fsdp",),
                          adam_mu_lora_a=(None, "fsdp"), batch_tokens=("fsdp",)),
    "data2_fsdp2_tensor2": dict(embed_tokens=("tensor", "fsdp"),
                                q_kernel=(None, "fsdp", "tensor"),
                                lora_b=(None, None, "tensor"),
                                batch_tokens=(("data", "fsdp"),),
                                batch_advantages=(("data", "fsdp"),)),
}


def _run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded") / "runs.npz"
  done = _run_module("tests.sharded_ppo_run", str(out))
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(np.load(out))


def _group(results, run: str, kind: str) -> dict[str, np.ndarray]:
  prefix = f"{run}/{kind}/"
  return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize("mesh", MESHES)
def test_ppo_iterations_on_a_mesh_match_one_device(sharded_runs, mesh):
  want_metrics = _group(sharded_runs, "one_device", "metric")
  got_metrics = _group(sharded_runs, mesh, "metric")
  assert want_metrics.keys() == got_metrics.keys()
  for name, want in want_metrics.items():
    np.testing.assert_allclose(got_metrics[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
  # The run trained: losses were computed and adapters moved.
  assert np.all(want_metrics["ppo/skipped"] == 0)
  # The prompts' shared start (the task's instructions) ran once per step, on every mesh.
  assert np.all(want_metrics["tokens/shared_prefix"] >= 8)
  want_params = _group(sharded_runs, "one_device", "param")
  got_params = _group(sharded_runs, mesh, "param")
  assert want_params.keys() == got_params.keys()
  assert any("['b']" in name and np.abs(p).max() > 1e-4 for name, p in want_params.items())
  for name, want in want_params.items():
    # Float32 rounding relative to the tensor's scale: summation order differs per mesh.
    np.testing.assert_allclose(got_params[name], want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()), err_msg=name)
  # Greedy answers of the trained policy, generated with the batch split over the mesh.
  want = _group(sharded_runs, "one_device", "eval")["responses"]
  assert len(want) == 13
  np.testing.assert_array_equal(_group(sharded_runs, mesh, "eval")["responses"], want)


@pytest.mark.parametrize("mesh", ["data8", "tensor2_fsdp4"])
def test_prompt_layouts_on_a_mesh_match_one_device(sharded_runs, mesh):
  """Prompts of very different lengths: each batch shard's rows sorted, its shorter half
  skipping padding in rollout, experience and update (8 blocks: one per shard on data8, two per
  shard on tensor2_fsdp4), give the one-device run's metrics: rewards, KL, values, losses,
  gradient norms. (Trained weights are compared on the other runs' data, where every mesh's
  agree to 4e-6 of their scale. Adam's per-weight normalisation magnifies the rounding of
  gradients that nearly cancel: with long prompts, a few weights of 512 ended up to 2e-4 of
  their scale apart on every mesh, with or without a layout.)"""
  want = _group(sharded_runs, "layout_one_device", "metric")
  got = _group(sharded_runs, f"layout_{mesh}", "metric")
  assert want.keys() == got.keys()
  assert np.all(want["tokens/skipped"] >= 8) and np.all(want["tokens/shared_prefix"] >= 8)
  assert np.all(want["ppo/skipped"] == 0)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_sft_steps_on_a_mesh_match_one_device(sharded_runs):
  for kind in ("metric", "param"):
    want = _group(sharded_runs, "sft_one_device", kind)
    got = _group(sharded_runs, "sft_data2_fsdp2_tensor2", kind)
    assert want and want.keys() == got.keys()
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-5,
                                 atol=1e-5 * float(np.abs(value).max()), err_msg=name)
  assert str(sharded_runs["sft_data2_fsdp2_tensor2/spec/lora_a"]) == str((None, "fsdp"))


def test_reward_model_on_a_mesh_matches_one_device(sharded_runs):
  """Its training steps, held-out scores, and the rewards its scorer gives PPO's rollouts."""
  want = _group(sharded_runs, "rm_one_device", "metric")
  got = _group(sharded_runs, "rm_data2_fsdp2_tensor2", "metric")
  assert want.keys() == {"rm/loss", "scores", "ppo_rewards"} == got.keys()
  assert np.ptp(want["ppo_rewards"]) > 0
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5,
                               atol=1e-5 * float(np.abs(value).max()), err_msg=name)
  assert str(sharded_runs["rm_data2_fsdp2_tensor2/spec/scorer_lora_a"]) == str((None, "fsdp"))


@pytest.mark.parametrize("mesh", MESHES)
def test_arrays_are_sharded_as_the_rules_say(sharded_runs, mesh):
  specs = {k: str(v) for k, v in _group(sharded_runs, mesh, "spec").items()}
  for name, expected in EXPECTED_SPECS[mesh].items():
    assert specs[name] == str(expected), (name, specs[name])
  assert {str(v) for v in _group(sharded_runs, "one_device", "spec").values()} == {"()"}


def test_processes_share_the_prompt_start_all_of_them_have(monkeypatch):
  """`shared_over_processes` with three simulated processes: the shortest start first, then
  only the tokens every process agrees on, rounded down to the multiple."""
  import jax
  from jax_nlu_ppo import distributed
  starts = [list(range(10, 26)), list(range(10, 29)), list(range(10, 15)) + [99] + list(
      range(16, 26))]
  gathered = []

  def allgather(local):      # what process 0 receives: every process's array, stacked
    if local.shape == (1,):  # max_over_processes of minus the lengths
      return np.asarray([[-len(x)] for x in starts])
    gathered.append(local)
    return np.stack([np.asarray(x[:len(local)], np.int32) for x in starts])

  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
  assert distributed.shared_over_processes(starts[0], multiple=1) == 5    # token 5 differs
  assert distributed.shared_over_processes(starts[0], multiple=4) == 4
  assert distributed.shared_over_processes(starts[0], multiple=8) == 0
  assert gathered[0].shape == (16,)          # the shortest start (16 of 16, 19 and 16)
  starts[2][5] = 15
  assert distributed.shared_over_processes(starts[0], multiple=8) == 16


# --------------------------------------------------------------------------------------------
# Two processes on this machine (gloo collectives), against one process with the same mesh.

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_like_one(tmp_path):
  port = str(_free_port())
  multi_dir, multi_out = tmp_path / "multi", tmp_path / "multi.npz"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  env.pop("XLA_FLAGS", None)
  workers = [subprocess.Popen([sys.executable, "-m", "tests.multihost_run", str(i), "2", port,
                               str(multi_dir), str(multi_out)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  logs = [w.communicate(timeout=600)[0] for w in workers]
  for i, (worker, log) in enumerate(zip(workers, logs)):
    assert worker.returncode == 0, f"process {i}:\n{log[-3000:]}"
  # One checkpoint folder, written once by both processes together; one metrics file.
  assert sorted(p.name for p in (multi_dir / "checkpoints").iterdir()) == ["2"]
  assert len((multi_dir / "metrics.jsonl").read_text().splitlines()) == 2
  # Both processes ran under process 0's lock of the folder, released at the end.
  assert not (multi_dir / "run.lock").exists()

  single_out = tmp_path / "single.npz"
  done = _run_module("tests.multihost_run", "0", "1", "0", str(tmp_path / "single"),
                     str(single_out), str(multi_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  multi, single = dict(np.load(multi_out)), dict(np.load(single_out))
  # Both processes agreed on the prompts' shared start, as one process finds it.
  assert np.all(multi["metric/tokens/shared_prefix"] >= 8)
  # The reward model trained over both processes as in one, and its scores rewarded PPO.
  assert np.all(multi["metric/env/model_reward_mean"] != 0)
  for name in (k for k in single if k.startswith(("metric/", "rm/"))):
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-5, err_msg=name)
  params = [k for k in single if k.startswith("param/")]
  assert params and any(k.startswith("rm/param/") for k in single)
  for name in params:
    want = single[name]
    np.testing.assert_allclose(multi[name], want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()), err_msg=name)
    # The two-process checkpoint reads back in one process as exactly what was trained.
    np.testing.assert_array_equal(single["restored/" + name[len("param/"):]], multi[name],
                                  err_msg=name)
  assert int(single["restored_iteration"]) == 2
  assert bool(multi["eval/agree"])
  np.testing.assert_array_equal(multi["eval/responses"], single["eval/responses"])
