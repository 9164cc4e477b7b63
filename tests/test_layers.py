"""layers.py: HF layouts and logical axes, RMSNorm dtype semantics, attention masking, and the
activation-sharding hook (identity without a mesh, a real constraint under mesh + rules)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spacer_jax.models import layers
from spacer_jax.models import qwen2_5_vl


def test_linear_layout_and_axes():
  lin = layers.Linear(5, 7, use_bias=True, axes=("mlp", "embed"), rngs=nnx.Rngs(0))
  assert lin.weight.get_value().shape == (7, 5) and lin.bias.get_value().shape == (7,)
  assert lin.weight.get_metadata()["out_sharding"] == ("mlp", "embed")
  assert lin.bias.get_metadata()["out_sharding"] == ("mlp",)
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  w, b = np.asarray(lin.weight.get_value()), np.asarray(lin.bias.get_value())
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(lin(x)), x @ w.T + b, atol=1e-6)


def test_partition_specs_resolve_under_rules():
  model = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VL(qwen2_5_vl.tiny(), rngs=nnx.Rngs(0)))
  rules = (("embed", "fsdp"), ("vision_embed", "fsdp"), ("heads", "tp"), ("kv_heads", "tp"),
           ("mlp", "tp"), ("vocab", "tp"), ("vision_mlp", None), ("norm", None))
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}
  P = jax.sharding.PartitionSpec
  assert flat["model.layers.0.self_attn.q_proj.weight"] == P("tp", "fsdp")
  assert flat["model.layers.0.self_attn.o_proj.weight"] == P("fsdp", "tp")
  assert flat["model.layers.1.mlp.down_proj.weight"] == P("fsdp", "tp")
  assert flat["model.embed_tokens.weight"] == P("tp", "fsdp")
  assert flat["visual.blocks.0.attn.qkv.weight"] == P(None, "fsdp")
  assert flat["visual.patch_embed.proj.weight"] == P("fsdp", None, None, None, None)
  assert flat["model.norm.weight"] == P(None)


def test_rmsnorm_rounds_before_weight_in_bf16():
  norm = layers.RMSNorm(6, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  norm.weight.set_value(jnp.asarray([1.5, -0.7, 2.1, 0.3, 1.0, 0.9], jnp.bfloat16))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.bfloat16)
  x32 = np.asarray(x, np.float32)
  y = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6)
  ref = np.asarray(norm.weight.get_value()) * np.asarray(y.astype(jnp.bfloat16))  # bf16 product
  got = norm(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), ref.astype(jnp.bfloat16))


def test_attention_kv_lengths_equal_mask():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(3, 5, 4, 8)).astype(np.float32)
  k = rng.normal(size=(3, 5, 2, 8)).astype(np.float32)
  v = rng.normal(size=(3, 5, 2, 8)).astype(np.float32)
  lengths = np.array([5, 2, 1], np.int32)
  mask = (np.arange(5)[None, :] < lengths[:, None])[:, None, None, :]
  a = layers.attention(q, k, v, kv_lengths=lengths)
  b = layers.attention(q, k, v, mask=mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Row 2 only sees key 0: output is v[0] of its kv head (GQA: query heads 0,1 -> kv head 0).
  np.testing.assert_allclose(np.asarray(a)[2, :, 0], np.broadcast_to(v[2, 0, 0], (5, 8)),
                             atol=1e-6)


def test_constrain_is_identity_without_mesh_and_shards_with_one():
  x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
  assert layers.constrain(x, ("batch", "embed")) is x
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "fsdp"), ("embed", "tp"))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    y = jax.jit(lambda a: layers.constrain(a * 2, ("batch", "embed")))(x)
  assert y.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_shared_prefix_decode_attention_equals_attention_over_concatenation(dtype, atol):
  """Prefix (one copy per prompt, G rows each) + per-row suffix == plain attention of each row over
  its prompt's keys followed by its own keys, with left padding and unwritten suffix slots masked.
  bf16 tolerance: one bf16 rounding of the probabilities and of the output (|out| <= ~3)."""
  b, g, n, k, h, t, s = 2, 3, 8, 2, 16, 7, 5
  rng = np.random.default_rng(0)
  r = b * g
  q = rng.normal(size=(r, n, h)).astype(np.float32)
  pk, pv = (rng.normal(size=(b, t, k, h)).astype(np.float32) for _ in range(2))
  sk, sv = (rng.normal(size=(r, s, k, h)).astype(np.float32) for _ in range(2))
  prefix_mask = np.ones((b, t), bool)
  prefix_mask[1, :3] = False  # left padding of prompt 1
  suffix_len = 3  # slots 3, 4 unwritten: their (random) contents must not matter
  cast = lambda x: jnp.asarray(x, dtype)
  got = layers.shared_prefix_decode_attention(
      cast(q), cast(pk.transpose(0, 2, 3, 1)), cast(pv.transpose(0, 2, 1, 3)),
      jnp.asarray(prefix_mask), cast(sk.transpose(0, 2, 3, 1).reshape(r * k, h, s)),
      cast(sv.transpose(0, 2, 1, 3).reshape(r * k, s, h)),
      jnp.int32(suffix_len))
  keys = np.concatenate([np.repeat(pk, g, 0), sk], axis=1)  # [R, T + S, K, H]
  vals = np.concatenate([np.repeat(pv, g, 0), sv], axis=1)
  valid = np.concatenate([np.repeat(prefix_mask, g, 0),
                          np.broadcast_to(np.arange(s) < suffix_len, (r, s))], axis=1)
  want = jax.nn.dot_product_attention(
      jnp.asarray(q[:, None]), jnp.asarray(keys), jnp.asarray(vals),
      mask=jnp.asarray(valid[:, None, None, :]), scale=h ** -0.5)[:, 0]  # fp32 reference
  assert got.dtype == dtype and got.shape == (r, n, h)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=atol, rtol=0)
  # The unwritten suffix slots really are ignored.
  sk2 = sk.copy()
  sk2[:, suffix_len:] = 1e3
  got2 = layers.shared_prefix_decode_attention(
      cast(q), cast(pk.transpose(0, 2, 3, 1)), cast(pv.transpose(0, 2, 1, 3)),
      jnp.asarray(prefix_mask), cast(sk2.transpose(0, 2, 3, 1).reshape(r * k, h, s)),
      cast(sv.transpose(0, 2, 1, 3).reshape(r * k, s, h)),
      jnp.int32(suffix_len))
  np.testing.assert_array_equal(np.asarray(got2, np.float32), np.asarray(got, np.float32))
