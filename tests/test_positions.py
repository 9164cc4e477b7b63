"""Host index code: vision window/rotary/cu_seqlens equal transformers', get_rope_index equals
transformers 5.24 under text_after_vision="hf5" and hand-computed worked examples under the
default "qwen" rule (docs/qwen2_5_vl.md, "Position ids")."""

import numpy as np
import pytest

from spacer_jax.models import positions
from spacer_jax.models import qwen2_5_vl

IMG, VID, VS, VE = 120, 121, 122, 123  # tiny() token ids
GRIDS = [[[1, 10, 14]], [[4, 6, 10]], [[1, 8, 8]], [[2, 16, 12], [1, 6, 22], [3, 4, 4]]]


def _tokens(*parts):
  """Builds a row from ints (text token ids) and ("img"|"vid", grid) blocks."""
  out = []
  for p in parts:
    if isinstance(p, tuple):
      kind, (t, h, w) = p
      out += [VS] + [IMG if kind == "img" else VID] * (t * h * w // 4) + [VE]
    else:
      out += list(range(3, 3 + p))
  return np.asarray(out)


@pytest.mark.hf
@pytest.mark.parametrize("grid", GRIDS)
def test_vision_indices_match_hf(grid):
  torch = pytest.importorskip("torch")
  vision_utils = pytest.importorskip("transformers.vision_utils")
  g = torch.as_tensor(grid)
  for window_size in (56, 112):
    ref_idx, ref_cu = vision_utils.get_vision_window_index(g, 2, window_size, 14)
    idx, cu = positions.window_index(grid, window_size=window_size, patch_size=14)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
  np.testing.assert_array_equal(positions.vision_rotary_ids(grid, 2),
                                vision_utils.get_vision_position_ids(g, 2).numpy())
  np.testing.assert_array_equal(positions.cu_seqlens(grid),
                                vision_utils.get_vision_cu_seqlens(g).numpy())


def test_segment_gather_round_trip():
  cu = np.array([0, 4, 4 + 16, 4 + 16 + 7])
  x = np.arange(27) * 10
  gather, lengths, scatter = positions.segment_gather(cu, num_patches=30, num_segments=5,
                                                      segment_len=16)
  assert gather.shape == (5, 16) and lengths.tolist() == [4, 16, 7, 1, 1]
  slots = x[gather].reshape(-1)
  np.testing.assert_array_equal(slots[scatter[:27]], x)
  for w, n in enumerate([4, 16, 7]):
    np.testing.assert_array_equal(gather[w, :n], np.arange(cu[w], cu[w] + n))


def test_qwen_rule_worked_examples():
  """The hand-computed worked examples of docs/qwen2_5_vl.md, "Position ids"."""
  # Image: vision_start at 44, 35 image tokens (1x10x14) at 45..79, vision_end at 80, L = 114.
  ids = _tokens(44, ("img", (1, 10, 14)), 114 - 81)
  assert len(ids) == 114
  pos, deltas = positions.get_rope_index(ids[None], None, [[1, 10, 14]], image_token_id=IMG,
                                         video_token_id=VID)
  blk = pos[:, 0, 45:80]
  assert set(blk[0]) == {45} and sorted(set(blk[1])) == list(range(45, 50))
  assert sorted(set(blk[2])) == list(range(45, 52))
  assert pos[:, 0, 80].tolist() == [52, 52, 52]
  assert deltas.tolist() == [-28]
  # Video (t=4, step 2, 3x5 tokens): t ids {45, 47, 49, 51}; text after it starts at 52 (qwen)
  # vs 50 (hf5); rope_deltas -53 vs -55.
  ids = _tokens(44, ("vid", (4, 6, 10)), 20)
  for rule, first, delta in (("qwen", 52, -53), ("hf5", 50, -55)):
    pos, deltas = positions.get_rope_index(ids[None], None, None, [[4, 6, 10]], [1.0],
                                           image_token_id=IMG, video_token_id=VID,
                                           text_after_vision=rule)
    assert sorted(set(pos[0, 0, 45:105])) == [45, 47, 49, 51]
    assert pos[:, 0, 105].tolist() == [first] * 3
    assert deltas.tolist() == [delta]


def test_temporal_ids_float32_truncation():
  """fps = 3 -> second_per_grid 2/3, step = 2 * 0.6666667 = 1.3333334 -> ids 0, 1, 2, 4."""
  ids = _tokens(2, ("vid", (4, 2, 2)), 3)
  pos, _ = positions.get_rope_index(ids[None], None, None, [[4, 2, 2]], [2 / 3],
                                    image_token_id=IMG, video_token_id=VID)
  assert (pos[0, 0, 3:7] - 3).tolist() == [0, 1, 2, 4]


def test_left_padding_and_errors():
  row = _tokens(3, ("img", (1, 4, 6)), 2)
  ids = np.stack([row, np.concatenate([[0, 0], row[:-2]])])
  mask = np.ones_like(ids, bool)
  mask[1, :2] = False
  pos, deltas = positions.get_rope_index(ids, mask, [[1, 4, 6], [1, 4, 6]], image_token_id=IMG,
                                         video_token_id=VID)
  np.testing.assert_array_equal(pos[:, 1, 2:], pos[:, 0, :-2])
  assert (pos[:, 1, :2] == 0).all() and deltas[0] == deltas[1]
  with pytest.raises(ValueError, match="image_grid_thw"):
    positions.get_rope_index(ids, mask, [[1, 4, 6]], image_token_id=IMG, video_token_id=VID)
  with pytest.raises(ValueError, match="shorter"):
    positions.get_rope_index(ids[:1], None, [[1, 4, 8]], image_token_id=IMG, video_token_id=VID)


@pytest.mark.hf
def test_hf5_rule_matches_transformers():
  torch = pytest.importorskip("torch")
  from test_qwen2_5_vl import make_hf_model
  cfg = qwen2_5_vl.tiny()
  hf = make_hf_model(cfg)
  rows = [_tokens(5, ("img", (1, 10, 14)), 4, ("vid", (4, 6, 10)), 7),
          _tokens(3, ("vid", (3, 4, 8)), 2, ("img", (1, 6, 4)), 9)]
  width = max(len(r) for r in rows) + 3
  ids = np.zeros((2, width), np.int64)
  mask = np.zeros((2, width), bool)
  for b, r in enumerate(rows):
    ids[b, width - len(r):] = r
    mask[b, width - len(r):] = True
  images, videos = [[1, 10, 14], [1, 6, 4]], [[4, 6, 10], [3, 4, 8]]
  seconds = [1.0, 2 / 3]
  types = (ids == IMG) * 1 + (ids == VID) * 2
  ref_pos, ref_deltas = hf.model.get_rope_index(
      torch.as_tensor(ids), torch.as_tensor(types), torch.as_tensor(images),
      torch.as_tensor(videos), torch.as_tensor(seconds, dtype=torch.float32),
      torch.as_tensor(mask).long())
  pos, deltas = positions.get_rope_index(ids, mask, images, videos, seconds, image_token_id=IMG,
                                         video_token_id=VID, text_after_vision="hf5")
  np.testing.assert_array_equal(pos[:, mask], ref_pos.numpy()[:, mask])
  np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))
