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


# ------------------------------------------------------------------------------------------------
# The tiny model on 8 simulated devices vs 1 device.
# ------------------------------------------------------------------------------------------------
import functools  # noqa: E402

import optax  # noqa: E402

from spacer_jax import grpo, optim, rollout, sampling, train  # noqa: E402


def _tiny_batch(cfg, model, rows_per_prompt=4, num_prompts=2, new_tokens=5, seed=0):
  """A TrainBatch of `num_prompts` 2-frame video prompts x G random completions (host numpy)."""
  rng = np.random.default_rng(seed)
  grid = np.array([[2, 4, 4]] * num_prompts)
  ntok = 2 * 4 * 4 // 4
  prompts = [[cfg.vision_start_token_id] + [cfg.video_token_id] * ntok + [cfg.vision_end_token_id]
             + list(rng.integers(0, 100, 3 + 2 * i)) for i in range(num_prompts)]
  t = max(map(len, prompts))
  ids = np.full((num_prompts, t), cfg.pad_token_id)
  mask = np.zeros((num_prompts, t), bool)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):], mask[i, t - len(p):] = p, True
  pv = rng.normal(size=(int(np.prod(grid, 1).sum()), 1176)).astype(np.float32)
  sampler = sampling.Sampler(model)
  prepared = sampler.prepare(ids, mask, pixel_values_videos=pv, video_grid_thw=grid,
                             second_per_grid_ts=np.ones(num_prompts))
  r = num_prompts * rows_per_prompt
  comp = rng.integers(0, 100, (r, new_tokens)).astype(np.int32)
  lengths = rng.integers(1, new_tokens + 1, r)
  tb = rollout.assemble(prepared, comp, lengths, rows_per_prompt)
  tb["advantages"] = rng.normal(size=r).astype(np.float32)
  return tb


def _logits_fn(graphdef, paths):
  def f(params, tb):
    model = train.tree_utils.merge_model(graphdef, params, paths)
    rows = {k: tb[k] for k in ("completion_ids", "attention_mask", "position_ids", "prompt_index")}
    return train._row_logits(model, train._prompt_embeds(model, tb), rows)  # pylint: disable=protected-access
  return f


def _put(tb, mesh, rules):
  batched = train.ROW_KEYS + ("prompt_ids", "prompt_mask")
  repl = sharding.replicated(mesh)
  return jax.device_put(tb, {k: (sharding.batch_shardings(v, mesh, rules) if k in batched
                                 else jax.tree.map(lambda _: repl, v)) for k, v in tb.items()})


@pytest.fixture(scope="module")
def tiny():
  # Odd sizes on purpose: some dims split over fsdp/tensor, others fall back to replication.
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg)  # host init: no XLA random-number program to compile
  graphdef, flat, paths = tree_utils.split_model(model)
  logical = sharding.param_logical_axes(nnx.split(model)[1])
  return cfg, model, graphdef, flat, paths, logical


@pytest.mark.parametrize("axes", [MESHES_8["fsdp_tp"], MESHES_8["fsdp"]],
                         ids=["fsdp4_tensor2", "fsdp8"])
def test_tiny_forward_sharded_equals_single_device(tiny, axes):
  cfg, model, graphdef, flat, paths, logical = tiny
  tb = _tiny_batch(cfg, model)
  f = _logits_fn(graphdef, paths)
  one = np.asarray(jax.jit(f)(flat, tb))
  mesh = sharding.make_mesh(axes)
  rules = PRESETS["fsdp_tp" if dict(axes)["tensor"] > 1 else "fsdp"]
  shardings = sharding.tree_shardings(flat, mesh, rules, logical)
  assert any(s.spec != jax.P() for s in shardings.values())  # something is really split
  with jax.set_mesh(mesh):
    params = jax.device_put(flat, shardings)
    out = jax.jit(f)(params, _put(tb, mesh, rules))
  np.testing.assert_allclose(np.asarray(out), one, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_train_step_loss_and_update_same_on_1_and_8_devices(tiny):
  cfg, model, graphdef, flat, paths, logical = tiny
  tb = _tiny_batch(cfg, model)
  keys = optim.trainable_keys(flat)
  # Plain SGD with lr 1: the parameter change *is* the gradient, so the comparison below checks the
  # gradients elementwise (Adam's first step, lr * g / |g|, would amplify noise where g ~ 0).
  tx = optax.sgd(1.0)
  ref = np.asarray(jax.jit(functools.partial(train.token_logps, graphdef=graphdef, paths=paths))(
      flat, tb)) - 0.05
  step = functools.partial(train.train_step, graphdef=graphdef, paths=paths, tx=tx,
                           trainable_keys=tuple(keys), mode="grpo", grpo_config=grpo.GRPOConfig())

  def state_of(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init({k: params[k] for k in keys}), "rng": jax.random.PRNGKey(0)}

  s1, m1 = jax.jit(step)(state_of(dict(flat)), tb, jnp.asarray(ref))
  mesh = sharding.make_mesh(MESHES_8["fsdp_tp"])
  rules = PRESETS["fsdp_tp"]
  with jax.set_mesh(mesh):
    params = jax.device_put(flat, sharding.tree_shardings(flat, mesh, rules, logical))
    s8, m8 = jax.jit(step)(state_of(params), _put(tb, mesh, rules),
                           jax.device_put(jnp.asarray(ref), sharding.batch_sharding(mesh, rules, ref.shape)))
  for k in ("loss", "grad_norm", "entropy", "update_norm", "param_norm"):
    np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  # k3 of a 0.05 log-ratio is ~1e-3; fp32 noise in the log-probs (~1e-7) is absolute, not relative.
  np.testing.assert_allclose(float(m8["kl"]), float(m1["kl"]), atol=1e-7)
  assert float(m1["kl"]) > 0
  for k in flat:
    np.testing.assert_allclose(np.asarray(s8["params"][k]), np.asarray(s1["params"][k]), atol=1e-5,
                               rtol=0, err_msg=k)
