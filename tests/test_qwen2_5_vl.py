"""Root model: logits parity with transformers' Qwen2_5_VLForConditionalGeneration on a tiny random
model (save_pretrained -> load_hf), KV cache consistency, placeholder checks, config parsing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ATOL_LAYER, ATOL_MODEL
from spacer_jax.models import positions
from spacer_jax.models import qwen2_5_vl
from spacer_jax.models import text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------
# Shared helpers (also imported by the other model test files).


def make_hf_model(cfg, seed=0):
  """Random-initialised transformers model for `cfg`, with every weight (norms and biases too)
  redrawn so that a wrong layout or a missing bias cannot hide behind the default init (ones /
  zeros). Matrices get std 1/sqrt(fan_in) so activations stay O(1) and the absolute fp32
  tolerances keep their meaning (fp32 rounding grows with the output magnitude)."""
  d = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
  hf_cfg = transformers.Qwen2_5_VLConfig(**d)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).float().eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and ("norm" in name or "ln_q" in name):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
  return model


@pytest.fixture(scope="module")
def tiny_cfg():
  return qwen2_5_vl.tiny()


@pytest.fixture(scope="module")
def tiny_hf(tiny_cfg, tmp_path_factory):
  """(hf_model, dir) with the tiny model saved by save_pretrained."""
  model = make_hf_model(tiny_cfg)
  path = tmp_path_factory.mktemp("tiny_hf")
  model.save_pretrained(path)
  return model, str(path)


def text_ids(rng, cfg, b, t):
  """Random ids below the special tokens (no placeholders)."""
  return rng.integers(0, cfg.image_token_id, size=(b, t))


def hf_logits(model, ids, mask, position_ids=None, **kw):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask).long(),
                position_ids=None if position_ids is None else torch.as_tensor(position_ids),
                **kw)
  return out.logits.float().numpy()


# ------------------------------------------------------------------------------------------------
# Text path.


@pytest.mark.hf
def test_text_only_logits_left_padded(tiny_hf):
  hf, path = tiny_hf
  model = qwen2_5_vl.load_hf(path, dtype=jnp.float32)
  cfg = model.config
  rng = np.random.default_rng(0)
  ids = text_ids(rng, cfg, 2, 13)
  mask = np.ones_like(ids, bool)
  mask[1, :4] = False  # left padding
  pos, deltas = positions.get_rope_index(ids, mask, image_token_id=cfg.image_token_id,
                                         video_token_id=cfg.video_token_id)
  np.testing.assert_array_equal(deltas, [0, 0])
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(ids, attention_mask=mask))
  ref = hf_logits(hf, ids, mask, position_ids=pos)
  assert ours.shape == (2, 13, cfg.vocab_size) and ours.dtype == np.float32
  np.testing.assert_allclose(ours[mask], ref[mask], atol=ATOL_MODEL, rtol=0)
  # An unpadded row equals HF's own default positions (arange) too.
  ref0 = hf_logits(hf, ids[:1], mask[:1])
  np.testing.assert_allclose(ours[0], ref0[0], atol=ATOL_MODEL, rtol=0)


@pytest.mark.hf
def test_decoder_layer_matches_hf(tiny_hf):
  hf, path = tiny_hf
  model = qwen2_5_vl.load_hf(path, dtype=jnp.float32)
  cfg = model.config
  rng = np.random.default_rng(1)
  b, t = 2, 11
  x = rng.normal(size=(b, t, cfg.hidden_size)).astype(np.float32)
  pos = np.broadcast_to(np.stack([np.arange(t), np.arange(t) * 2, np.arange(t) + 3])[:, None],
                        (3, b, t)).copy()
  hf_text = hf.model.language_model
  with torch.no_grad():
    xt = torch.as_tensor(x)
    cos, sin = hf_text.rotary_emb(xt, torch.as_tensor(pos))
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    ref = hf_text.layers[0](xt, attention_mask=causal, position_embeddings=(cos, sin))
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
  c, s = text.mrope_cos_sin(jnp.asarray(pos), head_dim=cfg.head_dim, theta=cfg.rope_theta,
                            mrope_section=cfg.mrope_section, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=1e-6)
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  with jax.default_matmul_precision("highest"):
    ours, _ = model.model.layers[0](jnp.asarray(x), c, s, mask)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL_LAYER, rtol=0)


@nnx.jit
def _cached_step(model, ids, pos, kv_mask, cache, cache_index):
  h, cache = model.forward_embeds(model.embed(ids), pos, kv_mask, cache=cache,
                                  cache_index=cache_index)
  return model.logits(h), cache


def test_kv_cache_matches_full_forward():
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg, seed=3, init_std=0.2)
  rng = np.random.default_rng(2)
  b, t, extra = 2, 9, 4
  ids = text_ids(rng, cfg, b, t + extra)
  mask = np.ones((b, t + extra), bool)
  mask[0, :3] = False
  pos, _ = positions.get_rope_index(ids, mask, image_token_id=cfg.image_token_id,
                                    video_token_id=cfg.video_token_id)
  pos = pos.astype(np.int32)
  with jax.default_matmul_precision("highest"):
    full = np.asarray(model(ids, attention_mask=mask))
    cache_len = t + extra + 3  # a few never-written slots, masked by kv_mask
    kv_mask = np.zeros((b, cache_len), bool)
    kv_mask[:, :t + extra] = mask
    cache = text.init_cache(cfg, b, cache_len, jnp.float32)
    logits, cache = _cached_step(model, ids[:, :t], pos[:, :, :t], kv_mask, cache, jnp.int32(0))
    steps = [logits]
    for k in range(t, t + extra):
      logits, cache = _cached_step(model, ids[:, k:k + 1], pos[:, :, k:k + 1], kv_mask, cache,
                                   jnp.int32(k))
      steps.append(logits)
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  np.testing.assert_allclose(got[mask], full[mask], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Config.


def test_config_from_flat_4x_and_nested_5x(tiny_cfg):
  nested = tiny_cfg.to_hf_dict()
  assert qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(nested) == tiny_cfg
  t = nested["text_config"]
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  # A 4.x config.json keeps model_type "qwen2_5_vl" at the top (the text one is a 5.x sub-config).
  flat.update({k: v for k, v in t.items() if k not in ("rope_parameters", "model_type")})
  flat["rope_theta"] = t["rope_parameters"]["rope_theta"]
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": t["rope_parameters"]["mrope_section"]}
  flat["vision_config"] = dict(nested["vision_config"], model_type="qwen2_5_vl", in_chans=3,
                               spatial_patch_size=14)
  del flat["vision_config"]["rope_parameters"]
  assert qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(json.loads(json.dumps(flat))) == tiny_cfg


def test_tiny_accepts_custom_vocab_and_token_ids():
  cfg = qwen2_5_vl.tiny(vocab_size=300, image_token_id=5, video_token_id=6,
                        vision_start_token_id=7, vision_end_token_id=8, eos_token_id=(9, 10),
                        pad_token_id=0)
  assert cfg.vocab_size == 300 and cfg.eos_token_id == (9, 10)
  with pytest.raises(ValueError, match="text_after_vision"):
    qwen2_5_vl.tiny(text_after_vision="hf4")


# ------------------------------------------------------------------------------------------------
# Multimodal logits.

IMAGE = [1, 10, 14]  # 5x7 merged tokens: ragged 2x2-token windows
VIDEO = [4, 6, 10]  # 8 frames


def _row(cfg, *parts, seed=0):
  """A prompt row: ints are runs of random text, ("img"|"vid", grid) are vision blocks."""
  rng = np.random.default_rng(seed)
  out = []
  for p in parts:
    if isinstance(p, tuple):
      kind, (t, h, w) = p
      tok = cfg.image_token_id if kind == "img" else cfg.video_token_id
      out += [cfg.vision_start_token_id] + [tok] * (t * h * w // 4) + [cfg.vision_end_token_id]
    else:
      out += rng.integers(0, cfg.image_token_id, size=p).tolist()
  return np.asarray(out)


def _pixels(grids, seed):
  n = sum(int(np.prod(g)) for g in grids)
  return np.random.default_rng(seed).normal(size=(n, 3 * 2 * 14 * 14)).astype(np.float32)


def _left_pad(rows, pad_id):
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad_id, np.int64)
  mask = np.zeros((len(rows), width), bool)
  for b, r in enumerate(rows):
    ids[b, width - len(r):] = r
    mask[b, width - len(r):] = True
  return ids, mask


CASES = {
    # name: (rows, image grids, video grids, seconds per grid)
    "image": ([("T", 6), ("img", IMAGE), ("T", 9)], [IMAGE], [], []),
    "video": ([("T", 5), ("vid", VIDEO), ("T", 8)], [], [VIDEO], [1.0]),
    "image_and_video": ([("T", 4), ("img", IMAGE), ("T", 3), ("vid", VIDEO), ("T", 6)],
                        [IMAGE], [VIDEO], [2 / 3]),
}


def _case_inputs(cfg, name):
  parts, images, videos, seconds = CASES[name]
  parts = [p[1] if p[0] == "T" else p for p in parts]
  ids, mask = _left_pad([_row(cfg, *parts)], cfg.pad_token_id)
  return ids, mask, images, videos, seconds


def _run_both(hf, model, ids, mask, images, videos, seconds):
  cfg = model.config
  kw_ours, kw_hf = {}, {}
  if images:
    pix = _pixels(images, 1)
    kw_ours.update(pixel_values=pix, image_grid_thw=np.asarray(images))
    kw_hf.update(pixel_values=torch.as_tensor(pix), image_grid_thw=torch.as_tensor(images))
  if videos:
    pix = _pixels(videos, 2)
    kw_ours.update(pixel_values_videos=pix, video_grid_thw=np.asarray(videos),
                   second_per_grid_ts=np.asarray(seconds, np.float32))
    kw_hf.update(pixel_values_videos=torch.as_tensor(pix), video_grid_thw=torch.as_tensor(videos),
                 second_per_grid_ts=torch.as_tensor(seconds, dtype=torch.float32))
  types = (ids == cfg.image_token_id) * 1 + (ids == cfg.video_token_id) * 2
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(ids, attention_mask=mask, **kw_ours))
  ref = hf_logits(hf, ids, mask, mm_token_type_ids=torch.as_tensor(types), **kw_hf)
  return ours, ref


@pytest.fixture(scope="module")
def hf5_model(tiny_hf):
  return qwen2_5_vl.load_hf(tiny_hf[1], dtype=jnp.float32, text_after_vision="hf5")


@pytest.mark.hf
@pytest.mark.parametrize("name", list(CASES))
def test_multimodal_logits_match_hf(tiny_hf, hf5_model, name):
  hf, _ = tiny_hf
  ids, mask, images, videos, seconds = _case_inputs(hf5_model.config, name)
  ours, ref = _run_both(hf, hf5_model, ids, mask, images, videos, seconds)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=ATOL_MODEL, rtol=0)


@pytest.mark.hf
def test_left_padded_multimodal_batch_matches_hf(tiny_hf, hf5_model):
  hf, _ = tiny_hf
  cfg = hf5_model.config
  rows = [_row(cfg, 4, ("img", IMAGE), 3, ("vid", VIDEO), 6, seed=3),
          _row(cfg, 2, ("vid", [2, 4, 6]), 5, seed=4)]
  ids, mask = _left_pad(rows, cfg.pad_token_id)
  assert not mask[1].all()
  ours, ref = _run_both(hf, hf5_model, ids, mask, [IMAGE], [VIDEO, [2, 4, 6]], [1.0, 0.5])
  np.testing.assert_allclose(ours[mask], ref[mask], atol=ATOL_MODEL, rtol=0)


@pytest.mark.hf
def test_image_logits_default_rule_matches_hf(tiny_hf):
  """For images both rules give the same positions, so the default model matches HF too."""
  hf, path = tiny_hf
  model = qwen2_5_vl.load_hf(path, dtype=jnp.float32)
  assert model.config.text_after_vision == "qwen"
  ours, ref = _run_both(hf, model, *_case_inputs(model.config, "image"))
  np.testing.assert_allclose(ours, ref, atol=ATOL_MODEL, rtol=0)


def test_placeholder_mismatch_raises_before_compute():
  cfg = qwen2_5_vl.tiny()
  ids = _row(cfg, 3, ("img", IMAGE), 2)[None]
  with pytest.raises(ValueError, match="image placeholders and features do not match"):
    qwen2_5_vl.check_placeholder_counts(cfg, ids, [[1, 10, 12]])
  with pytest.raises(ValueError, match="video placeholders"):
    qwen2_5_vl.check_placeholder_counts(cfg, ids, [IMAGE], [[2, 4, 4]])
  with pytest.raises(ValueError, match="pixel rows"):
    qwen2_5_vl.check_placeholder_counts(cfg, ids, [IMAGE], num_image_rows=139)
  model = qwen2_5_vl.init_model(cfg)
  with pytest.raises(ValueError, match="do not match"):
    model(ids, pixel_values=_pixels([[1, 10, 12]], 0), image_grid_thw=np.asarray([[1, 10, 12]]))


@pytest.mark.hf
def test_default_rule_differs_from_hf5_after_video(tiny_hf):
  """The video parity above really depends on the rule: the default ("qwen") positions text after
  a long video differently, which moves the logits there."""
  hf, path = tiny_hf
  model = qwen2_5_vl.load_hf(path, dtype=jnp.float32)
  ids, mask, images, videos, seconds = _case_inputs(model.config, "video")
  ours, ref = _run_both(hf, model, ids, mask, images, videos, seconds)
  end = int(np.nonzero(ids[0] == model.config.vision_end_token_id)[0][0])
  np.testing.assert_allclose(ours[0, :end], ref[0, :end], atol=ATOL_MODEL, rtol=0)
  assert np.abs(ours[0, end:] - ref[0, end:]).max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Real sizes, abstractly.

# transformers' counts (docs/qwen2_5_vl.md, "Configurations").
PARAM_COUNTS = {"3b": 3_754_622_976, "7b": 8_292_166_656, "32b": 33_452_718_336,
                "72b": 73_410_777_344}


@pytest.mark.parametrize("size", list(PARAM_COUNTS))
def test_eval_shape_param_count(size):
  cfg = getattr(qwen2_5_vl, f"qwen2p5_vl_{size}")()
  model = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0),
                                                       param_dtype=jnp.bfloat16))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert sum(int(np.prod(v.get_value().shape)) for _, v in params) == PARAM_COUNTS[size]
  assert all(v.get_metadata().get("out_sharding") is not None for _, v in params)
  assert (model.lm_head is None) == (size == "3b")
