"""Device mesh and logical-axis sharding.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...) in their NNX `out_sharding`
metadata; `config_lib.FSDP_RULES` / `FSDP_TP_RULES` map those names to mesh axes (`data`, `fsdp`,
`tensor`). Everything here works on a real `jax.sharding.Mesh` and on a `jax.sharding.AbstractMesh` (so
the 64-device layout of a 72B run can be checked on a laptop).

A mesh axis that does not evenly divide a dimension is dropped for that dimension (the dimension is
then replicated over it): jit rejects uneven shardings, and the tiny test model uses odd sizes on
purpose. `describe()` prints which parameters lost an axis this way.
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from spacer_jax import tree_utils


def make_mesh(axes, devices=None):
  """Builds a mesh from `[(name, size), ...]`; one size may be -1 (= all remaining devices).

  Axes are `AxisType.Auto` (jax >= 0.7 defaults to Explicit, which would force sharding-in-types on the
  model code). Use it with `jax.set_mesh(mesh)`.

  Args:
    axes: sequence of (axis name, size) pairs, e.g. `[("data", 1), ("fsdp", -1), ("tensor", 1)]`.
    devices: devices to use (default: all of `jax.devices()`).

  Returns:
    jax.sharding.Mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(str(n) for n, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {list(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh {list(axes)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"config.mesh {list(axes)} needs {math.prod(sizes)} devices but {len(devices)} are available; "
        "set one size to -1 or change config.mesh")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def make_abstract_mesh(axes):
  """An AbstractMesh of the given `[(name, size), ...]` (no -1), for layout checks without devices."""
  names = tuple(str(n) for n, _ in axes)
  sizes = tuple(int(s) for _, s in axes)
  return jax.sharding.AbstractMesh(sizes, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(shape, logical_names, mesh, rules):
  """PartitionSpec for an array of `shape` whose dims have `logical_names`, under `rules`.

  Args:
    shape: the array shape.
    logical_names: one logical name (or None) per dim; None or () means replicated.
    mesh: Mesh or AbstractMesh.
    rules: sequence of (logical name, mesh axis | tuple of mesh axes | None).

  Returns:
    PartitionSpec with, per dim, the mesh axes that divide it (axes that would not divide the dim, or
    that an earlier dim already uses, are dropped for that dim).
  """
  if not logical_names:
    return PartitionSpec()
  if len(logical_names) != len(shape):
    raise ValueError(f"logical axes {logical_names} do not match shape {tuple(shape)}")
  table = dict(rules)
  sizes = dict(mesh.shape)
  used = set()
  spec = []
  for dim, name in zip(shape, logical_names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; add it to config.sharding_rules "
                     f"(known: {sorted(table)})")
    target = table[name]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept = []
    for ax in axes:
      if ax not in sizes:
        raise KeyError(f"sharding rule {name!r} -> {ax!r}: mesh has no axis {ax!r} (axes: {list(sizes)})")
      if ax in used or sizes[ax] == 1:
        continue
      if dim % (math.prod(sizes[a] for a in kept) * sizes[ax]):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def logical_axes_of(variable):
  """Logical axis names stored on an NNX Variable (`out_sharding` metadata), or None."""
  meta = variable.get_metadata()
  names = meta.get("out_sharding", None)
  if names is None:
    names = meta.get("sharding_names", None)
  return None if names is None else tuple(names)


def param_logical_axes(state):
  """Flat `{key: logical axes}` for an NNX state (keys as `tree_utils.key_of`)."""
  out = {}
  for path, var in state.flat_state():
    out[tree_utils.key_of(path)] = logical_axes_of(var) if isinstance(var, nnx.Variable) else None
  return out


def tree_shardings(abstract_tree, mesh, rules, logical_axes=None):
  """NamedShardings for every leaf of an abstract tree.

  Args:
    abstract_tree: either an NNX State of Variables (logical names read from their metadata) or a
      flat `{key: ShapeDtypeStruct}` dict together with `logical_axes` `{key: names | None}`.
    mesh: Mesh or AbstractMesh.
    rules: logical -> mesh rules (`config_lib.FSDP_RULES` ...).
    logical_axes: for a flat dict, the logical names per key.

  Returns:
    Same structure as a flat dict `{key: NamedSharding}` (for a State input, keyed by `key_of(path)`).
  """
  if isinstance(abstract_tree, nnx.State):
    logical_axes = param_logical_axes(abstract_tree)
    abstract_tree = {tree_utils.key_of(p): v.get_value() if isinstance(v, nnx.Variable) else v
                     for p, v in abstract_tree.flat_state()}
  logical_axes = logical_axes or {}
  return {k: NamedSharding(mesh, logical_to_spec(np.shape(v), logical_axes.get(k), mesh, rules))
          for k, v in abstract_tree.items()}


def replicated(mesh):
  """A fully replicated NamedSharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, rules, shape):
  """Sharding of a batch array of `shape` along dim 0 (logical `batch`), other dims replicated."""
  names = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_spec(shape, names, mesh, rules))


def batch_shardings(tree, mesh, rules):
  """`batch_sharding` for every array leaf of a pytree (0-d leaves replicated)."""
  return jax.tree.map(
      lambda x: batch_sharding(mesh, rules, np.shape(x)) if np.ndim(x) else replicated(mesh), tree)


def constrain(x, logical_names, rules):
  """`with_sharding_constraint` of `x` to its logical axis names under `rules`, on the mesh set
  with `jax.set_mesh` (inside jit; the identity without a mesh). layers.constrain calls it with
  the rules of the enclosing `nnx.logical_axis_rules`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(x.shape, logical_names, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def describe(abstract_flat, shardings, logical_axes):
  """Startup table: `key | shape | dtype | logical axes | PartitionSpec` (one line per param)."""
  lines = [f"{'param':60s} {'shape':22s} {'dtype':9s} {'logical':28s} spec"]
  for k, v in abstract_flat.items():
    lines.append(f"{k:60s} {str(tuple(v.shape)):22s} {str(v.dtype):9s} "
                 f"{str(logical_axes.get(k)):28s} {shardings[k].spec}")
  return "\n".join(lines)

