"""Text-decoder-level properties not covered by the HF parity tests: rematerialisation and the
layer scan give the same gradients, bfloat16 stays within a bound derived from bf16 rounding, M-RoPE checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spacer_jax.models import positions
from spacer_jax.models import qwen2_5_vl
from spacer_jax.models import text

GRID = np.array([[1, 6, 10]])  # 15 merged tokens


def _prompt(cfg, seed=0):
  rng = np.random.default_rng(seed)
  n_img = int(GRID.prod()) // 4
  row = np.concatenate([rng.integers(0, cfg.image_token_id, 4), [cfg.vision_start_token_id],
                        np.full(n_img, cfg.image_token_id), [cfg.vision_end_token_id],
                        rng.integers(0, cfg.image_token_id, 6)])
  ids = np.stack([row, np.roll(row, 2)])
  ids[1, :2] = cfg.pad_token_id
  mask = np.ones(ids.shape, bool)
  mask[1, :2] = False
  pix = rng.normal(size=(2 * int(GRID.prod()), 1176)).astype(np.float32)
  return ids, mask, pix


def _loss_fn(cfg, ids, mask, pix):
  grid = np.concatenate([GRID, GRID])
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid)
  pos, _ = positions.get_rope_index(ids, mask, grid, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id)
  weights = np.random.default_rng(9).normal(size=(*ids.shape, cfg.vocab_size)).astype(np.float32)

  def loss(model):
    feats = model.get_vision_features(pix, vis)
    hidden, _ = model.forward_embeds(model.embed(jnp.asarray(ids), feats),
                                     jnp.asarray(pos, jnp.int32), jnp.asarray(mask))
    return jnp.sum(model.logits(hidden) * weights * mask[..., None])

  return loss


def test_remat_gives_identical_gradients():
  """Same math with and without remat. XLA fuses the two programs differently and reassociates fp32
  sums (observed ~1e-4 relative on large-fan-in grads), so the check runs in float64, where any
  real difference (a missed residual, a wrong saved value) stays visible and rounding does not."""
  cfg = qwen2_5_vl.tiny(vision_depth=2)
  ids, mask, pix = _prompt(cfg)
  grads = []
  with jax.enable_x64(True):
    for use_remat in (False, True):
      c = dataclasses.replace(cfg, use_remat=use_remat)
      model = qwen2_5_vl.init_model(c, seed=5, dtype=jnp.float64, param_dtype=jnp.float64,
                                    init_std=0.2)
      grad_fn = nnx.jit(nnx.grad(_loss_fn(c, ids, mask, pix.astype(np.float64))))
      grads.append([(p, np.asarray(v.get_value())) for p, v in nnx.to_flat_state(grad_fn(model))])
  (a, b) = grads
  assert len(a) == len(b) > 0 and all(v.dtype == np.float64 for _, v in a)
  for (pa, va), (pb, vb) in zip(a, b):
    assert pa == pb
    np.testing.assert_allclose(vb, va, rtol=1e-9, atol=1e-9, err_msg=".".join(map(str, pa)))
  assert all(np.abs(v).max() > 0 for p, v in a if "blocks" in map(str, p))


@pytest.mark.parametrize("use_remat", [False, True])
def test_scan_layers_gives_identical_logits_and_gradients(use_remat):
  """The decoder as a lax.scan over stacked layer weights is the unrolled loop: same logits and
  gradients per (still per-layer) weight, in float64 for the reason given above."""
  cfg = qwen2_5_vl.tiny(vision_depth=2, num_hidden_layers=3, use_remat=use_remat)
  ids, mask, pix = _prompt(cfg)
  out = []
  with jax.enable_x64(True):
    for scan in (False, True):
      c = dataclasses.replace(cfg, scan_layers=scan)
      model = qwen2_5_vl.init_model(c, seed=5, dtype=jnp.float64, param_dtype=jnp.float64,
                                    init_std=0.2)
      loss = _loss_fn(c, ids, mask, pix.astype(np.float64))
      value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
      out.append((float(value), [(p, np.asarray(v.get_value()))
                                 for p, v in nnx.to_flat_state(grads)]))
  (va, a), (vb, b) = out
  np.testing.assert_allclose(vb, va, rtol=1e-12)
  assert len(a) == len(b) > 0
  for (pa, ga), (pb, gb) in zip(a, b):
    assert pa == pb
    np.testing.assert_allclose(gb, ga, rtol=1e-9, atol=1e-9, err_msg=".".join(map(str, pa)))
  assert all(np.abs(g).max() > 0 for p, g in b if "layers" in map(str, p))


def test_bf16_logits_within_rounding_bound(tmp_path):
  """bf16 compute vs fp32 compute on the same (bf16-representable) weights.

  Bound: bf16 has unit roundoff u = 2^-9. A logit passes through roughly 50 rounded ops on its way
  from pixels/embeddings (patch embed, 3 vision blocks, merger, 2 decoder layers, final norm, head;
  each norm, matmul, activation, residual add and attention stage rounds once). Independent
  roundings add up like a random walk, so one logit carries a relative error of about
  sqrt(50) * u ~ 7u of the logit scale; the max over all ~5k logits stays below 4.5 sigma, i.e.
  32u * max|logits|, and the mean absolute error below 4u * max|logits|. Weight rounding is
  excluded by rounding the fp32 weights to bf16 first.
  """
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg, seed=4, init_std=0.2)
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    v.set_value(v.get_value().astype(jnp.bfloat16).astype(jnp.float32))
  qwen2_5_vl.save_hf(model, str(tmp_path))
  m32 = qwen2_5_vl.load_hf(str(tmp_path), dtype=jnp.float32)
  m16 = qwen2_5_vl.load_hf(str(tmp_path), dtype=jnp.bfloat16)
  ids, mask, pix = _prompt(cfg)
  kw = dict(attention_mask=mask, pixel_values=pix, image_grid_thw=np.concatenate([GRID, GRID]))
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(m32(ids, **kw))
  got = np.asarray(m16(ids, **kw))
  assert got.dtype == np.float32
  u = 2.0 ** -9
  scale = np.abs(ref[mask]).max()
  err = np.abs(got - ref)[mask]
  assert err.max() <= 32 * u * scale, (err.max(), scale)
  assert err.mean() <= 4 * u * scale, (err.mean(), scale)
  assert err.max() > 0  # really computed in bf16


def test_mrope_text_positions_reduce_to_1d_rope():
  """With t == h == w the M-RoPE table equals a plain 1-D RoPE table (any mrope_section)."""
  pos = jnp.broadcast_to(jnp.arange(17)[None, None], (3, 1, 17))
  c, s = text.mrope_cos_sin(pos, head_dim=14, theta=1e6, mrope_section=(3, 2, 2),
                            dtype=jnp.float32)
  freq = 1.0 / (1e6 ** (np.arange(0, 14, 2, dtype=np.float32) / 14))
  ang = np.arange(17, dtype=np.float32)[:, None] * freq
  np.testing.assert_allclose(np.asarray(c[0]), np.cos(np.concatenate([ang, ang], -1)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(s[0]), np.sin(np.concatenate([ang, ang], -1)), atol=1e-6)
  with pytest.raises(ValueError, match="mrope_section"):
    text.mrope_cos_sin(pos, head_dim=14, theta=1e6, mrope_section=(3, 2, 1), dtype=jnp.float32)
