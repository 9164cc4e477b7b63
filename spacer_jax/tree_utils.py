"""Pytree helpers: HF-style key names for NNX paths, flat param dicts, counts.

The trainer keeps parameters as a flat `{"visual.blocks.3.attn.qkv.weight": array}` dict: the keys are
the HF checkpoint keys (docs/qwen2_5_vl.md, "Weight names"), which makes freeze regexes, logging
and checkpoints readable, and orbax stores a flat dict of strings without any int-key ambiguity.
"""


import jax
import numpy as np
from flax import nnx


def key_of(path):
  """Joins an NNX/jax path into a dotted key: ('visual', 'blocks', 3, 'attn') -> 'visual.blocks.3.attn'."""
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      p = p.key
    elif isinstance(p, jax.tree_util.SequenceKey):
      p = p.idx
    elif isinstance(p, jax.tree_util.GetAttrKey):
      p = p.name
    parts.append(str(p))
  return ".".join(parts)


def split_model(model):
  """Splits an NNX model into (graphdef, flat params `{key: array}`, paths `{key: path tuple}`).

  Only `nnx.Param` variables are returned; a model holding other state (RNG counters, caches) raises,
  because the train step would silently drop it.
  """
  # No filter: the graphdef is the one sampling.Sampler gets from nnx.split(model), so the same
  # flat params rebuild a State for either.
  graphdef, state = nnx.split(model)
  leftover = [key_of(p) for p, v in state.flat_state()
              if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)]
  if leftover:
    raise ValueError(f"model has non-Param state the trainer would drop: {leftover[:5]}")
  flat, paths = {}, {}
  for path, var in state.flat_state():
    k = key_of(path)
    flat[k] = var.get_value() if isinstance(var, nnx.Variable) else var
    paths[k] = tuple(path)
  return graphdef, flat, paths


def to_state(flat, paths):
  """Flat `{key: array}` -> nnx.State with the model's nesting (no copies)."""
  return nnx.State.from_flat_path([(paths[k], v) for k, v in flat.items()])


def merge_model(graphdef, flat, paths):
  """Inverse of `split_model`: rebuilds the NNX module from the flat dict (works under jit)."""
  return nnx.merge(graphdef, to_state(flat, paths))


def param_count(tree):
  """Number of scalars in all array leaves (works on ShapeDtypeStructs)."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def bytes_per_device(tree):
  """Bytes one device holds of the array leaves (their shard shape; arrays or ShapeDtypeStructs
  with a sharding; a leaf without one counts whole)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total
