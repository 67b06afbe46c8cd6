"""Counts XLA compilations through JAX's monitoring events, so that a run's metrics and the
benchmark can show that nothing recompiles after the first step (compile time is user time)."""
from __future__ import annotations

from jax import monitoring

_EVENT = "/jax/core/compile/backend_compile_duration"
_state = {"count": 0, "seconds": 0.0}


def _on_event(name: str, seconds: float, **_) -> None:
  if name == _EVENT:
    _state["count"] += 1
    _state["seconds"] += seconds


monitoring.register_event_duration_secs_listener(_on_event)


def count() -> int:
  """Backend compilations in this process so far (jitted steps and eager ops alike)."""
  return _state["count"]


def seconds() -> float:
  """Seconds spent in backend compilation so far."""
  return _state["seconds"]
