"""scripts/soak.py, short: a tiny PPO run in two processes (one SIGTERM stop), checked for
one metrics line per iteration, no compiling after a segment's first iteration, checkpoints
within keep + 1 steps' size, and RSS growth within the margin."""
import subprocess
import sys

from tests.conftest import ROOT, load_script


def test_short_soak_passes_its_checks(tmp_path):
  done = subprocess.run([sys.executable, "scripts/soak.py", "--iterations", "12", "--every", "2",
                         "--keep", "2", "--stops", "6", "--out", str(tmp_path / "soak")],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  assert "metrics.jsonl: 12 lines for 12 iterations; compilations after a segment's first " \
         "iteration: 0" in done.stdout
  assert "| from 7 | 10 |" in done.stdout and "stopped after iteration 6" in done.stderr


def test_the_soak_fails_when_its_checks_fail(tmp_path):
  """The checks read what a run leaves: a metrics line missing is reported."""
  import argparse
  import json
  soak = load_script("soak")
  out = tmp_path / "soak"
  (out / "run").mkdir(parents=True)
  (out / "run" / "metrics.jsonl").write_text("".join(
      json.dumps({"iteration": i}) + "\n" for i in (1, 2, 4)))
  rows = [{"segment_start": 1, "iteration": i, "compiled": int(i in (1, 3)), "run_mib": 1.0,
           "checkpoints_mib": 1.0 * i, "rss_mib": 100.0 + 50 * i} for i in range(1, 5)]
  (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _, failed = soak.check(argparse.Namespace(iterations=4, every=1, keep=1, out=str(out),
                                            rss_margin_mib=64.0))
  assert len(failed) == 4, failed
  assert "not 1..4 once each" in failed[0] and "iterations [3]" in failed[1]
  assert "checkpoints grew to 4.00 MiB" in failed[2] and "RSS grew 100.0 MiB" in failed[3]
