"""Strict safetensors loading and save_hf: exact key coverage, errors that list every offender,
both key layouts, sharded checkpoints, bf16, and a save -> transformers round trip."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from spacer_jax.models import hf_weights
from spacer_jax.models import qwen2_5_vl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_qwen2_5_vl import make_hf_model  # noqa: E402


def _params(model):
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  cfg = qwen2_5_vl.tiny()
  hf = make_hf_model(cfg, seed=11)
  path = str(tmp_path_factory.mktemp("hfw"))
  hf.save_pretrained(path)
  return hf, path


@pytest.mark.hf
def test_load_is_exact_copy(hf_pair):
  hf, path = hf_pair
  model = qwen2_5_vl.load_hf(path, dtype=jnp.float32)
  ours = _params(model)
  theirs = {hf_weights.apply_aliases(k.replace("model.language_model.", "model.")
                                     .replace("model.visual.", "visual.")): v.detach().numpy()
            for k, v in hf.state_dict().items()}
  assert set(ours) == set(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


@pytest.mark.hf
def test_new_transformers_layout_loads(hf_pair, tmp_path):
  hf, path = hf_pair
  hf.save_pretrained(tmp_path, save_original_format=False)
  with open(tmp_path / "config.json") as f:
    assert f.read()
  keys = [k for k, _ in hf_weights.safetensors_items(str(tmp_path))]
  assert any(k.startswith("model.language_model.") for k in keys)
  a, b = _params(qwen2_5_vl.load_hf(path)), _params(qwen2_5_vl.load_hf(str(tmp_path)))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _rewrite(src, dst, edit):
  """Copies a single-file checkpoint applying edit(dict) -> dict to its tensors."""
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(cfg)
  tensors = edit({k: np.array(v) for k, v in hf_weights.safetensors_items(src)})
  hf_weights._write_file(os.path.join(dst, "model.safetensors"), sorted(tensors.items()))


@pytest.mark.hf
def test_strict_errors_list_every_offender(hf_pair, tmp_path):
  _, path = hf_pair

  def edit(t):
    del t["model.norm.weight"]
    del t["visual.blocks.2.attn.qkv.bias"]
    t["model.extra.weight"] = np.zeros(3, np.float32)
    t["visual.merger.mlp.0.bias"] = np.zeros(5, np.float32)
    return t

  _rewrite(path, str(tmp_path), edit)
  with pytest.raises(KeyError) as e:
    qwen2_5_vl.load_hf(str(tmp_path))
  msg = str(e.value)
  for key in ("model.norm.weight", "visual.blocks.2.attn.qkv.bias", "model.extra.weight",
              "visual.merger.mlp.0.bias"):
    assert key in msg, key
  assert "missing (2)" in msg and "unexpected (1)" in msg and "wrong shape (1)" in msg


@pytest.mark.hf
def test_save_round_trip_through_transformers(hf_pair, tmp_path):
  hf, path = hf_pair
  model = qwen2_5_vl.load_hf(path)
  out = str(tmp_path / "saved")
  qwen2_5_vl.save_hf(model, out, max_shard_bytes=200_000)  # force a sharded checkpoint
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  again = _params(qwen2_5_vl.load_hf(out))
  ref = _params(model)
  assert all(np.array_equal(again[k], ref[k]) for k in ref)
  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out, attn_implementation="eager").eval()
  theirs, mine = hf.state_dict(), reloaded.state_dict()
  assert theirs.keys() == mine.keys()
  assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
  ids = torch.as_tensor(np.random.default_rng(0).integers(0, 100, (1, 12)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(input_ids=ids).logits.numpy(),
                                  hf(input_ids=ids).logits.numpy())


def test_bf16_save_load_and_tied_head(tmp_path):
  cfg = qwen2_5_vl.tiny(tie_word_embeddings=True)
  model = qwen2_5_vl.init_model(cfg, seed=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.lm_head is None
  qwen2_5_vl.save_hf(model, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["tie_word_embeddings"] is True
  keys = dict(hf_weights.safetensors_items(str(tmp_path)))
  assert "lm_head.weight" not in keys and keys["model.norm.weight"].dtype == ml_dtypes.bfloat16
  loaded = qwen2_5_vl.load_hf(str(tmp_path), dtype=jnp.bfloat16)
  a, b = _params(model), _params(loaded)
  assert all(np.array_equal(a[k], b[k]) and b[k].dtype == ml_dtypes.bfloat16 for k in a)


def test_load_into_mesh_shards_params(tmp_path):
  """With a mesh and rules every param is placed directly into its NamedSharding."""
  cfg = qwen2_5_vl.tiny(vocab_size=132, intermediate_size=38, vision_intermediate_size=30)
  qwen2_5_vl.save_hf(qwen2_5_vl.init_model(cfg), str(tmp_path))
  devices = np.asarray(jax.devices()[:4]).reshape(2, 2)
  mesh = jax.sharding.Mesh(devices, ("fsdp", "tp"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("vision_embed", "fsdp"), ("mlp", "tp"), ("heads", "tp"),
           ("kv_heads", "tp"), ("vocab", "tp"), ("vision_mlp", None), ("norm", None))
  model = qwen2_5_vl.load_hf(str(tmp_path), mesh=mesh, rules=rules)
  w = model.model.layers[0].mlp.gate_proj.weight.get_value()
  assert w.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
  assert model.model.norm.weight.get_value().sharding.spec == jax.sharding.PartitionSpec()  # replicated
  # Dimensions the mesh does not divide (odd tiny sizes) are replicated instead of failing.
  odd = tmp_path / "odd"
  qwen2_5_vl.save_hf(qwen2_5_vl.init_model(qwen2_5_vl.tiny()), str(odd))
  model = qwen2_5_vl.load_hf(str(odd), mesh=mesh, rules=rules)
  w = model.model.layers[0].mlp.gate_proj.weight.get_value()  # [37, 56]
  assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
