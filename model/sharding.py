"""The one place where logical axis names meet the physical mesh ('data', 'fsdp', 'tensor', 'sequence').

Model code names logical axes only: parameters carry them as metadata, activations are
constrained with `shard(x, ('activation_batch', 'activation_length', 'activation_embed'))`.
A rules table (config data) maps each logical name to mesh axes. A dimension that a mesh axis
does not divide is left replicated on that axis (kv heads fewer than the tensor axis, a batch of
2 on 8 data shards), so any model runs on any mesh; only the memory split changes.
"""

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical name -> mesh axes, tried in order; a mesh axis is used at most once per array.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", ("sequence",)),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_head_dim", ()),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
    ("activation_cache_length", ()),  # the KV cache's slots (model/kv_cache.py)
    # Parameters.
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("norm", ("fsdp",)),  # fully sharded: every weight, norms too (their all-gather is a [D] vector)
)

Rules = Sequence[tuple[str, Sequence[str] | str | None]]


def resolve_mesh_sizes(axis_sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
  """{axis: size} for all of MESH_AXES, with a -1 (at most one) taking the devices left over."""
  unknown = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh has unknown axis {unknown}; the axes are {MESH_AXES}")
  sizes = {axis: axis_sizes.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{axis}={size!r} must be a positive int or -1 (the rest)")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh axes {free} are all -1; at most one axis may take the rest")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if device_count % fixed:
      raise ValueError(
          f"mesh.{free[0]}=-1 cannot take the rest: the other axes multiply to {fixed}, "
          f"which does not divide the device count {device_count}"
      )
    sizes[free[0]] = device_count // fixed
  if math.prod(sizes.values()) != device_count:
    raise ValueError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there are {device_count} devices")
  return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor', 'sequence') from sizes; one size may be -1 (the rest).

  Axes are AxisType.Auto: jax 0.10's make_mesh defaults to Explicit axes, which ordinary model
  code (with_sharding_constraint, jit out_shardings) does not expect.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_sizes(axis_sizes, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # topology-aware placement is an optimization; any order is correct
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def with_default_rules(rules: Rules) -> tuple[tuple[str, Sequence[str] | str | None], ...]:
  """`rules` plus the default rule of every logical name it lacks (rules saved by older runs)."""
  named = {logical for logical, _ in rules}
  return tuple(rules) + tuple(rule for rule in DEFAULT_RULES if rule[0] not in named)


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    bad = [axis for axis in mesh_axes if axis not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule {logical!r} names unknown mesh axes {bad}; the axes are {MESH_AXES}")
    table[logical] = tuple(mesh_axes)
  return table


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`.

  A mesh axis is used only where it divides what is left of the dimension, and at most once.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    chosen = []
    for axis in table.get(name, ()) if name is not None else ():
      axis_size = mesh.shape[axis]
      if axis in used or axis_size == 1 or size % (axis_size * math.prod(mesh.shape[a] for a in chosen)):
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh
  rules: Rules


_CONTEXT: list[_Context] = []


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Within this context (at trace time), `shard` constrains activations on `mesh` by `rules`."""
  _rules_dict(rules)  # validate early, outside any trace
  _CONTEXT.append(_Context(mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.pop()


def current_context() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the innermost `axis_rules`, or None outside one."""
  return (_CONTEXT[-1].mesh, _CONTEXT[-1].rules) if _CONTEXT else None


def shard(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside `axis_rules`."""
  if not _CONTEXT:  # no mesh, nothing to constrain: single-device runs
    return x
  context = _CONTEXT[-1]
  spec = logical_to_spec(logical_axes, x.shape, context.mesh, context.rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(context.mesh, spec))


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names stored on a variable (the metadata key moved across flax versions)."""
  metadata = variable.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if metadata.get(key) is not None:
      return tuple(metadata[key])
  return None


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
  """NamedShardings for every variable of an (abstract) state, from its logical axis metadata."""

  def one(variable):
    axes = variable_logical_axes(variable)
    shape = variable.get_value().shape
    if axes is None:
      axes = (None,) * len(shape)
    return variable.replace(NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_module, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Builds `make_module()` with every variable born on its shard: no unsharded copy ever exists.

  `make_module` is a no-argument function returning an nnx.Module (it owns its rngs).
  """
  abstract = nnx.eval_shape(make_module)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  init = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)
  with axis_rules(mesh, rules):
    state = init()
  return nnx.merge(graphdef, state)


def to_host(x) -> np.ndarray:
  """x as a numpy array, whole on every process: an array whose shards live on other processes
  (a batch sharded over a multi-host mesh) is gathered from all of them, a collective that every
  process must reach in the same order."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def place(module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
  """Moves every variable of `module` onto its shards, by its logical axes (in place); arrays
  already where they belong stay put."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(module, jax.device_put(state, shardings))


def place_in_context(module) -> None:
  """`place` on the mesh and rules of the innermost `axis_rules`; nothing outside one."""
  context = current_context()
  if context is not None:
    place(module, *context)
