"""Tests for spacer_jax.sampling: exactness against transformers' generate and against full forwards,
G-fold cache repetition, sampling filters, reproducibility, sharding and compile counts.

Tiny random Qwen2.5-VL models are built with transformers + save_pretrained and loaded with
qwen2_5_vl.load_hf, so both sides share the same weights.
"""

import dataclasses
import functools

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spacer_jax import grpo
from spacer_jax import sampling
from spacer_jax.models import positions
from spacer_jax.models import qwen2_5_vl
from spacer_jax.models import text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128
IMAGE_ID, VIDEO_ID, VISION_PAD_ID = 120, 121, 117
VISION_START, VISION_END = 118, 119
EOS_ID, PAD_ID = 122, 123
PLACEHOLDERS = [IMAGE_ID, VIDEO_ID, VISION_PAD_ID]
TEXT_IDS = 100  # ordinary text tokens are drawn from [0, 100)
# Same mapping as config_lib.FSDP_RULES: hidden dims over fsdp, everything else replicated.
FSDP_RULES = (("batch", ("data", "fsdp")), ("seq", None), ("embed", "fsdp"),
              ("vision_embed", "fsdp"), ("heads", None), ("kv_heads", None), ("mlp", None),
              ("vision_mlp", None), ("vocab", None), ("norm", None))


def _hf_config():
  return transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                        "rope_theta": 1e6},
                       tie_word_embeddings=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       bos_token_id=PAD_ID),
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                         out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                         tokens_per_second=2),
      image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_token_id=VISION_PAD_ID,
      vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
      eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=PAD_ID, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """(torch model, checkpoint dir) with random weights."""
  torch.manual_seed(0)
  hf = transformers.Qwen2_5_VLForConditionalGeneration(_hf_config()).eval()
  # Larger random weights than the 0.02 default give peaked, well-separated logits.
  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 0.15)
  d = tmp_path_factory.mktemp("tiny_qwen")
  hf.save_pretrained(d)
  return hf, str(d)


@pytest.fixture(scope="module")
def model(hf_pair):
  return qwen2_5_vl.load_hf(hf_pair[1], dtype=jnp.float32)


@pytest.fixture(scope="module")
def model_hf5(hf_pair):
  return qwen2_5_vl.load_hf(hf_pair[1], dtype=jnp.float32, text_after_vision="hf5")


def _text_batch(rng, lengths, total=None):
  """Left-padded int32[B, T] prompts of ordinary text ids and their mask."""
  total = total or max(lengths)
  ids = np.full((len(lengths), total), PAD_ID, np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for b, n in enumerate(lengths):
    ids[b, total - n:] = rng.integers(0, TEXT_IDS, n)
    mask[b, total - n:] = 1
  return ids, mask


def _vision_batch(rng, rows, image_grids=None, video_grids=None):
  """Left-padded prompts from per-row segment lists ("text", n) / ("image", k) / ("video", k), where
  k indexes the grids; returns ids, mask and the HF processor-style vision kwargs."""
  seqs = []
  for row in rows:
    seq = []
    for kind, arg in row:
      if kind == "text":
        seq += rng.integers(0, TEXT_IDS, arg).tolist()
      else:
        grid = (image_grids if kind == "image" else video_grids)[arg]
        tok = IMAGE_ID if kind == "image" else VIDEO_ID
        seq += [VISION_START] + [tok] * (int(np.prod(grid)) // 4) + [VISION_END]
    seqs.append(seq)
  total = max(len(q) for q in seqs)
  ids = np.full((len(seqs), total), PAD_ID, np.int32)
  mask = np.zeros((len(seqs), total), np.int32)
  for b, q in enumerate(seqs):
    ids[b, total - len(q):] = q
    mask[b, total - len(q):] = 1
  vision = {}
  if image_grids is not None:
    g = np.asarray(image_grids, np.int64)
    vision.update(pixel_values=rng.normal(0, 1, (int(g.prod(-1).sum()), 1176)).astype(np.float32),
                  image_grid_thw=g)
  if video_grids is not None:
    g = np.asarray(video_grids, np.int64)
    vision.update(
        pixel_values_videos=rng.normal(0, 1, (int(g.prod(-1).sum()), 1176)).astype(np.float32),
        video_grid_thw=g, second_per_grid_ts=np.ones(len(g), np.float32))
  return ids, mask, vision


def _hf_greedy(hf, ids, mask, n, repetition_penalty=1.0, **vision):
  """transformers generate, greedy with the KV cache, EOS disabled, placeholders suppressed (our
  sampler never emits them)."""
  gc = transformers.GenerationConfig(do_sample=False, use_cache=True, max_new_tokens=n,
                                     min_new_tokens=0, eos_token_id=None, pad_token_id=PAD_ID,
                                     suppress_tokens=PLACEHOLDERS,
                                     repetition_penalty=repetition_penalty)
  hf.generation_config.eos_token_id = None
  t = {k: torch.as_tensor(np.asarray(v)) for k, v in vision.items() if v is not None}
  if vision:
    # transformers 5.x needs the token types to build 3-D positions (what its processor returns).
    t["mm_token_type_ids"] = torch.as_tensor(
        np.where(ids == IMAGE_ID, 1, np.where(ids == VIDEO_ID, 2, 0)), dtype=torch.long)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long),
                      generation_config=gc, **t)
  out = out[:, ids.shape[1]:].numpy()
  assert out.shape[1] == n, "EOS was not disabled on the HF side"
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward_jit(params, ids, mask, pos, vis, *, graphdef):
  model = nnx.merge(graphdef, params)
  img = vid = None
  if "pixel_values" in vis:
    img = model.get_vision_features(vis["pixel_values"], vis["image"])
  if "pixel_values_videos" in vis:
    vid = model.get_vision_features(vis["pixel_values_videos"], vis["video"])
  hidden, _ = model.forward_embeds(model.embed(ids, img, vid), pos, mask)
  return model.logits(hidden)


def _full_logits(model, ids, mask, **vision):
  """float32[B, T, V] from one uncached forward (the trainer's view): the same host index code as
  `model(...)`, jitted so the growing-sequence checks stay fast."""
  cfg = model.config
  pos, _ = positions.get_rope_index(
      ids, mask.astype(bool), vision.get("image_grid_thw"), vision.get("video_grid_thw"),
      vision.get("second_per_grid_ts"), spatial_merge_size=cfg.spatial_merge_size,
      tokens_per_second=cfg.tokens_per_second, image_token_id=cfg.image_token_id,
      video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
      text_after_vision=cfg.text_after_vision)
  vis = {}
  if "pixel_values" in vision:
    vis.update(pixel_values=vision["pixel_values"],
               image=qwen2_5_vl.prepare_vision_inputs(cfg, vision["image_grid_thw"]))
  if "pixel_values_videos" in vision:
    vis.update(pixel_values_videos=vision["pixel_values_videos"],
               video=qwen2_5_vl.prepare_vision_inputs(cfg, vision["video_grid_thw"]))
  graphdef, params = nnx.split(model)
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward_jit(params, jnp.asarray(ids), jnp.asarray(mask, bool),
                                   jnp.asarray(pos, jnp.int32), vis, graphdef=graphdef))


def test_full_logits_helper_equals_model_call(model):
  ids, mask, vision = _vision_batch(np.random.default_rng(30), VIDEO_ROWS[:1],
                                    video_grids=VIDEO_GRIDS[:1])
  with jax.default_matmul_precision("highest"):
    want = np.asarray(model(ids, attention_mask=mask, **vision))
  np.testing.assert_allclose(_full_logits(model, ids, mask, **vision), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Exactness against transformers.


@pytest.mark.hf
def test_greedy_text_matches_hf_left_padded(hf_pair, model):
  hf, _ = hf_pair
  ids, mask = _text_batch(np.random.default_rng(0), [7, 11])
  n = 16
  want = _hf_greedy(hf, ids, mask, n)
  with jax.default_matmul_precision("highest"):
    out = sampling.generate(model, ids, mask, max_new_tokens=n, temperature=0.0, stop_ids=())
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  np.testing.assert_array_equal(np.asarray(out.lengths), [n, n])


@pytest.mark.parametrize("penalty", [1.05, 1.8])
def test_greedy_repetition_penalty_matches_hf(hf_pair, model, penalty):
  """transformers' RepetitionPenaltyLogitsProcessor (prompt and completion tokens). Rows of equal
  length: transformers also penalises the pad id of left-padded rows, which we deliberately do not."""
  hf, _ = hf_pair
  ids, mask = _text_batch(np.random.default_rng(30), [10, 10])
  n = 24
  want = _hf_greedy(hf, ids, mask, n, repetition_penalty=penalty)
  with jax.default_matmul_precision("highest"):
    out = sampling.generate(model, ids, mask, max_new_tokens=n, stop_ids=(),
                            repetition_penalty=penalty)
    plain = sampling.generate(model, ids, mask, max_new_tokens=n, stop_ids=())
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  if penalty > 1.5:  # the penalty really changes the greedy path of this random model
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
  # Log-probs stay those of the policy (unpenalised), as GRPO needs.
  seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
  full = _full_logits(model, seq, np.ones_like(seq))[:, ids.shape[1] - 1:-1]
  ref = np.asarray(grpo.token_logps(jnp.asarray(full), jnp.asarray(out.tokens)))
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-5, rtol=0)


def test_repetition_penalty_select_tokens():
  logits = np.array([[3.0, 2.9, -1.0, -1.05], [3.0, 2.9, -1.0, -1.05]], np.float32)
  seen = np.array([[True, False, False, False], [False, False, True, False]])
  scfg = sampling.SamplingConfig(temperature=0.0, repetition_penalty=1.1)
  tok, lp = sampling.select_tokens(jnp.asarray(logits), None, scfg, jnp.asarray(seen))
  np.testing.assert_array_equal(np.asarray(tok), [1, 0])  # 3.0/1.1 < 2.9
  np.testing.assert_allclose(np.asarray(lp), np.asarray(jax.nn.log_softmax(logits))[[0, 1], [1, 0]],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="repetition_penalty"):
    sampling.make_config(qwen2_5_vl.tiny(), repetition_penalty=0.0)


IMAGE_ROWS = [[("text", 5), ("image", 0), ("text", 4)],
              [("text", 2), ("image", 1), ("text", 9)]]
IMAGE_GRIDS = [[1, 4, 6], [1, 4, 4]]
# A 3-step video (t ids 0, 2, 4) on a 2x2 token grid: the qwen and hf5 rules give different ids to
# the text after it. Row 0 ends one token after <|vision_end|>, so its last prompt id is not the
# largest under hf5 (the base-position rule matters); row 1 has a longer tail.
VIDEO_ROWS = [[("text", 3), ("video", 0), ("text", 1)],
              [("text", 6), ("video", 1), ("text", 5)]]
VIDEO_GRIDS = [[3, 4, 4], [2, 4, 6]]


@pytest.mark.hf
def test_greedy_image_matches_hf_left_padded(hf_pair, model):
  ids, mask, vision = _vision_batch(np.random.default_rng(20), IMAGE_ROWS, image_grids=IMAGE_GRIDS)
  n = 12
  want = _hf_greedy(hf_pair[0], ids, mask, n, **vision)
  with jax.default_matmul_precision("highest"):
    out = sampling.generate(model, ids, mask, max_new_tokens=n, stop_ids=(), **vision)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)


@pytest.mark.hf
def test_greedy_video_matches_hf5_left_padded(hf_pair, model_hf5):
  ids, mask, vision = _vision_batch(np.random.default_rng(21), VIDEO_ROWS, video_grids=VIDEO_GRIDS)
  n = 12
  want = _hf_greedy(hf_pair[0], ids, mask, n, **vision)
  with jax.default_matmul_precision("highest"):
    out = sampling.generate(model_hf5, ids, mask, max_new_tokens=n, stop_ids=(), **vision)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)


# ------------------------------------------------------------------------------------------------
# Exactness against our own uncached forward.


def _check_cached_logits(model, ids, mask, n, **vision):
  """Logits after prefill and after each cached decode step == the uncached forward's logits at the
  same position. One forward over the final sequence stands for the forwards over every prefix:
  attention is causal, so position T-1+k sees exactly prompt + first k tokens."""
  sampler = sampling.Sampler(model, stop_ids=())
  steps = []
  with jax.default_matmul_precision("highest"):
    state = sampler.prefill(sampler.prepare(ids, mask, **vision), max_new_tokens=n)
    steps.append(np.asarray(state.logits))
    for k in range(n):
      state = sampler.decode(state, until=k + 1)
      steps.append(np.asarray(state.logits))
  tokens = np.asarray(state.tokens)
  seq = np.concatenate([ids, tokens], axis=1)
  seq_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
  full = _full_logits(model, seq, seq_mask, **vision)
  t = ids.shape[1]
  for k in range(n):  # the logits after the last token are never used and not computed in full
    np.testing.assert_allclose(steps[k], full[:, t - 1 + k], atol=1e-4, rtol=0, err_msg=f"step {k}")
  # ...and one genuinely shorter forward, over prompt + 2 tokens, for the prefix argument.
  short = _full_logits(model, seq[:, :t + 2], seq_mask[:, :t + 2], **vision)[:, -1]
  np.testing.assert_allclose(steps[2], short, atol=1e-4, rtol=0)


def test_cached_decode_logits_equal_full_forward_text(model):
  ids, mask = _text_batch(np.random.default_rng(1), [5, 9])
  _check_cached_logits(model, ids, mask, 6)


@pytest.mark.parametrize("rule", [pytest.param("qwen", marks=pytest.mark.slow), "hf5"])
def test_cached_decode_logits_equal_full_forward_video(model, model_hf5, rule):
  ids, mask, vision = _vision_batch(np.random.default_rng(22), VIDEO_ROWS, video_grids=VIDEO_GRIDS)
  _check_cached_logits(model if rule == "qwen" else model_hf5, ids, mask, 4, **vision)


@pytest.mark.slow
def test_cached_decode_logits_equal_full_forward_image(model):
  ids, mask, vision = _vision_batch(np.random.default_rng(23), IMAGE_ROWS, image_grids=IMAGE_GRIDS)
  _check_cached_logits(model, ids, mask, 4, **vision)


def test_logprobs_equal_full_forward(model):
  ids, mask = _text_batch(np.random.default_rng(2), [6, 10])
  n, g = 10, 3
  with jax.default_matmul_precision("highest"):
    out = sampling.generate(model, ids, mask, max_new_tokens=n, temperature=1.0, top_k=20,
                            top_p=0.9, num_samples=g, rng=jax.random.key(3), stop_ids=(EOS_ID,))
  tokens, logprobs, lengths = map(np.asarray, (out.tokens, out.logprobs, out.lengths))
  seq = np.concatenate([np.repeat(ids, g, 0), tokens], axis=1)
  seq_mask = np.concatenate([np.repeat(mask, g, 0), np.ones_like(tokens)], axis=1)
  logits = _full_logits(model, seq, seq_mask)[:, ids.shape[1] - 1:-1]  # predicts completion tokens
  # The trainer's log-prob function (grpo.token_logps) on the uncached forward's logits.
  with jax.default_matmul_precision("highest"):
    ref = np.asarray(grpo.token_logps(jnp.asarray(logits), jnp.asarray(tokens)))
  valid = np.arange(n)[None] < lengths[:, None]
  assert valid.sum() > 0
  np.testing.assert_allclose(np.where(valid, logprobs, 0), np.where(valid, ref, 0), atol=1e-5, rtol=0)
  assert np.all(logprobs[~valid] == 0)


def test_prefill_once_repeat_equals_separate_prefills(model):
  ids, mask = _text_batch(np.random.default_rng(4), [4, 8])
  g, n = 4, 6
  sampler = sampling.Sampler(model, temperature=1.0, top_k=30, stop_ids=())
  with jax.default_matmul_precision("highest"):
    once = sampler.prefill(sampler.prepare(ids, mask), max_new_tokens=n, num_samples=g)
    sep = sampler.prefill(sampler.prepare(np.repeat(ids, g, 0), np.repeat(mask, g, 0)),
                          max_new_tokens=n, num_samples=1)
    np.testing.assert_allclose(np.asarray(once.logits), np.asarray(sep.logits), atol=1e-5, rtol=0)
    # One prompt cache per prompt (not per sample) that equals each separate prefill's cache.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.repeat(np.asarray(a), g, 0),
                                                         np.asarray(b), atol=1e-5),
                 once.prefix, sep.prefix)
    assert once.prefix[0]["k"].shape[0] == len(ids) and sep.prefix[0]["k"].shape[0] == len(ids) * g
    np.testing.assert_array_equal(np.asarray(once.base_pos), np.asarray(sep.base_pos))
    np.testing.assert_array_equal(np.repeat(np.asarray(once.prefix_mask), g, 0),
                                  np.asarray(sep.prefix_mask))
    a = sampler.decode(once)
    b = sampler.decode(sep)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


# ------------------------------------------------------------------------------------------------
# Stopping, padding, reproducibility.


def test_stop_ids_pad_after_stop(model):
  ids, mask = _text_batch(np.random.default_rng(5), [6, 9])
  n = 12
  free = np.asarray(sampling.generate(model, ids, mask, max_new_tokens=n, stop_ids=()).tokens)
  stop = int(free[0, 3])  # a token row 0 emits at step 3 (maybe earlier too)
  out = sampling.generate(model, ids, mask, max_new_tokens=n, stop_ids=(stop,), pad_id=PAD_ID)
  tokens, logprobs, lengths = np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.lengths)
  for r in range(2):
    hits = np.nonzero(free[r] == stop)[0]
    want_len = int(hits[0]) + 1 if len(hits) else n
    assert lengths[r] == want_len
    np.testing.assert_array_equal(tokens[r, :want_len], free[r, :want_len])
    assert np.all(tokens[r, want_len:] == PAD_ID)
    assert np.all(logprobs[r, want_len:] == 0)
  assert lengths[0] <= 4


def test_default_stop_ids_include_pad():
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(_hf_config().to_dict())
  assert set(sampling.default_stop_ids(cfg)) == {EOS_ID, PAD_ID}
  assert set(sampling.vision_placeholder_ids(cfg)) == {IMAGE_ID, VIDEO_ID, VISION_PAD_ID}


def test_vision_pad_id_from_config_is_forbidden():
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(_hf_config().to_dict())
  assert cfg.vision_token_id == VISION_PAD_ID
  assert qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(cfg.to_hf_dict()) == cfg
  assert VISION_PAD_ID in sampling.make_config(cfg).forbidden_ids
  # Qwen's presets carry <|vision_pad|> = 151654; tiny() has no such token in its 131-token vocab.
  assert set(sampling.vision_placeholder_ids(qwen2_5_vl.qwen2p5_vl_7b())) == {151654, 151655, 151656}
  assert set(sampling.vision_placeholder_ids(qwen2_5_vl.tiny())) == {120, 121}
  # An id outside the vocabulary is not a placeholder the sampler could emit.
  assert sampling.vision_placeholder_ids(qwen2_5_vl.tiny(vision_token_id=500)) == (120, 121)


def test_fixed_rng_reproducible(model):
  ids, mask = _text_batch(np.random.default_rng(6), [5, 7])
  kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, num_samples=4, stop_ids=())
  a = sampling.generate(model, ids, mask, rng=jax.random.key(7), **kw)
  b = sampling.generate(model, ids, mask, rng=jax.random.key(7), **kw)
  c = sampling.generate(model, ids, mask, rng=jax.random.key(8), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  # The G samples of one prompt are not copies of each other.
  assert len({tuple(r) for r in np.asarray(a.tokens)[:4]}) > 1


# ------------------------------------------------------------------------------------------------
# Token filters (many draws).


def _allowed(logits, temperature, top_k, top_p, forbidden):
  """numpy reference of transformers' TemperatureLogitsWarper -> TopK -> TopP (min_tokens_to_keep 1)."""
  x = logits.astype(np.float64).copy()
  x[:, forbidden] = -np.inf
  x = x / temperature
  out = []
  for row in x:
    order = np.argsort(-row, kind="stable")
    keep = order[:top_k] if top_k else order[np.isfinite(row[order])]
    p = np.exp(row[keep] - row[keep].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    out.append(set(keep[before < top_p].tolist()))
  return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (50, 0.95), (8, 0.5)])
def test_top_k_top_p_never_leave_allowed_set(top_k, top_p):
  rng = np.random.default_rng(top_k + int(top_p * 100))
  v, r, draws = 64, 6, 400
  logits = rng.normal(0, 2.0, (r, v)).astype(np.float32)
  logits[:, 3] = 20.0  # a forbidden id holding the top logit must still never appear
  scfg = sampling.SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p, forbidden_ids=(3, 9))
  allowed = _allowed(logits, 0.7, top_k, top_p, [3, 9])
  keys = jax.random.split(jax.random.key(0), draws)
  toks, lps = jax.jit(jax.vmap(lambda k: sampling.select_tokens(jnp.asarray(logits), k, scfg)))(keys)
  toks = np.asarray(toks)  # [draws, R]
  ref_lp = np.asarray(jax.nn.log_softmax(logits, -1))
  for row in range(r):
    seen = set(toks[:, row].tolist())
    assert seen <= allowed[row], (row, seen - allowed[row])
    assert 3 not in seen and 9 not in seen
    if len(allowed[row]) > 1:
      assert len(seen) > 1  # actually sampling, not collapsing to argmax
  np.testing.assert_allclose(np.asarray(lps), ref_lp[np.arange(r)[None], toks], atol=1e-6)


def test_greedy_skips_placeholders():
  logits = np.zeros((2, 16), np.float32)
  logits[:, 5] = 3.0
  logits[:, 7] = 2.0
  scfg = sampling.SamplingConfig(temperature=0.0, forbidden_ids=(5,))
  tok, _ = sampling.select_tokens(jnp.asarray(logits), None, scfg)
  np.testing.assert_array_equal(np.asarray(tok), [7, 7])


# ------------------------------------------------------------------------------------------------
# Compilation and sharding.


def test_no_recompilation_for_new_data_of_same_shape(model):
  kw = dict(max_new_tokens=5, temperature=1.0, top_k=10, num_samples=2, stop_ids=(EOS_ID,))
  ids, mask = _text_batch(np.random.default_rng(8), [3, 6], total=8)
  sampling.generate(model, ids, mask, rng=jax.random.key(0), **kw)
  before = (sampling._prefill._cache_size(), sampling._decode._cache_size())
  for seed in (9, 10):
    ids, mask = _text_batch(np.random.default_rng(seed), [8, 2], total=8)
    sampling.generate(model, ids, mask, rng=jax.random.key(seed), **kw)
  after = (sampling._prefill._cache_size(), sampling._decode._cache_size())
  assert after == before


def _cache_copies(hlo, sizes):
  """Lines of an optimized HLO that copy or transpose a buffer with as many elements as a cache."""
  found = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* (\w[\w-]*)\(", line)
    if m and re.search(r"copy|transpose", m.group(1) + " " + m.group(3)) and int(
        np.prod([int(d) for d in m.group(2).split(",") if d])) in sizes:
      found.append(line.strip()[:160])
  return found


@pytest.mark.parametrize("num_samples", [1, 8])
def test_decode_step_never_copies_the_cache(num_samples):
  """The compiled decode loop never copies or transposes a cache buffer per step. Structural
  check on the optimized HLO, not a timing. Control: a cached T=1 step through the generic
  [R, C, K, H] cache path (what the sampler used before) does transpose the keys every step, so the
  check can fail; head_dim 64 so XLA takes its library dot path (tiny dims are emitted as loops that
  accept any layout). One row (plain decode) and eight (GRPO): a unit row axis once made XLA copy
  the suffix cache (see text.init_suffix_cache)."""
  cfg = qwen2_5_vl.tiny(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(16, 8, 8), num_hidden_layers=1)
  big = qwen2_5_vl.init_model(cfg)
  ids = np.random.default_rng(12).integers(0, 100, (1, 256)).astype(np.int32)
  sampler = sampling.Sampler(big, temperature=1.0, top_k=10, stop_ids=())
  state = sampler.prefill(sampler.prepare(ids, None), max_new_tokens=16, num_samples=num_samples)
  assert state.prefix[0]["k"].shape[0] == 1
  assert state.suffix[0]["k"].shape[0] == num_samples * cfg.num_key_value_heads
  hlo = sampling._decode.lower(sampler.params, state, jnp.int32(16), graphdef=sampler.graphdef,
                               scfg=sampler.scfg).compile().as_text()
  sizes = {int(np.prod(x.shape)) for x in jax.tree.leaves((state.prefix, state.suffix))}
  assert not _cache_copies(hlo, sizes), "\n".join(_cache_copies(hlo, sizes))

  rows, length = 8, 256 + 16
  cache = text.init_cache(cfg, rows, length, jnp.float32)

  @jax.jit
  def generic_step(params, cache):
    model = nnx.merge(sampler.graphdef, params)
    pos = jnp.full((3, rows, 1), 256, jnp.int32)
    return model.forward_embeds(model.embed(jnp.zeros((rows, 1), jnp.int32)), pos,
                                jnp.ones((rows, length), bool), cache=cache,
                                cache_index=jnp.int32(256))

  control = generic_step.lower(sampler.params, cache).compile().as_text()
  assert _cache_copies(control, {rows * length * cfg.num_key_value_heads * cfg.head_dim})


def test_sharded_rows_match_single_device(hf_pair, model):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  # FSDP-sharded weights (embed dim over fsdp), rows over data x fsdp.
  sharded_model = qwen2_5_vl.load_hf(hf_pair[1], dtype=jnp.float32, mesh=mesh,
                                     rules=FSDP_RULES)
  ids, mask = _text_batch(np.random.default_rng(11), [5, 8])
  kw = dict(max_new_tokens=6, temperature=1.0, top_k=20, num_samples=4, rng=jax.random.key(1),
            stop_ids=())
  with jax.default_matmul_precision("highest"):
    single = sampling.generate(model, ids, mask, **kw)
    with jax.set_mesh(mesh):
      sharded = sampling.generate(sharded_model, ids, mask, mesh=mesh, **kw)
  assert len(sharded.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
  np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5)


def test_sharded_video_rows_run_the_vision_tower_over_patch_groups(hf_pair, model):
  """On a (data 2, fsdp 4) mesh the sampler packs the videos' frames into 8 patch groups, one per
  device (pixels and group index arrays split over the batch axes), and samples what one device
  samples from the ungrouped batch."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharded_model = qwen2_5_vl.load_hf(hf_pair[1], dtype=jnp.float32, mesh=mesh, rules=FSDP_RULES)
  ids, mask, vision = _vision_batch(np.random.default_rng(31), VIDEO_ROWS * 4,
                                    video_grids=VIDEO_GRIDS * 4)
  kw = dict(max_new_tokens=5, num_samples=2, rng=jax.random.key(2))
  with jax.default_matmul_precision("highest"):
    want = sampling.Sampler(model, temperature=1.0, top_k=20, stop_ids=(),
                            vision_budget="auto")(ids, mask, **kw, **vision)
    sampler = sampling.Sampler(sharded_model, temperature=1.0, top_k=20, stop_ids=(), mesh=mesh,
                               vision_budget="auto")
    assert sampler.vision_groups() == 8
    batch = sampler.prepare(ids, mask, **vision)
    assert batch["video_vis"]["window_index"].shape[0] == 8
    shardings = sampler.batch_shardings(batch)
    split = jax.sharding.PartitionSpec(("data", "fsdp"))
    assert shardings["video_vis"]["full_gather"].spec == split
    assert shardings["pixel_values_videos"].spec == split
    with jax.set_mesh(mesh), nnx.logical_axis_rules(FSDP_RULES):
      got = sampler(ids, mask, **kw, **vision)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


def test_vision_groups_follow_the_mesh_and_fall_back_with_several_processes(model, monkeypatch):
  """One patch group per device along the batch axes; one group without a mesh and in a
  multi-process job (its pixels arrive as per-process blocks)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert sampling.Sampler(model, mesh=mesh).vision_groups() == 4
  assert sampling.Sampler(model, mesh=mesh, batch_axes=("fsdp",)).vision_groups() == 2
  assert sampling.Sampler(model).vision_groups() == 1
  cfg = dataclasses.replace(model.config, vision_patch_groups=False)
  off = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
  assert sampling.Sampler(off, mesh=mesh).vision_groups() == 1
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert sampling.Sampler(model, mesh=mesh).vision_groups() == 1


def test_auto_budget_takes_pipeline_padded_pixels(model):
  """vision_budget="auto" (the trainer): pixel rows padded past the real ones, as the data
  pipeline's static budgets leave them, give the unpadded batch's samples."""
  ids, mask, vision = _vision_batch(np.random.default_rng(23), VIDEO_ROWS, video_grids=VIDEO_GRIDS)
  kw = dict(max_new_tokens=6, num_samples=2, rng=jax.random.key(4))
  sampler = sampling.Sampler(model, temperature=1.0, top_k=20, stop_ids=(), vision_budget="auto")
  want = sampler(ids, mask, **kw, **vision)
  pixels = vision["pixel_values_videos"]
  padded = dict(vision, pixel_values_videos=np.concatenate([pixels, np.zeros((40, 1176),
                                                                             np.float32)]))
  got = sampler(ids, mask, **kw, **padded)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  with pytest.raises(ValueError, match=r"pixel rows \(80\) < sum"):
    sampler(ids, mask, **kw, **dict(vision, pixel_values_videos=pixels[:80]))


def test_streaming_callback_sees_every_token(model):
  ids, mask = _text_batch(np.random.default_rng(12), [4, 6])
  chunks = []
  sampler = sampling.Sampler(model, stop_ids=())
  out = sampler(ids, mask, max_new_tokens=7, chunk=3, callback=lambda t, d: chunks.append(t))
  assert [c.shape[1] for c in chunks] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(chunks, 1), np.asarray(out.tokens))


def test_rejects_right_padding(model):
  ids = np.array([[1, 2, PAD_ID]], np.int32)
  with pytest.raises(ValueError, match="left-padded"):
    sampling.generate(model, ids, np.array([[1, 1, 0]]), max_new_tokens=2)


# ------------------------------------------------------------------------------------------------
# Command line.


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
  """A tiny random checkpoint whose ids match the project's offline tokenizer, tokenizer included."""
  from spacer_jax.data import tokenizer as tokenizer_lib
  from flax import nnx as nnx_lib
  d = tmp_path_factory.mktemp("cli_ckpt")
  tok = tokenizer_lib.build_offline_tokenizer(d)
  ids = tok.special_ids()
  ids["eos_token_id"] = (ids["eos_token_id"], tok.endoftext_id)
  cfg = qwen2_5_vl.tiny(**ids)
  qwen2_5_vl.save_hf(qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx_lib.Rngs(0)), d)
  return d


def test_generate_cli_errors(tmp_path):
  from spacer_jax import cli
  from spacer_jax import generate as generate_cli
  from spacer_jax.data import video as video_lib
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  video = tmp_path / "clip.mp4"
  with pytest.raises(FileNotFoundError, match="config.json"):
    cli.call(generate_cli, ["--model_dir", str(ckpt), "--video", "x.mp4", "--question", "q"])
  with pytest.raises(FileNotFoundError, match="no such directory"):
    cli.call(generate_cli, ["--model_dir", str(tmp_path / "nope"), "--question", "q"])
  (ckpt / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="clip.mp4: no such file"):
    cli.call(generate_cli, ["--model_dir", str(ckpt), "--video", str(video), "--question", "q"])
  video.write_text("this is not a video")
  with pytest.raises(video_lib.MediaError, match="clip.mp4"):
    cli.call(generate_cli, ["--model_dir", str(ckpt), "--video", str(video), "--question", "q"])


@pytest.mark.slow
def test_generate_cli_streams_an_answer(tmp_path, cli_model_dir, capsys):
  from spacer_jax import cli
  from spacer_jax import generate as generate_cli
  video = tmp_path / "clip.mp4"
  pytest.importorskip("av")
  from tests.media import make_mp4  # pylint: disable=g-import-not-at-top
  make_mp4(video, frames=8, height=48, width=64, fps=4, codec="mpeg4")
  text = cli.call(generate_cli, ["--model_dir", str(cli_model_dir), "--video", str(video),
                                 "--question", "How many chairs are there?",
                                 "--max_new_tokens", "12", "--chunk", "4"])
  captured = capsys.readouterr()
  assert captured.out.strip() == text.strip()
  assert "tokens in" in captured.err


@pytest.mark.slow
def test_generate_cli_reads_a_trainer_workdir(tmp_path, cli_model_dir, capsys):
  """An orbax checkpoint written by spacer_jax.checkpoint (train.py's layout: model_config.json,
  ckpt/<step>/, tokenizer/) answers exactly like the HF checkpoint holding the same weights."""
  import json
  import shutil

  from spacer_jax import checkpoint, cli
  from spacer_jax import generate as generate_cli
  from spacer_jax import tree_utils
  from flax import nnx as nnx_lib
  cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(str(cli_model_dir))
  # Seed 1: weights no fresh Rngs(0) init could reproduce, so a restore that fell back to an init fails.
  hf_model = qwen2_5_vl.Qwen2_5_VL(cfg, rngs=nnx_lib.Rngs(1))
  hf_dir, run = tmp_path / "hf", tmp_path / "run"
  qwen2_5_vl.save_hf(hf_model, hf_dir)
  _, params, _ = tree_utils.split_model(hf_model)
  (run / "tokenizer").mkdir(parents=True)
  for f in cli_model_dir.iterdir():
    if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
      shutil.copy(f, run / "tokenizer" / f.name)
      shutil.copy(f, hf_dir / f.name)
  (run / "model_config.json").write_text(json.dumps(hf_model.config.to_hf_dict()))
  (run / "config.json").write_text(json.dumps({"model": {"hf_dir": ""}}))  # the training record
  ck = checkpoint.Checkpointer(run / "ckpt", use_async=False)
  ck.save(3, {"step": jnp.asarray(3, jnp.int32), "params": params})
  ck.close()
  argv = ["--question", "How many chairs are there?", "--max_new_tokens", "8", "--chunk", "4"]
  want = cli.call(generate_cli, ["--model_dir", str(hf_dir)] + argv)
  assert want != cli.call(generate_cli, ["--model_dir", str(cli_model_dir)] + argv)
  for where in (run, run / "ckpt"):
    assert cli.call(generate_cli, ["--model_dir", str(where)] + argv) == want
  assert cli.call(generate_cli, ["--model_dir", str(run), "--step", "3"] + argv) == want
  capsys.readouterr()
  with pytest.raises(ValueError, match="only a train.py workdir has steps"):
    cli.call(generate_cli, ["--model_dir", str(hf_dir), "--step", "3"] + argv)
  shutil.rmtree(run / "tokenizer")
  with pytest.raises(FileNotFoundError, match="--tokenizer_dir"):
    cli.call(generate_cli, ["--model_dir", str(run)] + argv)
  assert cli.call(generate_cli, ["--model_dir", str(run), "--tokenizer_dir", str(hf_dir)]
                  + argv) == want
