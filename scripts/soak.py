"""A long PPO run on a tiny random model, stopped and continued, watched for slow leaks:

    python scripts/soak.py [--iterations 200] [--every 5] [--keep 2] [--stops 70,140]
                           [--out runs/soak] [--rss-margin-mib 64]

Each segment is a process of its own that trains until the next stop, where it sends itself
SIGTERM (a preemption at a known step: it saves and exits 0); the next segment continues the run
with the same command. Every 10 iterations a segment records its resident memory (RSS), the run
folder's size and its checkpoints' size; every iteration, whether anything compiled. Then it
checks, and prints a table:
  * metrics.jsonl has exactly one line per iteration, 1..N, after the stops;
  * nothing compiles after a segment's first iteration;
  * the checkpoints (`keep` steps) stay within keep + 1 steps' size, whatever N is;
  * RSS grows by less than the margin between a segment's second sample and its last.
Exits 1 if a check fails. Compiled programs are cached under OUT/compile_cache, so later
segments load them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_EVERY = 10


def _rss_mib() -> float:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status (the soak reads Linux's)")


def _size_mib(folder: pathlib.Path) -> float:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def worker(args) -> int:
  """One segment: train until `args.stop_at`, recording samples to OUT/samples.jsonl."""
  sys.path.insert(0, str(ROOT))
  import dataclasses
  from jax_nlu_ppo.rl import trainer as trainer_lib
  from tests import checkpoint_run

  run_dir = pathlib.Path(args.out) / "run"
  config = dataclasses.replace(
      checkpoint_run.make_config(run_dir, every_steps=args.every, keep=args.keep),
      steps=args.iterations)
  trainer = trainer_lib.PPOTrainer(config, lm=checkpoint_run.tiny_lm(),
                                   train_examples=checkpoint_run.EXAMPLES)
  first = trainer.iteration + 1
  samples = open(pathlib.Path(args.out) / "samples.jsonl", "a")

  def on_step(metrics):
    it = trainer.iteration
    row = {"segment_start": first, "iteration": it, "compiled": metrics["jit/compilations"],
           "run_mib": _size_mib(run_dir), "checkpoints_mib": _size_mib(run_dir / "checkpoints")}
    if it % SAMPLE_EVERY == 0 or it == first:
      row["rss_mib"] = _rss_mib()
    samples.write(json.dumps(row) + "\n")
    samples.flush()
    if it == args.stop_at - 1 and args.stop_at < args.iterations:
      # Handled by the trainer: the next iteration finishes, is saved, and the process exits 0.
      os.kill(os.getpid(), signal.SIGTERM)

  trainer.train(on_step=on_step)
  return 0


def check(args) -> tuple[list[str], list[str]]:
  """(table lines, failed checks) from the run folder and the samples."""
  out = pathlib.Path(args.out)
  rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
  metrics = [json.loads(x)["iteration"]
             for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
  failed = []
  if metrics != list(range(1, args.iterations + 1)):
    failed.append(f"metrics.jsonl iterations are not 1..{args.iterations} once each: "
                  f"{len(metrics)} lines")
  late = [r["iteration"] for r in rows if r["iteration"] > r["segment_start"] and r["compiled"]]
  if late:
    failed.append(f"compiled after a segment's first iteration at iterations {late}")
  sampled = [r for r in rows if "rss_mib" in r]
  # The first checkpoint on disk, alone (a step's save lands after its sample).
  one_step = next((r["checkpoints_mib"] for r in rows if r["checkpoints_mib"] > 0), None)
  largest = max(r["checkpoints_mib"] for r in rows)
  if one_step is None or largest > (args.keep + 1) * one_step:
    failed.append(f"checkpoints grew to {largest:.2f} MiB, over {args.keep + 1} x one step's "
                  f"{one_step} MiB")
  lines = ["| segment | iteration | RSS MiB | run folder MiB | checkpoints MiB |",
           "|---|---|---|---|---|"]
  for r in sampled:
    lines.append(f"| from {r['segment_start']} | {r['iteration']} | {r['rss_mib']:.0f} | "
                 f"{r['run_mib']:.2f} | {r['checkpoints_mib']:.2f} |")
  for start in sorted({r["segment_start"] for r in sampled}):
    seg = [r for r in sampled if r["segment_start"] == start]
    if len(seg) >= 3:
      growth = seg[-1]["rss_mib"] - seg[1]["rss_mib"]
      lines.append(f"\nsegment from iteration {start}: RSS {seg[1]['rss_mib']:.0f} MiB at "
                   f"iteration {seg[1]['iteration']} -> {seg[-1]['rss_mib']:.0f} MiB at "
                   f"{seg[-1]['iteration']} ({growth:+.1f} MiB)")
      if growth > args.rss_margin_mib:
        failed.append(f"RSS grew {growth:.1f} MiB in the segment from iteration {start}, over "
                      f"the {args.rss_margin_mib} MiB margin")
  lines.append(f"\nmetrics.jsonl: {len(metrics)} lines for {args.iterations} iterations; "
               f"compilations after a segment's first iteration: {len(late)}; checkpoints: "
               f"{one_step:.2f} MiB for one step, at most {largest:.2f} MiB (keep {args.keep})")
  return lines, failed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--iterations", type=int, default=200)
  parser.add_argument("--every", type=int, default=5, help="checkpoint every N iterations")
  parser.add_argument("--keep", type=int, default=2, help="checkpoints kept")
  parser.add_argument("--stops", default="70,140", help="iterations that end a segment")
  parser.add_argument("--out", default="runs/soak")
  parser.add_argument("--rss-margin-mib", type=float, default=64.0)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args)

  out = pathlib.Path(args.out)
  if out.exists() and any(out.iterdir()):
    parser.error(f"--out {out} is not empty: the soak starts a run of its own")
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(out / "compile_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  stops = [int(s) for s in args.stops.split(",") if s] + [args.iterations]
  for stop in stops:
    print(f"segment until iteration {stop}", flush=True)
    done = subprocess.run([sys.executable, __file__, "--worker", "--stop-at", str(stop),
                           "--iterations", str(args.iterations), "--every", str(args.every),
                           "--keep", str(args.keep), "--out", str(out)], env=env)
    if done.returncode != 0:
      print(f"the segment until iteration {stop} exited with {done.returncode}", file=sys.stderr)
      return 1
  lines, failed = check(args)
  print("\n".join(lines))
  for problem in failed:
    print(f"FAILED: {problem}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
