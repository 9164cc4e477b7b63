"""Host-side (NumPy only) index code for Qwen2.5-VL: everything that depends on grid_thw.

* `get_rope_index`: 3-D M-RoPE position ids and rope_deltas (docs/qwen2_5_vl.md, "Position ids").
  The first text position after a vision block follows `text_after_vision`: "qwen" (default; max id
  of the block + 1, the original Qwen rule the published checkpoints were trained with) or "hf5"
  (transformers >= 5.3: the block start + max(h, w) / merge).
* Vision tower indices (docs/qwen2_5_vl.md, "Vision tower"): rotary (h, w) ids, window permutation
  `window_index` with `cu_window_seqlens`, per-frame `cu_seqlens`, and `segment_gather`, which turns
  cu_seqlens into the padded gather/scatter arrays the batched attention in vision.py consumes.

Never called inside jit. Shapes: P patches, Q = P / merge**2 merged tokens, B batch, T text length.
"""

import numpy as np

TEXT_AFTER_VISION = ("qwen", "hf5")


def _vision_block_positions(grid, start, step, merge):
  """int64[3, t*lh*lw] ids of one image/video block starting at text position `start`."""
  t, h, w = (int(v) for v in grid)
  lh, lw = h // merge, w // merge
  tt = (np.arange(t, dtype=np.float32) * np.float32(step)).astype(np.int64)  # truncation, float32
  ti, hi, wi = np.meshgrid(tt, np.arange(lh), np.arange(lw), indexing="ij")
  return np.stack([ti.ravel(), hi.ravel(), wi.ravel()]).astype(np.int64) + start


def get_rope_index(input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, *, spatial_merge_size=2, tokens_per_second=2,
                   image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   text_after_vision="qwen"):
  """3-D M-RoPE positions.

  Args:
    input_ids: int[B, T] with placeholders already expanded (t*h*w/merge**2 per item).
    attention_mask: optional {0,1}[B, T]; padded tokens get position 0 and are skipped.
    image_grid_thw / video_grid_thw: optional int[n, 3], consumed in order of appearance
      (row-major over the batch).
    second_per_grid_ts: optional float[n_videos] (default 1.0 s per temporal patch).
    vision_start_token_id: accepted for API symmetry; blocks are found from placeholder runs.
    text_after_vision: "qwen" or "hf5" (see module docstring).

  Returns:
    (position_ids int64[3, B, T], rope_deltas int64[B]) with
    rope_deltas[b] = max(position ids of row b) + 1 - number of valid tokens of row b.
  """
  del vision_start_token_id
  if text_after_vision not in TEXT_AFTER_VISION:
    raise ValueError(f"text_after_vision={text_after_vision!r}; expected one of {TEXT_AFTER_VISION}")
  input_ids = np.asarray(input_ids)
  b, t = input_ids.shape
  mask = (np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool))
  grids = {image_token_id: list(np.asarray(image_grid_thw).reshape(-1, 3))
           if image_grid_thw is not None else [],
           video_token_id: list(np.asarray(video_grid_thw).reshape(-1, 3))
           if video_grid_thw is not None else []}
  n_vid = len(grids[video_token_id])
  seconds = (np.ones(n_vid, np.float32) if second_per_grid_ts is None
             else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
  if len(seconds) != n_vid:
    raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {n_vid} videos")
  cursor = {image_token_id: 0, video_token_id: 0}
  merge2 = spatial_merge_size ** 2

  position_ids = np.zeros((3, b, t), np.int64)
  deltas = np.zeros((b,), np.int64)
  for row in range(b):
    ids = input_ids[row][mask[row]]
    n = len(ids)
    out = np.zeros((3, n), np.int64)
    cur, i = 0, 0
    while i < n:
      tok = ids[i]
      if tok in cursor:
        k = cursor[tok]
        if k >= len(grids[tok]):
          kind = "image" if tok == image_token_id else "video"
          raise ValueError(f"row {row}: more {kind} placeholder blocks than {kind}_grid_thw entries "
                           f"({len(grids[tok])})")
        grid = grids[tok][k]
        cursor[tok] += 1
        count = int(np.prod(grid)) // merge2
        if not np.all(ids[i:i + count] == tok):
          raise ValueError(f"row {row}: placeholder run at valid token {i} is shorter than the "
                           f"{count} tokens of grid_thw {tuple(int(g) for g in grid)}")
        step = np.float32(tokens_per_second) * seconds[k] if tok == video_token_id else 1
        block = _vision_block_positions(grid, cur, step, spatial_merge_size)
        out[:, i:i + count] = block
        if text_after_vision == "hf5":
          cur = cur + max(int(grid[1]), int(grid[2])) // spatial_merge_size
        else:
          cur = int(block.max()) + 1
        i += count
      else:
        j = i
        while j < n and ids[j] not in cursor:
          j += 1
        out[:, i:j] = cur + np.arange(j - i)
        cur += j - i
        i = j
    position_ids[:, row, mask[row]] = out
    deltas[row] = (out.max() + 1 - n) if n else 0
  for tok, name in ((image_token_id, "image"), (video_token_id, "video")):
    if cursor[tok] != len(grids[tok]):
      raise ValueError(f"{len(grids[tok])} {name}_grid_thw entries but {cursor[tok]} {name} "
                       "placeholder blocks in input_ids")
  return position_ids, deltas


# ------------------------------------------------------------------------------------------------
# Vision tower indices.


def vision_rotary_ids(grid_thw, spatial_merge_size=2):
  """int64[P, 2] (h, w) patch coordinates in processor row order (2x2 blocks, raster), per item."""
  out = []
  m = spatial_merge_size
  for t, h, w in np.asarray(grid_thw).reshape(-1, 3):
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    hpos = hpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    wpos = wpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    out.append(np.tile(np.stack([hpos, wpos], -1), (int(t), 1)))
  return np.concatenate(out, 0).astype(np.int64)


def window_index(grid_thw, *, window_size=112, patch_size=14, spatial_merge_size=2):
  """Window permutation of merged tokens (HF `get_vision_window_index`).

  Returns:
    window_index: int64[Q], merged-token index in window order.
    cu_window_seqlens: int64[num_windows + 1] in patch units, empty windows removed.
  """
  vws = window_size // spatial_merge_size // patch_size
  merge2 = spatial_merge_size ** 2
  index, cu = [], [0]
  offset = 0
  for t, h, w in np.asarray(grid_thw).reshape(-1, 3):
    lh, lw = h // spatial_merge_size, w // spatial_merge_size
    idx = np.arange(t * lh * lw).reshape(t, lh, lw)
    ph, pw = vws - lh % vws, vws - lw % vws
    nh, nw = (lh + ph) // vws, (lw + pw) // vws
    pad = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
    pad = pad.reshape(t, nh, vws, nw, vws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vws, vws)
    counts = (pad != -100).sum((2, 3)).ravel()
    flat = pad.ravel()
    index.append(flat[flat != -100] + offset)
    cu.extend((np.cumsum(counts) * merge2 + cu[-1]).tolist())
    offset += t * lh * lw
  cu = np.asarray(cu, np.int64)
  cu = cu[np.concatenate([[True], cu[1:] != cu[:-1]])]  # unique_consecutive
  return np.concatenate(index).astype(np.int64), cu


def cu_seqlens(grid_thw):
  """int64[frames + 1]: one full-attention segment per temporal patch per item (patch units)."""
  g = np.asarray(grid_thw).reshape(-1, 3)
  lens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
  return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def segment_gather(cu, *, num_patches=None, num_segments=None, segment_len=None):
  """Padded gather/scatter indices for attention inside contiguous segments.

  Args:
    cu: int[S + 1] segment boundaries over a sequence of P patches.
    num_patches / num_segments / segment_len: optional static pad-to sizes (>= the actual sizes).

  Returns:
    gather int32[W, M] (patch index per slot; padding slots point at patch 0),
    lengths int32[W] (valid slots per segment; >= 1 so no row is fully masked),
    scatter int32[P_pad] (flat slot of each patch in [W * M]; padded patches read slot 0).
  """
  cu = np.asarray(cu, np.int64)
  lens = np.diff(cu)
  p = int(cu[-1])
  w = len(lens) if num_segments is None else int(num_segments)
  m = int(lens.max(initial=1)) if segment_len is None else int(segment_len)
  p_pad = p if num_patches is None else int(num_patches)
  if w < len(lens) or m < lens.max(initial=0) or p_pad < p:
    raise ValueError(f"vision budget too small: need {len(lens)} segments of up to "
                     f"{lens.max(initial=0)} "
                     f"patches ({p} patches), got num_segments={w}, segment_len={m}, "
                     f"num_patches={p_pad}")
  slot = np.arange(m)
  gather = np.zeros((w, m), np.int32)
  valid = slot[None, :] < lens[:, None]
  gather[:len(lens)] = np.where(valid, cu[:-1, None] + slot[None, :], 0)
  lengths = np.ones((w,), np.int32)
  lengths[:len(lens)] = lens
  seg_of = np.repeat(np.arange(len(lens)), lens)
  scatter = np.zeros((p_pad,), np.int32)
  scatter[:p] = seg_of * m + (np.arange(p) - cu[seg_of])
  return gather, lengths, scatter


def pack_segments(cu, *, capacity, num_groups):
  """Consecutive segments into `num_groups` groups of at most `capacity` patches each, in order.

  Next fit: a group takes segments until the next one would overflow it, then the next group
  starts. Segments are never split, so a group always holds whole frames (the vision tower's
  patch groups, qwen2_5_vl.prepare_vision_inputs with num_groups: neither a window nor a frame's
  full attention ever reaches across a frame, so every group can run on its own device).

  Args:
    cu: int[S + 1] segment boundaries (patch units).
    capacity: patches per group.
    num_groups: number of groups.

  Returns:
    int64[num_groups + 1]: group g holds segments [out[g], out[g + 1]); trailing groups may be
    empty. Raises ValueError (naming the sizes) when the segments do not fit.
  """
  lens = np.diff(np.asarray(cu, np.int64))
  bounds, used = [0], 0
  for i, n in enumerate(lens):
    if used + n > capacity:
      bounds.append(i)
      used = 0
    if n > capacity or len(bounds) > num_groups:
      raise ValueError(f"{len(lens)} vision frames of up to {lens.max()} patches ({lens.sum()} in "
                       f"all) do not pack into {num_groups} groups of {capacity} patches")
    used += n
  bounds += [len(lens)] * (num_groups + 1 - len(bounds))
  return np.asarray(bounds, np.int64)
