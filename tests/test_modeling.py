"""The model entry point: abstract model + shardings from anywhere, load_params from every source."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacer_jax import checkpoint, config_lib, modeling, optim, sharding, tree_utils
from spacer_jax.models import qwen2_5_vl

RULES = config_lib.FSDP_RULES


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(config_lib.MESH_FSDP)  # 8 CPU devices (conftest)


def test_abstract_model_under_a_mesh_context(mesh):
  """The start-up crash of training from an HF checkpoint: nnx.eval_shape under jax.set_mesh read
  the logical names as mesh axes. abstract_model works inside and outside the context alike."""
  cfg = qwen2_5_vl.tiny()
  outside = modeling.abstract_model(cfg, mesh=mesh, rules=RULES)
  with jax.set_mesh(mesh):
    inside = modeling.abstract_model(cfg, mesh=mesh, rules=RULES)
  assert outside.params.keys() == inside.params.keys()
  assert outside.shardings == inside.shardings
  # embed (56) -> fsdp (8 divides it); the vision tower's 36-wide dims are replicated (8 does not
  # divide them, one resolver decides: sharding.logical_to_spec).
  assert inside.params["model.embed_tokens.weight"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp")
  assert inside.logical["model.embed_tokens.weight"] == ("vocab", "embed")
  assert inside.params["visual.blocks.0.attn.qkv.weight"].sharding.spec == \
      jax.sharding.PartitionSpec()
  assert inside.param_count == tree_utils.param_count(inside.params)


def test_random_params_are_deterministic_fresh_and_sharded(mesh):
  cfg = qwen2_5_vl.tiny(hidden_size=64, num_attention_heads=4, mrope_section=(4, 2, 2))
  abstract = modeling.abstract_model(cfg, mesh=mesh, rules=RULES)
  a = modeling.load_params(modeling.RANDOM, abstract, seed=3)
  b = modeling.load_params(modeling.RANDOM, abstract, seed=3)
  c = modeling.load_params(modeling.RANDOM, abstract, seed=4)
  key = "model.layers.0.self_attn.q_proj.weight"
  np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  assert a[key] is not b[key]  # fresh buffers: the trainer donates the policy's
  assert not np.array_equal(np.asarray(a[key]), np.asarray(c[key]))
  for k, v in a.items():
    assert v.sharding == abstract.shardings[k] and v.dtype == jnp.float32, k
  # Norms start at one, biases at zero (the modules' own initialisers).
  np.testing.assert_array_equal(np.asarray(a["model.norm.weight"]), 1.0)
  np.testing.assert_array_equal(np.asarray(a["visual.blocks.0.attn.qkv.bias"]), 0.0)
  # In another storage dtype (the bf16 reference policy).
  r = modeling.load_params(modeling.RANDOM, abstract.with_param_dtype("bfloat16"), seed=3)
  assert r[key].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="only a train.py workdir has steps"):
    modeling.load_params(modeling.RANDOM, abstract, step=1)


def test_hf_directory(mesh, tmp_path):
  cfg = qwen2_5_vl.tiny(hidden_size=64, num_attention_heads=4, mrope_section=(4, 2, 2))
  model = qwen2_5_vl.init_model(cfg, seed=1)
  qwen2_5_vl.save_hf(model, str(tmp_path))
  want = tree_utils.split_model(model)[1]
  assert modeling.source_kind(tmp_path) == "hf"
  loaded = modeling.load_model(tmp_path, dtype="float32", mesh=mesh, rules=RULES)
  got = tree_utils.split_model(loaded)[1]
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  assert got["model.embed_tokens.weight"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert modeling.tokenizer_dir(tmp_path) == tmp_path
  # The architecture is checked before anything is read.
  cfg_json = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg_json, "model_type": "llava"}))
  with pytest.raises(ValueError, match=r"model_type='llava'.*Qwen2.5-VL"):
    modeling.load_model(tmp_path)


def _write_run(run, cfg, params_by_step):
  (run / "model_config.json").write_text(json.dumps(cfg.to_hf_dict()))
  ck = checkpoint.Checkpointer(run / "ckpt", use_async=False)
  for step, params in params_by_step.items():
    tx, _ = optim.make_optimizer(params, total_steps=2)
    ck.save(step, {"step": jnp.asarray(step, jnp.int32), "params": params,
                   "opt_state": tx.init(params), "rng": jax.random.PRNGKey(0)})
  ck.close()


def test_train_workdir(mesh, tmp_path):
  cfg = qwen2_5_vl.tiny()
  abstract = modeling.abstract_model(cfg)
  rng = np.random.default_rng(0)
  steps = {s: {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32))
               for k, v in abstract.params.items()} for s in (2, 4)}
  _write_run(tmp_path, cfg, steps)
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
  for where in (tmp_path, tmp_path / "ckpt"):
    assert modeling.source_kind(where) == "run"
    assert modeling.tokenizer_dir(where) == tmp_path / "tokenizer"
    model = modeling.load_model(where)  # latest step
    np.testing.assert_array_equal(np.asarray(model.model.norm.weight[...]),
                                  np.asarray(steps[4]["model.norm.weight"]))
  params = modeling.load_params(tmp_path, abstract, step=2)
  np.testing.assert_array_equal(np.asarray(params["lm_head.weight"]),
                                np.asarray(steps[2]["lm_head.weight"]))
  bf16 = modeling.load_model(tmp_path, dtype="bfloat16", mesh=mesh, rules=RULES)
  assert bf16.lm_head.weight[...].dtype == jnp.bfloat16
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    modeling.load_params(tmp_path, abstract, step=3)
  with pytest.raises(FileNotFoundError, match="no such directory"):
    modeling.load_model(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="do not match the model"):
    modeling.load_params(tmp_path, modeling.abstract_model(qwen2_5_vl.tiny(intermediate_size=41)))
  (tmp_path / "stray").mkdir()
  with pytest.raises(FileNotFoundError, match="neither a Hugging Face checkpoint"):
    modeling.source_kind(tmp_path / "stray")
