"""Where a traced run spent its time, op by op: XLA's trace events summed per compiled op, each
named from its program's metadata (which JAX operation, forward or backward pass, and shape).

`jax-nlu-ppo bench --profile DIR` traces one PPO iteration and prints this table; DIR keeps the
trace itself for Perfetto (ui.perfetto.dev) or TensorBoard's profiler. On CPU, XLA runs
independent ops of a program side by side on the cores, so the times of ops can add up to more
than the wall time, and two ops sharing the cores each look slower than alone.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import pathlib
import re
from typing import Iterable

_MODULE = re.compile(r"^HloModule (\S+?),", re.M)
# The result is a shape or a tuple of shapes (a GPU library call returns its workspace too).
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) [\w-]+\((.*)$", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Control flow: a loop's or call's event spans the ops inside it, which have their own events.
# XLA names an instruction after its opcode unless a pass renamed it.
_CONTROL_FLOW = re.compile(r"^(while|conditional|call)(\.\d+)?$")


@dataclasses.dataclass(frozen=True)
class OpTime:
  module: str        # the compiled program, e.g. "jit_rollout"
  op: str            # the compiled op (usually a fusion's name)
  calls: int
  seconds: float
  shape: str = ""    # its result
  # The JAX operation it came from (`transpose(jvp(...))` is a backward pass); empty for an op
  # that XLA made itself, which its program gives no op_name: a copy between loop steps, a fill.
  source: str = ""


def describe(programs: Iterable[str]) -> dict[tuple[str, str], tuple[str, str]]:
  """{(module, op): (result shape, JAX op_name or "")} for every instruction of compiled
  programs' text (`jax.jit(f).lower(...).compile().as_text()`)."""
  out = {}
  for text in programs:
    module = _MODULE.search(text)
    for m in _OP.finditer(text):
      name = _OP_NAME.search(m.group(3))
      out.setdefault((module.group(1) if module else "", m.group(1)),
                     (m.group(2), name.group(1) if name else ""))
  return out


def latest_trace(directory: str | pathlib.Path) -> pathlib.Path:
  """The newest trace that `jax.profiler.trace(directory)` wrote."""
  found = sorted(pathlib.Path(directory).glob("plugins/profile/*/*.trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f"no profiler trace (plugins/profile/*/*.trace.json.gz) under "
                            f"{directory}")
  return found[-1]


def op_times(trace_file: str | pathlib.Path, programs: Iterable[str] = ()) -> list[OpTime]:
  """Every compiled op in the trace with its total time and calls, longest first (loops and
  calls left out: their time is that of the ops inside them)."""
  with gzip.open(trace_file) as f:
    events = json.load(f)["traceEvents"]
  micros, calls = collections.Counter(), collections.Counter()
  for event in events:
    args = event.get("args") or {}
    if (event.get("ph") == "X" and "hlo_op" in args
        and not _CONTROL_FLOW.match(args["hlo_op"])):
      key = (args.get("hlo_module", ""), args["hlo_op"])
      micros[key] += event.get("dur", 0)
      calls[key] += 1
  info = describe(programs)
  return [OpTime(module, op, calls[(module, op)], us / 1e6, *info.get((module, op), ("", "")))
          for (module, op), us in micros.most_common()]


def table(ops: list[OpTime], top: int = 15) -> str:
  """The `top` ops as a Markdown table, with each program's total."""
  per_module = collections.Counter()
  for op in ops:
    per_module[op.module] += op.seconds
  lines = ["| program | op | calls | total (ms) | result | from |", "|---|---|---:|---:|---|---|"]
  for op in ops[:top]:
    source = op.source[-70:] if op.source else "(XLA's own op)" if op.shape else ""
    lines.append(f"| {op.module} | {op.op} | {op.calls} | {op.seconds * 1e3:.1f} | {op.shape} | "
                 f"{source} |")
  lines.append("")
  if any(op.shape and not op.source for op in ops[:top]):
    lines.append("(XLA's own op: one the compiler made, with no JAX operation behind it, such as "
                 "a copy between loop steps or a buffer fill)")
  if any(op.op.startswith("command_buffer") for op in ops[:top]):
    lines.append("(on GPU, XLA launches groups of kernels as CUDA graphs, one trace event "
                 "each: set XLA_FLAGS=--xla_gpu_enable_command_buffer= to see every kernel)")
  lines.append("op time per program (ms): " + ", ".join(
      f"{module} {seconds * 1e3:.0f}" for module, seconds in per_module.most_common()
      if seconds >= 5e-4))
  return "\n".join(lines)
