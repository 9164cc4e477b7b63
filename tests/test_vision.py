"""Vision tower parity with transformers (per module and whole tower), batched-window equivalence,
static pixel budgets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ATOL_LAYER
from spacer_jax.models import positions
from spacer_jax.models import qwen2_5_vl
from spacer_jax.models import vision

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from test_qwen2_5_vl import make_hf_model  # noqa: E402

# Image 10x14 patches -> 5x7 merged tokens: with 2x2-token windows (window_size 56) the windows are
# 3x4 with ragged right/bottom edges. Video: 3 temporal patches of 6x10 patches (3x5 tokens).
IMAGE_GRID = [[1, 10, 14]]
VIDEO_GRID = [[3, 6, 10]]
MULTI_GRID = [[1, 10, 14], [2, 4, 6], [1, 8, 8]]  # 8x8 (4x4 tokens) adds an empty window row


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  cfg = qwen2_5_vl.tiny()
  hf = make_hf_model(cfg, seed=7)
  path = tmp_path_factory.mktemp("tiny_vis")
  hf.save_pretrained(path)
  return hf, qwen2_5_vl.load_hf(str(path), dtype=jnp.float32)


def _pixels(grid, seed=0, cfg=qwen2_5_vl.tiny()):
  n = int(np.prod(np.asarray(grid), -1).sum())
  cols = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  return np.random.default_rng(seed).normal(size=(n, cols)).astype(np.float32)


@nnx.jit
def _tower(visual, pixel_values, vis):
  return visual(pixel_values, vis)


def _hf_tower(hf, pix, grid):
  with torch.no_grad():
    out = hf.model.visual(torch.as_tensor(pix), grid_thw=torch.as_tensor(grid))
  return out.pooler_output.numpy()


@pytest.mark.hf
@pytest.mark.parametrize("grid", [IMAGE_GRID, VIDEO_GRID, MULTI_GRID], ids=["image", "video", "multi"])
def test_tower_matches_hf(pair, grid):
  hf, model = pair
  pix = _pixels(grid)
  vis = qwen2_5_vl.prepare_vision_inputs(model.config, grid)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(_tower(model.visual, pix, vis))
  np.testing.assert_allclose(ours, _hf_tower(hf, pix, grid), atol=ATOL_LAYER, rtol=0)


@pytest.mark.hf
def test_blocks_and_merger_match_hf(pair):
  """Window block, full block and merger, each fed the same input as the HF module."""
  hf, model = pair
  cfg = model.config
  grid = MULTI_GRID
  hv = hf.model.visual
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid)
  rot = torch.as_tensor(positions.vision_rotary_ids(grid, cfg.spatial_merge_size))
  win_index, cu_win = positions.window_index(grid, window_size=cfg.window_size,
                                             patch_size=cfg.patch_size)
  cu_full = positions.cu_seqlens(grid)
  p = int(cu_full[-1])
  x = np.random.default_rng(3).normal(size=(p, cfg.vision_hidden_size)).astype(np.float32)
  with torch.no_grad():
    cos, sin = hv.rotary_pos_emb(torch.as_tensor(x), rot)
    cos = hv.permute_input_for_window_attn(cos, torch.as_tensor(win_index), p)
    sin = hv.permute_input_for_window_attn(sin, torch.as_tensor(win_index), p)
  c, s = vision.vision_cos_sin(jnp.asarray(vis["rot_pos"]), cfg.vision_hidden_size //
                               cfg.vision_num_heads, cfg.vision_rope_theta)
  np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(s), sin.numpy(), atol=1e-6)
  for seg, cu in (("win", cu_win), ("full", cu_full)):
    block_idx = 0 if seg == "win" else cfg.fullatt_block_indexes[0]
    with torch.no_grad():
      ref = hv.blocks[block_idx](torch.as_tensor(x), cu_seqlens=torch.as_tensor(cu, dtype=torch.int32),
                                 position_embeddings=(cos, sin)).numpy()
    blk = model.visual.blocks[block_idx]
    with jax.default_matmul_precision("highest"):
      ours = nnx.jit(lambda b, *a: b(*a))(blk, x, c, s, vis[f"{seg}_gather"],
                                          vis[f"{seg}_lengths"], vis[f"{seg}_scatter"])
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL_LAYER, rtol=0, err_msg=seg)
  with torch.no_grad():
    ref = hv.merger(torch.as_tensor(x)).numpy()
  with jax.default_matmul_precision("highest"):
    ours = nnx.jit(lambda m, a: m(a))(model.visual.merger, x)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL_LAYER, rtol=0)
  with torch.no_grad():
    ref = hv.patch_embed(torch.as_tensor(_pixels([[1, 4, 6]]))).numpy()
  with jax.default_matmul_precision("highest"):
    ours = nnx.jit(lambda m, a: m(a))(model.visual.patch_embed, _pixels([[1, 4, 6]]))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL_LAYER, rtol=0)


def test_static_budget_padding_gives_same_features():
  """Padding patches/windows/frames to budgets changes shapes only, not the real rows."""
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg, seed=1, init_std=0.2)
  grid = VIDEO_GRID
  pix = _pixels(grid, seed=5)
  p = pix.shape[0]
  exact = np.asarray(_tower(model.visual, pix, qwen2_5_vl.prepare_vision_inputs(cfg, grid)))
  budget = dict(num_patches=p + 36, num_windows=40, num_frames=5, frame_len=80)
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid, **budget)
  padded = np.concatenate([pix, np.full((36, pix.shape[1]), 7.0, np.float32)])
  got = np.asarray(_tower(model.visual, padded, vis))
  assert got.shape == (budget["num_patches"] // 4, cfg.hidden_size)
  np.testing.assert_allclose(got[:p // 4], exact, atol=1e-5, rtol=0)
  # Another grid with the same budget yields identically shaped index arrays (no recompile).
  other = qwen2_5_vl.prepare_vision_inputs(cfg, [[2, 8, 10]], **budget)
  assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in vis.items()}
  with pytest.raises(ValueError, match="budget"):
    qwen2_5_vl.prepare_vision_inputs(cfg, grid, num_patches=p, num_frames=2)


def test_pixel_offsets_give_the_packed_features_bit_for_bit():
  """A multi-process batch: each process's patches at the start of its equal-size block
  (offsets), zero rows between blocks; the features equal the packed layout's exactly."""
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg, seed=1, init_std=0.2)
  grids = [[1, 10, 14], [2, 4, 6], [1, 8, 8]]  # process 0: the first two, process 1: the third
  parts = [_pixels([g], seed=i) for i, g in enumerate(grids)]
  block = 256  # rows per process: 140 + 48 real on process 0, 64 on process 1
  packed = np.concatenate(parts + [np.zeros((2 * block - 252, parts[0].shape[1]), np.float32)])
  blocks = np.zeros((2 * block, parts[0].shape[1]), np.float32)
  blocks[:140], blocks[140:188], blocks[block:block + 64] = parts
  want = np.asarray(_tower(model.visual, packed, qwen2_5_vl.prepare_vision_inputs(
      cfg, grids, num_patches=2 * block)))
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grids, num_patches=2 * block,
                                         offsets=[0, 140, block])
  np.testing.assert_array_equal(np.asarray(_tower(model.visual, blocks, vis)), want)
  with pytest.raises(ValueError, match="overlap"):
    qwen2_5_vl.prepare_vision_inputs(cfg, grids, num_patches=2 * block, offsets=[0, 100, block])
  with pytest.raises(ValueError, match="multiples"):
    qwen2_5_vl.prepare_vision_inputs(cfg, grids, num_patches=2 * block, offsets=[0, 142, block])


def test_window_attention_never_builds_patch_by_patch_mask():
  """The jaxpr of the tower has no [P, P]-sized intermediate for a multi-frame video."""
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg)
  grid = [[8, 12, 16]]
  pix = _pixels(grid)
  p = pix.shape[0]
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid)
  graphdef, state = nnx.split(model.visual)
  jaxpr = jax.make_jaxpr(lambda st, x, v: nnx.merge(graphdef, st)(x, v))(state, pix, vis)
  biggest = max(int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars
                if hasattr(v.aval, "shape"))
  heads = cfg.vision_num_heads
  assert biggest < p * p, (biggest, p * p)
  assert biggest <= max(p * cfg.vision_intermediate_size, 8 * heads * (p // 8) ** 2)


# Clips with uneven frame counts (1, 5, 2, 3 and 1 temporal patches) and frame sizes.
GROUPED_VIDEOS = [[1, 10, 14], [5, 4, 4], [2, 4, 6], [3, 6, 10], [1, 8, 8]]
GROUPED_IMAGES = [[1, 10, 14], [1, 8, 8], [1, 4, 6], [1, 6, 10], [1, 4, 4]]


def _sharded_tower(model, cfg, pix, grid, num_groups, extra_rows):
  """Features of the tower over `num_groups` patch groups on an 8-device mesh whose batch axes
  (data x fsdp) have num_groups devices, inputs laid out as the sampler puts them; and the
  compiled HLO."""
  from spacer_jax import config_lib, sharding
  n = num_groups
  mesh = sharding.make_mesh([("data", 1), ("fsdp", n), ("tensor", 8 // n)])
  rules = config_lib.FSDP_RULES
  rows = qwen2_5_vl.grouped_num_patches(cfg, grid, pix.shape[0] + extra_rows, n)
  padded = np.concatenate([pix, np.full((rows - pix.shape[0], pix.shape[1]), 0.0, np.float32)])
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid, num_patches=rows, num_groups=n)
  grouped = qwen2_5_vl.grouped_vision_keys(vis)
  put = lambda a, split: jax.device_put(a, sharding.batch_sharding(mesh, rules, a.shape) if split
                                        else sharding.replicated(mesh))
  vis = {k: put(v, k in grouped) for k, v in vis.items()}
  pixels = put(qwen2_5_vl.group_pixels(cfg, padded, grid, n), True)
  graphdef, state = nnx.split(model.visual)
  fn = jax.jit(lambda st, x, v: nnx.merge(graphdef, st)(x, v))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    out = fn(state, pixels, vis)
    hlo = fn.lower(state, pixels, vis).compile().as_text()
  return np.asarray(out), hlo


@pytest.mark.parametrize("num_groups", [2, 4, 8])
@pytest.mark.parametrize("grid", [GROUPED_IMAGES, GROUPED_VIDEOS], ids=["images", "videos"])
def test_patch_groups_give_the_ungrouped_features(grid, num_groups):
  """The tower over G per-device patch groups (whole frames per group, group-local indices, budget
  padding rows) returns the single-device features of the processor-order batch."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg, seed=1, init_std=0.2)
  pix = _pixels(grid, seed=3)
  want = np.asarray(_tower(model.visual, pix, qwen2_5_vl.prepare_vision_inputs(cfg, grid)))
  got, hlo = _sharded_tower(model, cfg, pix, grid, num_groups, extra_rows=36)
  np.testing.assert_allclose(got[:len(want)], want, atol=1e-6, rtol=0)
  # The blocks exchange no activations: the only all-reduce left is the final reorder of the
  # merged features ([Q, D]) into processor order.
  reduces = [line for line in hlo.splitlines() if " all-reduce(" in line
             or " all-reduce-start(" in line]
  assert len(reduces) <= 1, reduces


def test_patch_group_layout_and_errors():
  """Groups hold whole frames in order; the pixel layout puts group g at rows g * P / G; a budget
  too small for the frames raises naming the sizes."""
  cfg = qwen2_5_vl.tiny()
  grid = GROUPED_VIDEOS  # frames of 140, 16 x5, 24 x2, 60 x3, 64 patches: 512 in all
  # Groups of 272: 140 + 5*16 + 2*24 = 268 (the next frame, 60, would overflow), then 180 + 64.
  np.testing.assert_array_equal(qwen2_5_vl.vision_group_bounds(cfg, grid, 544, 2), [0, 268, 512])
  pix = _pixels(grid, seed=2)
  rows = np.concatenate([pix, np.zeros((32, pix.shape[1]), np.float32)])
  laid = qwen2_5_vl.group_pixels(cfg, rows, grid, 2)
  np.testing.assert_array_equal(laid[:268], pix[:268])
  np.testing.assert_array_equal(laid[272:516], pix[268:])
  assert not laid[268:272].any() and not laid[516:].any()
  vis = qwen2_5_vl.prepare_vision_inputs(cfg, grid, num_patches=544, num_groups=2)
  assert vis["window_index"].shape == (2, 68) and vis["reverse_index"].shape == (136,)
  assert sorted(vis["reverse_index"]) == list(range(136))  # a permutation of the slots
  # 8 groups of 64 rows cannot take a 140-patch frame; grouped_num_patches adds a frame per group.
  with pytest.raises(ValueError, match=r"up to 140 patches .* do not pack into 8 groups of 64"):
    qwen2_5_vl.prepare_vision_inputs(cfg, grid, num_patches=512, num_groups=8)
  assert qwen2_5_vl.grouped_num_patches(cfg, grid, 544, 2) == 544
  assert qwen2_5_vl.grouped_num_patches(cfg, grid, 512, 8) == 8 * (64 + 140)
  with pytest.raises(ValueError, match="multiple of 8"):
    qwen2_5_vl.prepare_vision_inputs(cfg, grid, num_patches=548, num_groups=2)
  with pytest.raises(ValueError, match="offsets"):
    qwen2_5_vl.prepare_vision_inputs(cfg, grid, num_patches=544, num_groups=2,
                                     offsets=[0, 140, 220, 268, 448])
