"""The compilation counter and the persistent compilation cache, across real processes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jax_nlu_ppo import cli
from jax_nlu_ppo import compiles

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def jax_cache_config(monkeypatch):
  """JAX's cache settings restored after the test, and no cache variables from outside."""
  import jax
  monkeypatch.delenv("JAX_NLU_PPO_COMPILE_CACHE", raising=False)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  yield jax.config
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_enable_compilation_cache", saved[1])


# One jitted program (min compile time 0: cache even a small one), then the counters.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from jax_nlu_ppo import compiles
compiles.use_persistent_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
before = compiles.count()
jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.ones((64, 32))).block_until_ready()
print(json.dumps({"built": compiles.count() - before, "hits": compiles.cache_hits(),
                  "seconds": compiles.seconds()}))
"""


def _run(cache: pathlib.Path) -> dict:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", PROGRAM, str(cache)], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  return json.loads(out.stdout.splitlines()[-1])


def test_second_process_loads_programs_from_the_cache(tmp_path):
  cache = tmp_path / "xla"
  first, second = _run(cache), _run(cache)
  assert first["hits"] == 0 and first["seconds"] > 0
  assert any(cache.iterdir())
  # The same programs, now loaded: still counted as built (so shape churn shows either way),
  # every one of them a cache hit (none compiled). Not a comparison of seconds: loading is
  # faster, but by how much is the machine's timing.
  assert second["built"] == first["built"] >= 1
  assert second["hits"] == second["built"]


def test_default_cache_folder_is_per_processor_under_the_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  folder = compiles.default_cache_dir()
  assert folder.parent == tmp_path / "jax_nlu_ppo" / "xla"
  assert folder == compiles.default_cache_dir()    # stable from call to call


@pytest.mark.parametrize("option, env, expected", [
    ("DIR", {}, "DIR"),
    (None, {"JAX_NLU_PPO_COMPILE_CACHE": "ENV"}, "ENV"),
    (None, {"JAX_COMPILATION_CACHE_DIR": "JAXENV"}, "JAXENV"),
    ("off", {"JAX_COMPILATION_CACHE_DIR": "JAXENV"}, None),
])
def test_compile_cache_option(tmp_path, monkeypatch, jax_cache_config, option, env, expected):
  """--compile-cache beats the environment; 'off' turns JAX's cache off even where its own
  variable is set."""
  for name, value in env.items():
    monkeypatch.setenv(name, str(tmp_path / value))
  args = cli._parser().parse_args(
      ["plan", "--config", "x.yaml"]
      + ([] if option is None else
         ["--compile-cache", option if option == "off" else str(tmp_path / option)]))
  used = compiles.configure_cache(args.compile_cache)
  assert used == (None if expected is None else str(tmp_path / expected))
  assert jax_cache_config.jax_enable_compilation_cache == (expected is not None)


def test_unusable_cache_folder(tmp_path, monkeypatch, jax_cache_config, capsys):
  """Given explicitly, an unusable folder is an error naming the option; the default (a
  read-only home, say) falls back to compiling afresh."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="--compile-cache"):
    compiles.configure_cache(str(blocker / "cache"))
  # On the command line: one line naming the option, exit code 2, before any work.
  from jax_nlu_ppo import cli
  assert cli.main(["plan", "--compile-cache", str(blocker / "cache"), "--no-compile"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error: --compile-cache" in err, err
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
  assert compiles.configure_cache(None) is None
  assert not jax_cache_config.jax_enable_compilation_cache
