"""Strict safetensors loading and save_hf: exact key coverage, errors that list every offender,
both key layouts, sharded checkpoints, bf16, and a save -> transformers round trip."""

import json
import os
import shutil
import struct

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


# ------------------------------------------------------------------------------------------------
# Loading validates before it reads: one clear error naming the file and the key per defect.


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
  """A tiny random checkpoint written by save_hf, single-file and sharded (no torch needed)."""
  model = qwen2_5_vl.init_model(qwen2_5_vl.tiny(), seed=5)
  single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
  qwen2_5_vl.save_hf(model, str(single))
  qwen2_5_vl.save_hf(model, str(sharded), max_shard_bytes=60_000)
  return str(single), str(sharded)


def _raw(filename):
  """(header dict, data bytes) of a safetensors file."""
  with open(filename, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), f.read()


def _write_raw(filename, header, data, header_bytes=None):
  blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
  with open(filename, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_config(d, edit):
  path = os.path.join(d, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)
  return "config.json", None


def _edit_header(d, edit):
  """Applies edit(header, data) -> (header, data, header_bytes) to model.safetensors."""
  path = os.path.join(d, "model.safetensors")
  header, data = _raw(path)
  _write_raw(path, *edit(header, data))
  return "model.safetensors"


def _first_key(header):
  return sorted(k for k in header if k != "__metadata__")[0]


def _shift(header, key, delta):
  header[key]["data_offsets"] = [o + delta for o in header[key]["data_offsets"]]
  return header


def _set_value(d, key, value):
  """Overwrites the first element of tensor `key` in the single-file checkpoint."""
  path = os.path.join(d, "model.safetensors")
  header, data = _raw(path)
  info = header[key]
  dtype = hf_weights._DTYPES[info["dtype"]]
  data = bytearray(data)
  start = info["data_offsets"][0]
  data[start:start + np.dtype(dtype).itemsize] = np.asarray([value], dtype).tobytes()
  _write_raw(path, header, bytes(data))


def _case_model_type(d):
  _edit_config(d, lambda c: c.update(model_type="llava",
                                     architectures=["LlavaForConditionalGeneration"]))
  return "config.json", "model_type='llava'"


def _case_architecture(d):
  _edit_config(d, lambda c: c.update(architectures=["Qwen2VLForConditionalGeneration"]))
  return "config.json", "Qwen2VLForConditionalGeneration"


def _case_no_vision_config(d):
  _edit_config(d, lambda c: c.pop("vision_config"))
  return "config.json", "no vision_config"


def _case_missing_field(d):
  _edit_config(d, lambda c: c["text_config"].pop("num_hidden_layers"))
  return "config.json", "lacks the field 'num_hidden_layers'"


def _case_truncated(d):
  path = os.path.join(d, "model.safetensors")
  header, _ = _raw(path)
  last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  return "model.safetensors", f"tensor {last}: truncated"


def _case_header_length(d):
  path = os.path.join(d, "model.safetensors")
  with open(path, "r+b") as f:
    f.write(struct.pack("<Q", 1 << 40))
  return "model.safetensors", "corrupt header length"


def _case_not_json(d):
  _edit_header(d, lambda h, data: (h, data, b"{not json" + b" " * 7))
  return "model.safetensors", "not valid JSON"


def _case_out_of_range(d):
  key = []

  def edit(h, data):
    key.append(max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"]))
    return _shift(h, key[0], 64), data, None

  _edit_header(d, edit)
  return "model.safetensors", f"tensor {key[0]}: truncated"


def _case_wrong_span(d):
  key = []

  def edit(h, data):
    key.append(_first_key(h))
    h[key[0]]["data_offsets"][1] -= 4
    return h, data, None

  _edit_header(d, edit)
  return "model.safetensors", f"tensor {key[0]}: data_offsets"


def _case_overlap(d):
  key = []

  def edit(h, data):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
    key.append(names[1])
    return _shift(h, names[1], -4), data, None

  _edit_header(d, edit)
  return "model.safetensors", f"overlaps"


def _case_unknown_dtype(d):
  key = []

  def edit(h, data):
    key.append(_first_key(h))
    h[key[0]]["dtype"] = "Q4"
    return h, data, None

  _edit_header(d, edit)
  return "model.safetensors", f"tensor {key[0]}: unknown dtype 'Q4'"


def _case_nan(d):
  _set_value(d, "model.layers.1.mlp.down_proj.weight", np.nan)
  return "model.safetensors", "tensor model.layers.1.mlp.down_proj.weight holds 1 non-finite"


def _case_inf(d):
  _set_value(d, "visual.merger.mlp.0.bias", -np.inf)
  return "model.safetensors", "tensor visual.merger.mlp.0.bias holds 1 non-finite"


def _case_index_missing_file(d):
  files = sorted(n for n in os.listdir(d) if n.startswith("model-"))
  with open(os.path.join(d, "model.safetensors.index.json")) as f:
    key = sorted(k for k, v in json.load(f)["weight_map"].items() if v == files[1])[0]
  os.remove(os.path.join(d, files[1]))
  return "model.safetensors.index.json", f"{files[1]} (for {key}"


def _case_index_wrong_file(d):
  path = os.path.join(d, "model.safetensors.index.json")
  with open(path) as f:
    index = json.load(f)
  key = "model.norm.weight"
  other = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})[0]
  index["weight_map"][key] = other
  with open(path, "w") as f:
    json.dump(index, f)
  return "model.safetensors.index.json", f"tensor {key} is listed in {other}"


LOAD_ERRORS = [  # (case, sharded checkpoint?)
    (_case_model_type, False), (_case_architecture, False), (_case_no_vision_config, False),
    (_case_missing_field, False), (_case_truncated, False), (_case_header_length, False),
    (_case_not_json, False), (_case_out_of_range, False), (_case_wrong_span, False),
    (_case_overlap, False), (_case_unknown_dtype, False), (_case_nan, False), (_case_inf, False),
    (_case_index_missing_file, True), (_case_index_wrong_file, True),
]


@pytest.mark.parametrize("case,sharded", LOAD_ERRORS, ids=[c.__name__[6:] for c, _ in LOAD_ERRORS])
def test_load_errors_name_the_file_and_key(good_ckpt, tmp_path, case, sharded):
  d = _copy(good_ckpt[sharded], str(tmp_path / "ckpt"))
  filename, fragment = case(d)
  with pytest.raises(ValueError) as e:
    qwen2_5_vl.load_hf(d)
  msg = str(e.value)
  assert os.path.join(d, filename) in msg, msg
  assert fragment in msg, msg


def test_checkpoint_error_before_any_tensor_is_read(good_ckpt, tmp_path, monkeypatch):
  """A defect in the last file is reported before the first file's data is touched."""
  d = _copy(good_ckpt[1], str(tmp_path / "ckpt"))
  last = sorted(n for n in os.listdir(d) if n.startswith("model-"))[-1]
  with open(os.path.join(d, last), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(d, last)) - 1)
  read = []
  monkeypatch.setattr(hf_weights, "read_safetensors",
                      lambda *a, **k: read.append(a) or iter(()))
  with pytest.raises(hf_weights.CheckpointError, match=last):
    qwen2_5_vl.load_hf(d)
  assert not read


def test_save_casts_dtype_and_replaces_old_files(good_ckpt, tmp_path):
  model = qwen2_5_vl.load_hf(good_ckpt[0])
  out = str(tmp_path / "out")
  qwen2_5_vl.save_hf(model, out, max_shard_bytes=60_000)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  qwen2_5_vl.save_hf(model, out, dtype="bfloat16")  # one file now: the old shards must go
  assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  assert hf_weights.checkpoint_dtype(out) == ml_dtypes.bfloat16
  a, b = _params(model), _params(qwen2_5_vl.load_hf(out))
  assert all(np.array_equal(a[k].astype(ml_dtypes.bfloat16).astype(np.float32), b[k]) for k in a)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("value,finite", [(1.0, True), (-0.0, True), (6e4, True), (np.nan, False),
                                          (np.inf, False), (-np.inf, False)])
def test_check_finite_every_float_dtype(dtype, value, finite):
  x = np.array([[0.5, value], [2.0, -3.0]], dtype)
  if finite:
    hf_weights._check_finite(x, "f.safetensors", "k")
  else:
    with pytest.raises(hf_weights.CheckpointError, match="f.safetensors: tensor k holds 1 non"):
      hf_weights._check_finite(x, "f.safetensors", "k")
  hf_weights._check_finite(np.zeros((0, 2), dtype), "f.safetensors", "k")  # empty slice
