"""Counts XLA compilations through JAX's monitoring events, so that a run's metrics and the
benchmark can show that nothing recompiles after the first step (compile time is user time),
and keeps compiled programs on disk between runs (JAX's persistent compilation cache)."""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import platform

import jax
from jax import monitoring

log = logging.getLogger(__name__)

# Timed around "compile or load from the persistent cache": fires for cache hits too.
_BUILT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_state = {"built": 0, "hits": 0, "seconds": 0.0}
MIN_COMPILE_SECONDS = 0.2


def _on_duration(name: str, seconds: float, **_) -> None:
  if name == _BUILT:
    _state["built"] += 1
    _state["seconds"] += seconds


def _on_event(name: str, **_) -> None:
  if name == _CACHE_HIT:
    _state["hits"] += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def count() -> int:
  """Programs built in this process so far, jitted steps and eager ops alike: compiled, or
  loaded from the persistent cache (a program loaded after the first step is shape churn all
  the same)."""
  return _state["built"]


def cache_hits() -> int:
  """Programs loaded from the persistent compilation cache instead of compiled."""
  return _state["hits"]


def seconds() -> float:
  """Seconds spent building programs so far (compiling, or loading from the cache)."""
  return _state["seconds"]


def default_cache_dir() -> pathlib.Path:
  """Under the user's cache folder, one folder per processor type: JAX's cache key names the
  platform but not the CPU's instruction-set extensions, and XLA refuses a CPU program built
  for features this processor lacks (a home folder shared by different cluster nodes)."""
  root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
  flags = ""
  try:
    flags = next((line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith(("flags", "Features"))), "")
  except OSError:
    pass
  cpu = hashlib.sha256((platform.processor() + flags).encode()).hexdigest()[:12]
  return root / "jax_nlu_ppo" / "xla" / f"{platform.machine()}-{cpu}"


def use_persistent_cache(directory: str | os.PathLike) -> str:
  """Keeps compiled programs in `directory` (created if missing) so that the next run with the
  same shapes loads them instead of compiling. Call before the first compilation. Returns the
  folder. It is trusted: whoever can write to it can run code in this process."""
  pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  # JAX's default keeps only programs that took a second or more to compile, which leaves out
  # steps that take most of a second on a fast machine; eager ops (milliseconds) stay out.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return jax.config.jax_compilation_cache_dir


def configure_cache(option: str | None) -> str | None:
  """The persistent compilation cache's folder from --compile-cache, the environment or the
  default (`default_cache_dir`), put to use; None when it is off."""
  choice = (option or os.environ.get("JAX_NLU_PPO_COMPILE_CACHE")
            or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir())
  if str(choice).lower() != "off":
    try:
      return use_persistent_cache(choice)
    except OSError as e:
      if option:
        raise ValueError(f"--compile-cache {option}: cannot use it as a folder ({e})") from e
      log.warning("compiling afresh: the compilation cache folder %s is unusable (%s)", choice, e)
  jax.config.update("jax_enable_compilation_cache", False)
  return None
