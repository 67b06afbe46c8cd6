"""The op profile against a program whose costs are known: a large matmul and a small add."""
import jax
import jax.numpy as jnp
import pytest

from jax_nlu_ppo.tools import op_profile


def test_op_times_finds_the_matmul_and_names_it(tmp_path):
  @jax.jit
  def work(x, y):
    return (x @ y) + 1.0, y[:8] * 2.0

  x = jnp.ones((768, 768), jnp.float32)
  jax.block_until_ready(work(x, x))
  with jax.profiler.trace(tmp_path, create_perfetto_trace=True):
    for _ in range(3):
      jax.block_until_ready(work(x, x))
  program = work.lower(x, x).compile().as_text()
  ops = op_profile.op_times(op_profile.latest_trace(tmp_path), [program])

  mine = [op for op in ops if op.module == "jit_work"]
  assert mine, [op.module for op in ops]
  # The matmul, called once per run, traced back to its JAX operation and result shape; found
  # by its source, not by its rank, which is the machine's timing.
  matmul = [op for op in mine if "dot_general" in op.source]
  assert len(matmul) == 1 and matmul[0].calls == 3, mine
  assert matmul[0].shape.startswith("f32[768,768]") and matmul[0].seconds > 0
  assert all(a.seconds >= b.seconds for a, b in zip(ops, ops[1:]))
  assert "jit_work" in op_profile.table(ops)


def test_latest_trace_says_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    op_profile.latest_trace(tmp_path)


def test_table_says_how_to_see_kernels_inside_cuda_graphs():
  graph = op_profile.OpTime("jit_update", "command_buffer_12", 8, 0.07)
  fusion = op_profile.OpTime("jit_update", "loop_fusion.3", 8, 0.01, "f32[8]", "tanh")
  assert "xla_gpu_enable_command_buffer" in op_profile.table([graph, fusion])
  assert "xla_gpu_enable_command_buffer" not in op_profile.table([fusion])


def test_describe_reads_tuple_results():
  """On GPU a cuBLAS matmul is a custom-call whose result is a tuple (output, workspace)."""
  text = """HloModule jit_update, entry_computation_layout={}

ENTRY %main {
  %custom-call.2 = (bf16[128,2048]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(update)/dot_general" source_file="x.py"}
  ROOT %fusion.1 = f32[8]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(update)/tanh"}
}
"""
  assert op_profile.describe([text]) == {
      ("jit_update", "custom-call.2"): ("(bf16[128,2048]{1,0}, s8[4194304]{0})",
                                        "jit(update)/dot_general"),
      ("jit_update", "fusion.1"): ("f32[8]{0}", "jit(update)/tanh")}


def test_ops_xla_made_itself_are_found_and_said_to_have_no_source():
  """A copy that XLA inserted between loop steps carries no op_name: the profile finds it in its
  program (its shape) and the table says what it is rather than leaving a blank."""
  text = """HloModule jit_update, entry_computation_layout={}

ENTRY %main {
  %copy.424 = f32[256]{0} copy(%args_0)
  ROOT %fusion.1 = f32[8]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(update)/tanh"}
}
"""
  assert op_profile.describe([text])[("jit_update", "copy.424")] == ("f32[256]{0}", "")
  copy = op_profile.OpTime("jit_update", "copy.424", 4, 0.02, "f32[256]{0}", "")
  fusion = op_profile.OpTime("jit_update", "fusion.1", 4, 0.01, "f32[8]{0}", "jit(update)/tanh")
  assert "| (XLA's own op) |" in op_profile.table([copy, fusion])
  assert "XLA's own op" not in op_profile.table([fusion])
