"""Qwen2.5-VL root model: `visual`, `model` (text) and `lm_head`, plus its config.

Mirrors transformers `Qwen2_5_VLForConditionalGeneration` (transformers==5.24) with the on-disk key
layout of the published checkpoints (visual.*, model.*, lm_head.*). Vision features are scattered
into the placeholder rows of the token embeddings in row-major order (docs/qwen2_5_vl.md, "Text
decoder and M-RoPE").

Two ways to run it:
* `model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=..., ...)`: convenience,
  computes every index array on the host and returns float32 logits [B, T, V].
* Jit-friendly pieces for the sampler/trainer: `prepare_vision_inputs` (host), then
  `get_vision_features`, `embed`, `forward_embeds` (optionally with a KV cache), `decode_step`
  (sampling with a shared prompt cache) and `logits`.

Axis legend: B batch, T query length, S key/value length, D text hidden, V vocab, P patches,
Q merged vision tokens, C cache length.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spacer_jax import tree_utils
from spacer_jax.models import hf_weights
from spacer_jax.models import layers
from spacer_jax.models import positions
from spacer_jax.models import text
from spacer_jax.models import vision


MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")


def check_hf_config(d, source="config dict"):
  """Raises ValueError, naming `source`, unless the config.json dict `d` describes a Qwen2.5-VL.

  Checks model_type (and architectures when listed) and that a vision_config is present, so that
  a checkpoint of another family is refused before any of its weights is read.
  """
  if not isinstance(d, dict):
    raise ValueError(f"{source}: config is a {type(d).__name__}, not a JSON object")
  model_type, archs = d.get("model_type"), d.get("architectures") or []
  if model_type != MODEL_TYPE or (archs and not set(archs) & set(ARCHITECTURES)):
    raise ValueError(f"{source}: checkpoint architecture is model_type={model_type!r} {archs}; "
                     f"this code runs Qwen2.5-VL (model_type {MODEL_TYPE!r}, {ARCHITECTURES[0]})")
  if not isinstance(d.get("vision_config"), dict):
    raise ValueError(f"{source}: Qwen2.5-VL config has no vision_config (a text-only Qwen2 "
                     "checkpoint cannot be loaded as a vision-language model)")


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """Architecture + token ids. Build it from a checkpoint with `from_hf_json`."""
  # Text decoder.
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  # Vision tower.
  vision_depth: int = 32
  vision_hidden_size: int = 1280
  vision_num_heads: int = 16
  vision_intermediate_size: int = 3420
  out_hidden_size: int = 3584
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  vision_rope_theta: float = 10000.0
  # Token ids.
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  vision_token_id: int | None = 151654  # <|vision_pad|>: never in prompts; the sampler forbids it
  bos_token_id: int = 151643
  eos_token_id: tuple[int, ...] = (151645, 151643)
  pad_token_id: int = 151643
  # Options.
  text_after_vision: str = "qwen"  # "qwen" | "hf5", see positions.get_rope_index
  use_remat: bool = False  # rematerialise every decoder layer / vision block in the backward pass
  # Run the decoder layers as a lax.scan in the forward without a KV cache (training, reference
  # log-probs): one compiled layer instead of num_hidden_layers; weights keep their per-layer names.
  scan_layers: bool = False
  # On a mesh, run the vision tower over one patch group per device along the batch axes
  # (sampling.Sampler.vision_groups); off: every patch on every device, the hidden dim split.
  vision_patch_groups: bool = True
  attn_implementation: str | None = None  # jax.nn.dot_product_attention implementation

  def __post_init__(self):
    if self.text_after_vision not in positions.TEXT_AFTER_VISION:
      raise ValueError(f"text_after_vision={self.text_after_vision!r}; expected one of "
                       f"{positions.TEXT_AFTER_VISION}")
    if self.hidden_size % self.num_attention_heads or self.num_attention_heads % \
        self.num_key_value_heads:
      raise ValueError(f"hidden_size {self.hidden_size}, heads {self.num_attention_heads} and kv "
                       f"heads {self.num_key_value_heads} must divide evenly")
    if sum(self.mrope_section) * 2 != self.head_dim:
      raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = "
                       f"{self.head_dim // 2}")
    if self.out_hidden_size != self.hidden_size:
      raise ValueError(f"vision out_hidden_size {self.out_hidden_size} != hidden_size "
                       f"{self.hidden_size}")
    if (self.vision_hidden_size // self.vision_num_heads) % 4:
      raise ValueError("vision head dim must be a multiple of 4 (2-D rotary over split halves)")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def window_patches(self) -> int:
    """Patches per full vision window (the static window length M)."""
    return (self.window_size // self.patch_size) ** 2

  @classmethod
  def from_hf_json(cls, path_or_dict, **overrides):
    """From a checkpoint's config.json (dir, file or dict), transformers 4.x flat or 5.x nested."""
    d, source = path_or_dict, "config dict"
    if not isinstance(d, dict):
      source = os.path.join(d, "config.json") if os.path.isdir(d) else os.fspath(d)
      try:
        with open(source) as f:
          d = json.load(f)
      except ValueError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from e
    check_hf_config(d, source)
    try:
      return cls._from_dict(d, overrides)
    except KeyError as e:
      raise ValueError(f"{source}: Qwen2.5-VL config lacks the field {e.args[0]!r}") from e

  @classmethod
  def _from_dict(cls, d, overrides):
    t = dict(d.get("text_config") or d)  # 4.x: text keys at the top level
    v = d["vision_config"]
    rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", d.get("rope_theta", 1e6)))
    vrope = v.get("rope_parameters") or {}

    def pick(key, default=None):
      for src in (d, t):
        if src.get(key) is not None:
          return src[key]
      return default

    eos = pick("eos_token_id", cls.eos_token_id)
    kw = dict(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"], rms_norm_eps=t["rms_norm_eps"],
        rope_theta=float(theta), mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
        tie_word_embeddings=bool(pick("tie_word_embeddings", False)),
        vision_depth=v["depth"], vision_hidden_size=v.get("hidden_size", v.get("embed_dim")),
        vision_num_heads=v["num_heads"], vision_intermediate_size=v["intermediate_size"],
        out_hidden_size=v["out_hidden_size"],
        patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        window_size=v["window_size"], fullatt_block_indexes=tuple(v["fullatt_block_indexes"]),
        tokens_per_second=v["tokens_per_second"],
        vision_rope_theta=float(vrope.get("rope_theta", 10000.0)),
        image_token_id=d["image_token_id"], video_token_id=d["video_token_id"],
        vision_start_token_id=d["vision_start_token_id"],
        vision_end_token_id=d["vision_end_token_id"],
        vision_token_id=d.get("vision_token_id"),  # absent (older configs): None, not a guess
        bos_token_id=pick("bos_token_id", cls.bos_token_id),
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        pad_token_id=pick("pad_token_id", cls.pad_token_id),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict:
    """config.json in the transformers 5.x nested layout (loadable by 4.5x and 5.x)."""
    text_cfg = dict(
        model_type="qwen2_5_vl_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
        hidden_act="silu", max_position_embeddings=self.max_position_embeddings,
        rope_parameters=dict(rope_type="default", rope_theta=self.rope_theta,
                             mrope_section=list(self.mrope_section)),
        use_sliding_window=False, sliding_window=None, attention_dropout=0.0,
        tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_id), pad_token_id=self.pad_token_id)
    vision_cfg = dict(
        model_type="qwen2_5_vl_vision", depth=self.vision_depth,
        hidden_size=self.vision_hidden_size, num_heads=self.vision_num_heads,
        intermediate_size=self.vision_intermediate_size, out_hidden_size=self.out_hidden_size,
        patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
        spatial_merge_size=self.spatial_merge_size, in_channels=self.in_channels,
        window_size=self.window_size, fullatt_block_indexes=list(self.fullatt_block_indexes),
        tokens_per_second=self.tokens_per_second, hidden_act="silu",
        rope_parameters=dict(rope_type="axial", rope_theta=self.vision_rope_theta))
    out = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
               text_config=text_cfg, vision_config=vision_cfg,
               tie_word_embeddings=self.tie_word_embeddings,
               image_token_id=self.image_token_id, video_token_id=self.video_token_id,
               vision_start_token_id=self.vision_start_token_id,
               vision_end_token_id=self.vision_end_token_id)
    if self.vision_token_id is not None:
      out["vision_token_id"] = self.vision_token_id
    return out


def qwen2p5_vl_3b(**overrides):
  return Qwen2_5_VLConfig(**{**dict(
      vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
      num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
      vision_intermediate_size=3420, out_hidden_size=2048), **overrides})


def qwen2p5_vl_7b(**overrides):
  return Qwen2_5_VLConfig(**{**dict(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
      num_attention_heads=28, num_key_value_heads=4, vision_intermediate_size=3420,
      out_hidden_size=3584), **overrides})


def qwen2p5_vl_32b(**overrides):
  return Qwen2_5_VLConfig(**{**dict(
      vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
      num_attention_heads=40, num_key_value_heads=8, vision_intermediate_size=3456,
      out_hidden_size=5120), **overrides})


def qwen2p5_vl_72b(**overrides):
  return Qwen2_5_VLConfig(**{**dict(
      vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
      num_attention_heads=64, num_key_value_heads=8, vision_intermediate_size=3456,
      out_hidden_size=8192), **overrides})


def tiny(**overrides):
  """Test/smoke size with odd dimensions; window_size 56 gives 2x2-token (4x4-patch) windows.

  vision_token_id defaults to None (the 131-token vocab has no <|vision_pad|>); pass it when the
  tokenizer has one.
  """
  kw = dict(
      vocab_size=131, hidden_size=56, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, mrope_section=(3, 2, 2),
      max_position_embeddings=4096, vision_depth=3, vision_hidden_size=36, vision_num_heads=3,
      vision_intermediate_size=29, out_hidden_size=56, window_size=56, fullatt_block_indexes=(1,),
      image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
      vision_token_id=None, bos_token_id=124, eos_token_id=(125,), pad_token_id=124)
  kw.update(overrides)
  if "hidden_size" in overrides and "out_hidden_size" not in overrides:
    kw["out_hidden_size"] = kw["hidden_size"]
  return Qwen2_5_VLConfig(**kw)


# ------------------------------------------------------------------------------------------------
# Host-side helpers.


def check_placeholder_counts(cfg, input_ids, image_grid_thw=None, video_grid_thw=None,
                             num_image_rows=None, num_video_rows=None, padded=False):
  """Raises ValueError (before any compute) when placeholders, grids and pixel rows disagree.

  Args:
    input_ids: int[B, T] with expanded placeholders.
    image_grid_thw / video_grid_thw: int[n, 3] or None.
    num_image_rows / num_video_rows: optional number of pixel rows (patches) passed in.
    padded: the pixel rows may include padding past the real ones (the data pipeline's static
      budgets): then there must be at least as many rows as the grids need, not exactly as many.
  """
  ids = np.asarray(input_ids)
  merge2 = cfg.spatial_merge_size ** 2
  for name, tok, grid, rows in (("image", cfg.image_token_id, image_grid_thw, num_image_rows),
                                ("video", cfg.video_token_id, video_grid_thw, num_video_rows)):
    n_tok = int((ids == tok).sum())
    g = np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid).reshape(-1, 3)
    n_feat = int(np.prod(g, axis=-1).sum()) // merge2
    if n_tok != n_feat:
      raise ValueError(f"{name} placeholders and features do not match: {n_tok} "
                       f"{name}_token_id ({tok}) tokens in input_ids, {n_feat} feature rows from "
                       f"{name}_grid_thw={g.tolist()}")
    if rows is not None and (rows < n_feat * merge2 if padded else rows != n_feat * merge2):
      raise ValueError(f"{name} pixel rows ({rows}) {'<' if padded else '!='} sum(t*h*w) of "
                       f"{name}_grid_thw ({n_feat * merge2})")


def prepare_vision_inputs(cfg, grid_thw, *, num_patches=None, num_windows=None, num_frames=None,
                          frame_len=None, offsets=None, num_groups=None):
  """Host (numpy) index arrays for `get_vision_features`.

  Without pad-to sizes every shape follows `grid_thw`. With them (`num_patches`, `num_windows`,
  `num_frames`, `frame_len`: static budgets, >= the actual sizes) every shape depends only on the
  budgets, so grids with the same budget share one compiled function. Pixel rows past the real
  count must then be padded to `num_patches` by the caller; their features are garbage and are
  never scattered (`embed` only reads as many rows as there are placeholders).

  `offsets` (int[n], one per grid, multiples of spatial_merge_size**2) places grid i's patches at
  pixel rows [offsets[i], offsets[i] + t*h*w) instead of right after grid i-1's: a multi-process
  batch is the processes' pixel blocks one after the other, each block zero-padded to the same
  size, so the grids of process 1 start after process 0's padding. Only the first gather (pixel
  rows -> window order) reads the offsets; after it the activations, every other index array and
  the output (features in processor order, real rows first) are those of the packed layout.

  `num_groups` (G > 1) splits the patches into G groups of num_patches / G rows, each holding whole
  frames, consecutive frames packed in order (`vision_group_bounds`), so the vision tower runs as G
  independent sequences, one per device along the batch axes (sampling.Sampler sets G from its
  mesh). The pixel rows must then be in the grouped layout (`group_pixels`), the budgets
  `num_windows`, `num_frames` and `frame_len` are per group (default: the fullest group's), and
  every index array is local to its group. Features still come back in processor order. A
  ValueError names the sizes when the frames do not pack into G groups of num_patches / G
  (`grouped_num_patches` gives a size that always packs). Not combinable with `offsets`.

  Returns:
    dict of int32 arrays: window_index [Q] (the merged pixel row each window-order slot reads),
    reverse_index [Q] (the slot of each processor-order merged row), rot_pos [P, 2] (window
    order), {win,full}_gather [W, M], {win,full}_lengths [W], {win,full}_scatter [P]. With
    groups every array but reverse_index gets a leading [G] axis and Q, P, W are per group;
    reverse_index then indexes the G * Q / G slots in group order.
  """
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  merge2 = cfg.spatial_merge_size ** 2
  p = int(np.prod(grid, axis=-1).sum())
  p_pad = p if num_patches is None else int(num_patches)
  n = 1 if num_groups is None else int(num_groups)
  if p_pad < p or p_pad % (merge2 * n):
    raise ValueError(f"num_patches={p_pad} must be >= {p} and a multiple of {merge2 * n} "
                     f"({merge2} patches per merged token x {n} groups)")
  if n > 1 and offsets is not None:
    raise ValueError("prepare_vision_inputs: num_groups and pixel offsets do not combine (the "
                     "grouped pixel layout places every group's frames itself)")
  q, q_pad = p // merge2, p_pad // merge2
  win_idx, cu_win = positions.window_index(grid, window_size=cfg.window_size,
                                           patch_size=cfg.patch_size,
                                           spatial_merge_size=cfg.spatial_merge_size)
  rot = positions.vision_rotary_ids(grid, cfg.spatial_merge_size)
  rot = np.concatenate([rot, np.zeros((p_pad - p, 2), np.int64)]).reshape(q_pad, merge2, 2)
  if num_groups is None:
    win_idx = np.concatenate([win_idx, np.arange(q, q_pad)])
    # Pixel rows (merged units) read in window order: the packed index, or its slot under offsets.
    read_idx = win_idx if offsets is None else _offset_rows(grid, offsets, merge2, q_pad)[win_idx]
    wg, wl, ws = positions.segment_gather(cu_win, num_patches=p_pad, num_segments=num_windows,
                                          segment_len=cfg.window_patches)
    fg, fl, fs = positions.segment_gather(positions.cu_seqlens(grid), num_patches=p_pad,
                                          num_segments=num_frames, segment_len=frame_len)
    return dict(window_index=read_idx.astype(np.int32),
                reverse_index=np.argsort(win_idx).astype(np.int32),
                rot_pos=rot[win_idx].reshape(p_pad, 2).astype(np.int32),
                win_gather=wg, win_lengths=wl, win_scatter=ws, full_gather=fg, full_lengths=fl,
                full_scatter=fs)
  # A frame's merged tokens fill the same range [a, b) in processor and in window order (windows
  # never cross a frame), so a group of whole frames is one contiguous range in both.
  pg, qg = p_pad // n, q_pad // n
  bounds, segs = _group_segments(cfg, grid, p_pad, n)
  num_windows = num_windows or max(max(len(w) - 1 for w, _ in segs), 1)
  num_frames = num_frames or max(max(len(f) - 1 for _, f in segs), 1)
  frame_len = frame_len or int(np.diff(positions.cu_seqlens(grid)).max(initial=1))
  out = {k: [] for k in ("window_index", "rot_pos", "win_gather", "win_lengths", "win_scatter",
                         "full_gather", "full_lengths", "full_scatter")}
  slot = np.zeros(q_pad, np.int64)  # window-order position -> flat slot (g * Q/G + local slot)
  free = []  # padding slots, for the processor-order padding rows
  for g in range(n):
    a, b = int(bounds[g]) // merge2, int(bounds[g + 1]) // merge2
    rows = np.concatenate([win_idx[a:b] - a, np.arange(b - a, qg)])  # group-local pixel rows
    slot[a:b] = g * qg + np.arange(b - a)
    free.append(g * qg + np.arange(b - a, qg))
    out["window_index"].append(rows)
    out["rot_pos"].append(np.concatenate([rot[win_idx[a:b]], np.zeros((qg - (b - a), merge2, 2),
                                                                     np.int64)]).reshape(pg, 2))
    for kind, cu, count, length in (("win", segs[g][0], num_windows, cfg.window_patches),
                                    ("full", segs[g][1], num_frames, frame_len)):
      gather, lengths, scatter = positions.segment_gather(cu, num_patches=pg, num_segments=count,
                                                          segment_len=length)
      out[f"{kind}_gather"].append(gather)
      out[f"{kind}_lengths"].append(lengths)
      out[f"{kind}_scatter"].append(scatter)
  reverse = np.concatenate([slot[np.argsort(win_idx)], np.concatenate(free)])
  res = {k: np.stack(v).astype(np.int32) for k, v in out.items()}
  res["reverse_index"] = reverse.astype(np.int32)
  return res


def grouped_vision_keys(vis):
  """The keys of a `prepare_vision_inputs` dict (arrays or ShapeDtypeStructs) that carry a leading
  patch-group axis, to be split over the batch axes like the pixel rows: every key but
  reverse_index with groups, none without."""
  if len(vis["window_index"].shape) == 1:
    return frozenset()
  return frozenset(k for k in vis if k != "reverse_index")


def vision_group_bounds(cfg, grid_thw, num_patches, num_groups):
  """int64[G + 1] patch boundaries of the G patch groups of `prepare_vision_inputs`: group g holds
  the processor-order patches [out[g], out[g + 1]) (whole frames, consecutive frames packed in order
  into groups of num_patches / G). ValueError when they do not pack."""
  del cfg  # the frames are the grids' temporal patches
  cu = positions.cu_seqlens(np.asarray(grid_thw, np.int64).reshape(-1, 3))
  bounds = positions.pack_segments(cu, capacity=int(num_patches) // int(num_groups),
                                   num_groups=int(num_groups))
  return cu[bounds]


def _group_segments(cfg, grid, num_patches, num_groups):
  """(patch bounds of the groups, [(window cu, frame cu)] per group in the group's coordinates)."""
  bounds = vision_group_bounds(cfg, grid, num_patches, num_groups)
  _, cu_win = positions.window_index(grid, window_size=cfg.window_size, patch_size=cfg.patch_size,
                                     spatial_merge_size=cfg.spatial_merge_size)
  cu_full = positions.cu_seqlens(grid)
  segs = [tuple(cu[(cu >= a) & (cu <= b)] - a for cu in (cu_win, cu_full))
          for a, b in zip(bounds[:-1], bounds[1:])]
  return bounds, segs


def vision_group_counts(cfg, grid_thw, num_patches, num_groups):
  """(windows, frames) of the fullest of the G patch groups (`prepare_vision_inputs` defaults)."""
  _, segs = _group_segments(cfg, np.asarray(grid_thw, np.int64).reshape(-1, 3), num_patches,
                            num_groups)
  return max(len(w) - 1 for w, _ in segs), max(len(f) - 1 for _, f in segs)


def grouped_num_patches(cfg, grid_thw, num_patches, num_groups, slack=None):
  """Pixel rows for G patch groups: G equal groups of at least num_patches / G rows (a multiple of
  spatial_merge_size**2) into which the grids' frames pack.

  Packing whole frames in order wastes less than one frame per group, so groups of
  ceil(num_patches / G) + the longest frame always suffice (G groups that were each closed with
  more than the base size in them would hold more than num_patches patches). The base size is used
  when it packs, else base + `slack` (default: the longest frame; pass a static frame budget to keep
  the shapes static): two sizes per budget, so bucketed shapes stay few.
  """
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  merge2 = cfg.spatial_merge_size ** 2
  n = int(num_groups)
  base = -(-int(num_patches) // (n * merge2)) * merge2
  try:
    vision_group_bounds(cfg, grid, base * n, n)
    return base * n
  except ValueError:
    longest = int(np.diff(positions.cu_seqlens(grid)).max(initial=0))
    slack = max(longest, int(slack or 0))
    return (base + -(-slack // merge2) * merge2) * n


def group_pixels(cfg, pixel_values, grid_thw, num_groups):
  """Processor-order pixel rows [P, C*2*14*14] (real rows first, P = the budget) -> the grouped
  layout of `prepare_vision_inputs(num_groups=G)`: group g's frames at rows [g * P / G, ...), zero
  rows after them, so that splitting the rows into G equal blocks gives every device its own
  group's pixels. A zero-stride all-zero view (the planner's placeholder pixels) is returned as
  is."""
  pixel_values = np.asarray(pixel_values)
  rows, n = pixel_values.shape[0], int(num_groups)
  if pixel_values.strides[0] == 0 and not pixel_values[:1].any():
    return pixel_values
  bounds = vision_group_bounds(cfg, grid_thw, rows, n)
  out = np.zeros_like(pixel_values)
  for g in range(n):
    a, b = int(bounds[g]), int(bounds[g + 1])
    out[g * (rows // n):g * (rows // n) + b - a] = pixel_values[a:b]
  return out


def _offset_rows(grid, offsets, merge2, q_pad):
  """int64[Q_pad]: the merged pixel row of each packed merged row when grid i starts at offsets[i];
  the packed padding rows map to the rows no grid covers, in order."""
  offsets = np.asarray(offsets, np.int64).reshape(-1)
  sizes = np.prod(grid, axis=-1) // merge2  # merged rows per grid
  if len(offsets) != len(grid):
    raise ValueError(f"{len(offsets)} offsets for {len(grid)} grids")
  if np.any(offsets % merge2):
    raise ValueError(f"pixel offsets {offsets.tolist()} must be multiples of {merge2}")
  starts = offsets // merge2
  ends = starts + sizes
  order = np.argsort(starts, kind="stable")
  if np.any(starts < 0) or (len(ends) and ends.max(initial=0) > q_pad) or np.any(
      starts[order][1:] < ends[order][:-1]):
    raise ValueError(f"pixel offsets {offsets.tolist()} overlap or exceed the {q_pad * merge2} "
                     f"pixel rows (grids {grid.tolist()})")
  real = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)] + [np.zeros(0, np.int64)])
  covered = np.zeros(q_pad, bool)
  covered[real] = True
  return np.concatenate([real, np.flatnonzero(~covered)]).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# The model.


class Qwen2_5_VL(nnx.Module):
  """Mirrors transformers `Qwen2_5_VLForConditionalGeneration` (transformers==5.24)."""

  def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = cfg
    rngs = layers.key_seq(rngs)
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.visual = vision.VisionTransformer(cfg, **kw)
    self.model = text.Qwen2Model(cfg, **kw)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    layers.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                  axes=("vocab", "embed"), **kw))

  def get_vision_features(self, pixel_values, vis):
    """float[P, C*2*14*14] + prepare_vision_inputs dict -> [Q, D] in processor order."""
    return self.visual(pixel_values, vis)

  def embed(self, input_ids, image_features=None, video_features=None):
    """Token embeddings [B, T, D] with vision features written into placeholder rows.

    Features fill placeholders in row-major (batch, position) order, like HF `masked_scatter`.
    Call `check_placeholder_counts` on the host first: inside jit a count mismatch cannot raise.
    """
    x = self.model.embed_tokens(input_ids)  # [B, T, D]
    for tok, feats in ((self.config.image_token_id, image_features),
                       (self.config.video_token_id, video_features)):
      if feats is None:
        continue
      is_ph = input_ids == tok  # [B, T]
      idx = jnp.cumsum(is_ph.reshape(-1)).reshape(is_ph.shape) - 1  # [B, T] feature row
      rows = jnp.take(feats, jnp.clip(idx, 0, feats.shape[0] - 1), axis=0)  # [B, T, D]
      x = jnp.where(is_ph[..., None], rows.astype(x.dtype), x)
    return layers.constrain(x, ("batch", "seq", "embed"))

  def forward_embeds(self, embeds, position_ids, kv_mask, cache=None, cache_index=None):
    """Text decoder on embeddings; see text.Qwen2Model.__call__. Returns (hidden, cache)."""
    return self.model(embeds, position_ids, kv_mask, cache, cache_index)

  def decode_step(self, embeds, position_ids, prefix, prefix_mask, suffix, step):
    """One sampling step against a shared prompt cache; see text.Qwen2Model.decode_step."""
    return self.model.decode_step(embeds, position_ids, prefix, prefix_mask, suffix, step)

  def logits(self, hidden):
    """[B, T, D] -> float32[B, T, V]."""
    if self.lm_head is None:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return layers.constrain(out, ("batch", "seq", "vocab")).astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None):
    """Full forward with host-side index code. Returns float32[B, T, V] logits."""
    cfg = self.config
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    check_placeholder_counts(
        cfg, ids, image_grid_thw if pixel_values is not None else None,
        video_grid_thw if pixel_values_videos is not None else None,
        None if pixel_values is None else pixel_values.shape[0],
        None if pixel_values_videos is None else pixel_values_videos.shape[0])
    pos, _ = positions.get_rope_index(
        ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
        spatial_merge_size=cfg.spatial_merge_size, tokens_per_second=cfg.tokens_per_second,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, text_after_vision=cfg.text_after_vision)
    vis_img = None if pixel_values is None else prepare_vision_inputs(cfg, image_grid_thw)
    vis_vid = None if pixel_values_videos is None else prepare_vision_inputs(cfg, video_grid_thw)
    graphdef, state = nnx.split(self)
    return _forward(graphdef, state, ids, pos.astype(np.int32), mask, pixel_values, vis_img,
                    pixel_values_videos, vis_vid)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, pos, mask, pixel_values, vis_img, pixel_values_videos, vis_vid):
  """Jitted body of `Qwen2_5_VL.__call__` (compiled once per shape set)."""
  model = nnx.merge(graphdef, state)
  img = None if pixel_values is None else model.get_vision_features(pixel_values, vis_img)
  vid = None if pixel_values_videos is None else model.get_vision_features(pixel_values_videos,
                                                                            vis_vid)
  hidden, _ = model.forward_embeds(model.embed(ids, img, vid), pos, mask)
  return model.logits(hidden)


def init_model(cfg: Qwen2_5_VLConfig, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02):
  """Random model with host (numpy) init: N(0, init_std) weights, unit norms, zero biases.

  For tests, notebooks and benchmarks that want a chosen weight scale without compiling a
  random-number program. The trainer's random init (`modeling.load_params(modeling.RANDOM, ...)`)
  uses the modules' own initialisers instead.
  """
  from spacer_jax import modeling  # pylint: disable=g-import-not-at-top  (modeling imports this)
  abstract = modeling.abstract_model(cfg, dtype=dtype, param_dtype=param_dtype)
  rng = np.random.default_rng(seed)
  params = {}
  for name in sorted(abstract.params, key=lambda k: [str(p) for p in abstract.paths[k]]):
    shape = abstract.params[name].shape
    if abstract.logical[name] == ("norm",):
      value = np.ones(shape, np.float32)
    elif name.endswith(".bias"):
      value = np.zeros(shape, np.float32)
    else:
      value = init_std * rng.standard_normal(shape, np.float32)
    params[name] = jnp.asarray(value, param_dtype)
  return abstract.merge(params)


# ------------------------------------------------------------------------------------------------
# Checkpoints.


def load_hf(path, dtype=jnp.float32, param_dtype=None, *, mesh=None, rules=None,
            **config_overrides):
  """Loads a Hugging Face checkpoint directory (config.json + safetensors) into a model.

  The public shorthand for `modeling.load_model` on an HF directory (see spacer_jax/modeling.py for
  train.py workdirs and random init).

  Args:
    path: directory with config.json and model.safetensors or model.safetensors.index.json.
    dtype: compute dtype; param_dtype: storage dtype (defaults to dtype).
    mesh, rules: optional device mesh and logical-axis rules ((name, mesh_axes), ...); each
      tensor is placed directly into its shard. Without them, params go to the default device.
    **config_overrides: Qwen2_5_VLConfig fields to override (e.g. text_after_vision="hf5").

  Raises:
    ValueError (hf_weights.CheckpointError for the weight files) naming the file and key when
    config.json is not a Qwen2.5-VL config or a file is corrupt, truncated, missing from disk or
    holds non-finite values; KeyError listing every missing, unexpected and mis-shaped key.
  """
  from spacer_jax import modeling  # pylint: disable=g-import-not-at-top  (modeling imports this)
  if modeling.source_kind(path) != "hf":
    raise ValueError(f"{path} is not a Hugging Face checkpoint directory; use modeling.load_model")
  return modeling.load_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                             rules=rules or (), **config_overrides)


def save_hf(model: Qwen2_5_VL, path, *, max_shard_bytes: int = 4 << 30, dtype=None):
  """Writes config.json + safetensors in the published key layout (transformers-loadable).

  Args:
    model: the model to save.
    path: output directory (created; a previous checkpoint there is replaced).
    max_shard_bytes: above this size the weights are split into files with an index.
    dtype: cast the weights to this dtype while writing (e.g. "bfloat16"); None keeps the params'
      dtype. config.json's `dtype` field records the dtype written.
  """
  os.makedirs(path, exist_ok=True)
  cfg_dict = model.config.to_hf_dict()
  stored = model.model.norm.weight[...].dtype if dtype is None else dtype
  cfg_dict["dtype"] = str(np.dtype(stored))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg_dict, f, indent=2)
  hf_weights.save_params(tree_utils.split_model(model)[1], path, max_shard_bytes=max_shard_bytes,
                         dtype=None if dtype is None else np.dtype(dtype))
