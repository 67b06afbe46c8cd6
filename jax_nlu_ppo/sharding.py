"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters name their axes where they are created (`vocab`, `embed`, `heads`, ... in model.py,
`lora` in lora.py); batches and activations use `batch` and `length`. `MeshConfig.rules` maps
each logical name to mesh axes (MaxText's scheme):

    batch -> (data, fsdp)   the samples of a step are split over both data-parallel axes
    embed -> fsdp           parameters are split along the model dimension (ZeRO-3 / FSDP)
    heads, kv_heads, mlp, vocab -> tensor   Megatron-style tensor parallelism
    everything else (head_dim, layers, lora, norm, length) -> replicated

Every `NamedSharding` of the trainer comes from `logical_sharding`, so the table above is the
only place a mesh axis is chosen. Bad meshes and rules fail in `check_*` with a message that
says what to change, before anything is compiled.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple; () replicates). Overridden per name by `MeshConfig.rules`.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
    "layers": (),
    "lora": (),
}


class ShardingError(ValueError):
  """A mesh, rule or shape that cannot be sharded; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: all remaining devices) and overrides of `DEFAULT_RULES`.

  The defaults put every device on `fsdp`: parameters and batches split evenly, which suits a
  single host of any size. `rules` maps a logical name to a list of mesh axes (or [] / null to
  replicate), e.g. `{embed: [], mlp: [tensor]}`.
  """
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    sizes = self.axis_sizes
    for axis, size in sizes.items():
      if size == 0 or size < -1:
        raise ShardingError(f"mesh.{axis} must be a positive size or -1 (the rest), got {size}")
    if list(sizes.values()).count(-1) > 1:
      raise ShardingError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for name, axes in self.rules.items():
      if name not in DEFAULT_RULES:
        raise ShardingError(f"mesh.rules.{name}: unknown logical axis (known: "
                            f"{', '.join(DEFAULT_RULES)})")
      axes = _as_axes(axes, f"mesh.rules.{name}")
      if len(set(axes)) != len(axes):
        raise ShardingError(f"mesh.rules.{name} names a mesh axis twice: {list(axes)}")

  @property
  def axis_sizes(self) -> dict[str, int]:
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

  @property
  def logical_rules(self) -> dict[str, tuple[str, ...]]:
    return DEFAULT_RULES | {name: _as_axes(axes, name) for name, axes in self.rules.items()}

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """Axis sizes for `num_devices`, the -1 axis resolved; an error says how to fix a mismatch."""
    sizes = self.axis_sizes
    fixed = math.prod(s for s in sizes.values() if s != -1)
    described = " x ".join(f"{a}={s}" for a, s in sizes.items())
    if -1 in sizes.values():
      if num_devices % fixed:
        raise ShardingError(f"mesh {described} cannot use {num_devices} devices: {fixed} does "
                            f"not divide {num_devices}; change the fixed axis sizes")
      sizes = {a: num_devices // fixed if s == -1 else s for a, s in sizes.items()}
    elif fixed != num_devices:
      raise ShardingError(f"mesh {described} needs {fixed} devices but {num_devices} are "
                          "available; set one axis to -1 to take the rest")
    return tuple(sizes[a] for a in MESH_AXES)


def _as_axes(axes: Any, key: str) -> tuple[str, ...]:
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ShardingError(f"{key}: unknown mesh axis {unknown[0]!r} (mesh axes: "
                        f"{', '.join(MESH_AXES)})")
  return axes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  # Auto axes: shardings are given at jit boundaries and GSPMD propagates them inside.
  types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, types, devices=devices)


@dataclasses.dataclass(frozen=True)
class LogicalMesh:
  """A device mesh with its rules from logical axis names ("batch", "heads", ...) to mesh axes:
  everything needed to turn logical names into shardings."""
  jax_mesh: Mesh
  rules: dict[str, tuple[str, ...]]

  @classmethod
  def create(cls, config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> LogicalMesh:
    return cls(make_mesh(config, devices), config.logical_rules)

  def __hash__(self) -> int:
    # Hashable, so that a jitted function can take it as a static argument.
    return hash((self.jax_mesh, tuple((k, tuple(v)) for k, v in sorted(self.rules.items()))))

  def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None,
           what: str = "array") -> PartitionSpec:
    """The `PartitionSpec` of an array whose axes have logical `names`.

    Mesh axes of size 1 are left out. A mesh axis used by two of the array's axes, or an axis
    size the mesh axes do not divide, is a `ShardingError` naming `what`.
    """
    used: dict[str, str] = {}
    parts = []
    for i, name in enumerate(names):
      axes = tuple(a for a in self.rules.get(name, ()) if self.jax_mesh.shape[a] > 1) if name else ()
      for axis in axes:
        if axis in used:
          raise ShardingError(f"{what}: logical axes {used[axis]!r} and {name!r} both map to "
                              f"mesh axis {axis!r}; change mesh.rules so that one of them "
                              "does not")
        used[axis] = name
      if shape is not None and axes:
        ways = math.prod(self.jax_mesh.shape[a] for a in axes)
        if shape[i] % ways:
          raise ShardingError(f"{what}: axis {name!r} of size {shape[i]} cannot be split "
                              f"{ways} ways over mesh axes {'x'.join(axes)}; choose mesh sizes "
                              f"that divide it, or map {name!r} elsewhere in mesh.rules")
      parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while parts and parts[-1] is None:
      parts.pop()
    return PartitionSpec(*parts)

  def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None,
               what: str = "array") -> NamedSharding:
    return NamedSharding(self.jax_mesh, self.spec(names, shape, what))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.jax_mesh, PartitionSpec())

  def replicate(self, host_value) -> jax.Array:
    """A host value (NumPy array or scalar) as a global array on every device: what a
    multi-process checkpoint can save, unlike a single-device array."""
    return place(np.asarray(host_value), self.replicated)

  def batch(self, ndim: int = 1) -> NamedSharding:
    """Leading axis over the batch rule, the rest replicated (prompts, responses, rewards)."""
    return self.sharding(("batch",) + (None,) * (ndim - 1))

  @property
  def batch_ways(self) -> int:
    return math.prod(self.jax_mesh.shape[a] for a in self.rules.get("batch", ()))

  def tree(self, tree: Any, strict: bool = True) -> Any:
    """Shardings for every array of a tree of `nnx.Variable`s (or plain arrays), by their names.

    A variable's `out_sharding` names give its sharding when they match its rank; anything
    else (step counters, PRNG keys) is replicated. Not `strict` (optimizer states, whose
    factored moments keep a parameter's names but not its shape), an array its names cannot
    split is replicated instead of an error.
    """
    def leaf_sharding(path, x):
      names = None
      if isinstance(x, nnx.Variable):
        names = x.get_metadata().get("out_sharding")
        value = x.get_value()
      else:
        value = x
      shape = getattr(value, "shape", ())
      sharding = self.replicated
      if names and len(names) == len(shape):
        try:
          sharding = self.sharding(names, shape, what=jax.tree_util.keystr(path))
        except ShardingError:
          if strict:
            raise
      return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

    return jax.tree_util.tree_map_with_path(
        leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def check_batch(self, size: int, what: str) -> None:
    if size % self.batch_ways:
      raise ShardingError(f"{what} ({size}) must be divisible by the data-parallel ways of the "
                          f"mesh ({self.batch_ways} = {self._batch_axes()}); change it or the "
                          "mesh")

  def _batch_axes(self) -> str:
    return " x ".join(f"{a}={self.jax_mesh.shape[a]}" for a in self.rules.get("batch", ()))


def check_model(mesh: LogicalMesh, config) -> None:
  """Heads and KV heads must split evenly over the axes their rules name (`LlamaConfig`)."""
  for name, size in (("heads", config.num_heads), ("kv_heads", config.num_kv_heads)):
    axes = [a for a in mesh.rules.get(name, ()) if mesh.jax_mesh.shape[a] > 1]
    ways = math.prod(mesh.jax_mesh.shape[a] for a in axes)
    if size % ways:
      raise ShardingError(
          f"the model has {size} {name.replace('_', ' ')}, which the mesh's "
          f"{' x '.join(f'{a}={mesh.jax_mesh.shape[a]}' for a in axes)} cannot split; use a "
          f"tensor size that divides {size}, or set mesh.rules.{name}: []")


def place(tree: Any, shardings: Any) -> Any:
  """`tree` on the devices of `shardings`; host arrays (NumPy) go straight to their shards.

  In a multi-process run each process keeps only the shards its devices hold, so no host ever
  holds another host's part on device.
  """
  def put(x, sharding):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


# Activation constraints. The model marks its residual stream with logical names through
# `constrain`; it does nothing unless a step traced the model inside `activations(mesh)`.
_ACTIVE: contextvars.ContextVar[LogicalMesh | None] = contextvars.ContextVar("mesh", default=None)


def with_activations(mesh: LogicalMesh | None, fn: Callable) -> Callable:
  """`fn` tracing the model's activation constraints for `mesh` (`constrain`), set inside the
  function that is jitted, so that its programs never depend on the caller's context."""
  def traced(*args, **kwargs):
    with activations(mesh):
      return fn(*args, **kwargs)
  # The function's own name, for its programs (`jit_rollout`, ...) in profiles.
  traced.__name__ = getattr(fn, "__name__", None) or fn.func.__name__
  return traced


@contextlib.contextmanager
def activations(mesh: LogicalMesh | None):
  token = _ACTIVE.set(mesh)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding its logical `names` map to, when tracing under a mesh."""
  mesh = _ACTIVE.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, mesh.sharding(names))
