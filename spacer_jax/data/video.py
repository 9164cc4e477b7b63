"""Video and image preprocessing for Qwen2.5-VL, as SpaceR configures it (host-side NumPy + PyAV + PIL).

Rules: docs/spacer_recipe.md, "Video preprocessing" (qwen-vl-utils with SpaceR's constants) and
docs/qwen2_5_vl.md, "Preprocessing" (the processor's pixel layout). The path, for one clip:

  read_video(src)          PyAV: demux once, count frames T, pick n = smart_nframes(T, fps) frames at
                           round(linspace(0, T-1, n)), decode only what those frames need (jumping to
                           the preceding keyframe when that decodes fewer frames), convert to RGB.
  preprocess_video(frames) smart_resize with the per-frame budget (video min/max/total pixels),
                           PIL BICUBIC resize (antialiased by construction), rescale 1/255 + CLIP
                           normalise, patchify to pixel_values float32[P, 1176] and grid_thw [t, h, w].
  preprocess_image(img)    the same with the image budget and the frame duplicated (t = 1).

Axis legend: F frames, H/W height/width in pixels, C channels, P patches (rows of pixel_values).

Pixels: resizing is PIL `Image.resize(BICUBIC)` on uint8, then `(f32(u8 * (1/255)) - mean) / std` in
float32, exactly what transformers' `Qwen2VLImageProcessorPil` does, so the image path is bit-exact
with it (tests/test_video.py). Upstream qwen-vl-utils resizes video frames with torchvision's
bicubic+antialias kernel instead, which is not installed here and differs from PIL by up to ~0.2 in
normalised units (docs/qwen2_5_vl.md, "Preprocessing"); this module uses PIL for videos too, so one
resize kernel serves both paths.

second_per_grid_t: SpaceR's processor never sees the real sampling fps and uses its default 2.0, so
every video gets `temporal_patch_size / 2.0 = 1.0` s per temporal patch (docs/spacer_recipe.md,
"Video preprocessing"), which is what the released checkpoints were trained with. The default here
is therefore the fixed 1.0 (`second_per_grid_t=SPACER_SECOND_PER_GRID_T`); pass
`second_per_grid_t=None` to use the real value `temporal_patch_size / sample_fps` (1.25 s for a
10 s clip at 30 fps sampled to 16 frames).

Bad media raises `MediaError` (a ValueError) whose message and `.path` name the file.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import typing

import av
import numpy as np
import PIL.Image

# ---------------------------------------------------------------------------------------------------------
# Constants (docs/spacer_recipe.md, "Video preprocessing").
# ---------------------------------------------------------------------------------------------------------

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28
MAX_RATIO = 200

MIN_PIXELS = 4 * 28 * 28  # 3,136 (images)
MAX_PIXELS = 256 * 28 * 28  # 200,704 (images)
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100,352
VIDEO_MAX_PIXELS = 128 * 28 * 28  # 100,352 (SpaceR; upstream qwen-vl-utils uses 768 * 28 * 28)
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90,316,800

FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 16  # SpaceR; upstream 768

SPACER_SECOND_PER_GRID_T = 1.0

# OpenAI CLIP statistics (transformers OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176


class MediaError(ValueError):
  """A video or image that cannot be used; `path` names the file (or the name given for bytes)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


class VisionInput(typing.NamedTuple):
  """Processor output for one image or video."""

  pixel_values: np.ndarray  # float32[P, 1176]
  grid_thw: np.ndarray  # int64[3]
  second_per_grid_t: float | None  # None for images


class VideoClip(typing.NamedTuple):
  """Sampled frames of one video and how they were sampled."""

  frames: np.ndarray  # uint8[F, H, W, 3]
  sample_fps: float  # F / total_frames * video_fps
  indices: np.ndarray  # int64[F], frame numbers in presentation order
  total_frames: int
  video_fps: float


# ---------------------------------------------------------------------------------------------------------
# Sizes and frame counts (pure functions).
# ---------------------------------------------------------------------------------------------------------


def _round_by(x: float, factor: int) -> int:
  return round(x / factor) * factor  # Python round: half to even, like upstream


def _ceil_by(x: float, factor: int) -> int:
  return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
  return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, rules: str = "qwen_vl_utils") -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor` within [min_pixels, max_pixels].

  rules="qwen_vl_utils" (SpaceR's frames and images; docs/spacer_recipe.md, "Video preprocessing"):
  the rounded sides are clamped to >= factor, the shrink branch is not, so an extreme (but <= 200)
  aspect ratio can give a 0 side, e.g. video budget (30, 5000) -> (0, 4172); preprocess_* turn a 0
  side into MediaError.
  rules="transformers" (`Qwen2VLImageProcessor(Pil)`, docs/qwen2_5_vl.md, "Preprocessing"): the
  rounded sides are not clamped, the shrink branch is. Both raise ValueError when max/min side > 200.
  """
  if rules not in ("qwen_vl_utils", "transformers"):
    raise ValueError(f"smart_resize: unknown rules {rules!r}")
  if max_pixels < min_pixels:
    raise ValueError(f"smart_resize: max_pixels {max_pixels} < min_pixels {min_pixels}")
  if min(height, width) <= 0:
    raise ValueError(f"smart_resize: empty image {height}x{width}")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_RATIO:
    raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio} ({height}x{width})")
  clamp = rules == "qwen_vl_utils"
  h_bar = _round_by(height, factor)
  w_bar = _round_by(width, factor)
  if clamp:
    h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = _floor_by(height / beta, factor)
    w_bar = _floor_by(width / beta, factor)
    if not clamp:
      h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = _ceil_by(height * beta, factor)
    w_bar = _ceil_by(width * beta, factor)
  return h_bar, w_bar


def video_max_pixels(nframes: int, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     total_pixels: float = VIDEO_TOTAL_PIXELS, frame_factor: int = FRAME_FACTOR) -> float:
  """Per-frame pixel cap for a clip of `nframes` frames (qwen-vl-utils fetch_video; 105,369 for n <= 16)."""
  return max(min(max_pixels, total_pixels / nframes * frame_factor), int(min_pixels * 1.05))


def smart_nframes(total_frames: int, video_fps: float, *, fps: float = FPS, min_frames: int = FPS_MIN_FRAMES,
                  max_frames: int = FPS_MAX_FRAMES, frame_factor: int = FRAME_FACTOR,
                  nframes: int | None = None) -> int:
  """Number of frames to sample: `fps` frames per second, clipped, a multiple of 2.

  `nframes` given: round it to the frame factor instead (qwen-vl-utils' `nframes` key). Raises
  ValueError when the result is not in [frame_factor, total_frames] (e.g. a 1-frame video).
  """
  if nframes is not None:
    n = _round_by(nframes, frame_factor)
  else:
    if video_fps is None or not video_fps > 0:
      raise ValueError(f"smart_nframes: video_fps must be positive, got {video_fps}")
    lo = _ceil_by(min_frames, frame_factor)
    hi = _floor_by(min(max_frames, total_frames), frame_factor)
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = _floor_by(n, frame_factor)
  if not frame_factor <= n <= total_frames:
    raise ValueError(f"nframes should in interval [{frame_factor}, {total_frames}], but got {n}.")
  return n


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps) in float32, reproducing torch's CPU kernel bit for bit.

  torch computes `start + step*i` for the first half and `end - step*(steps-1-i)` for the second,
  with fused multiply-adds; a float32*float32 product is exact in float64, so float64 arithmetic and
  one rounding to float32 reproduces it (checked against torch in tests/test_video.py).
  """
  if steps == 1:
    return np.array([start], np.float32)
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  i = np.arange(steps)
  half = steps // 2
  lo = np.float64(start32) + step * i[:half]
  hi = np.float64(end32) - step * (steps - 1 - i[half:])
  return np.concatenate([lo, hi]).astype(np.float32)


def sample_frame_indices(total_frames: int, video_fps: float, **nframes_kwargs) -> np.ndarray:
  """int64[n] = round(linspace(0, T-1, n)) with n = smart_nframes(T, fps, ...)."""
  n = smart_nframes(total_frames, video_fps, **nframes_kwargs)
  return np.round(_linspace_f32(0, total_frames - 1, n)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Decoding (PyAV).
# ---------------------------------------------------------------------------------------------------------


def _name_of(src, name: str | None) -> str:
  if name is not None:
    return name
  if isinstance(src, (str, os.PathLike)):
    return os.fspath(src)
  return "<bytes>"


def _open(src, name: str):
  if isinstance(src, (str, os.PathLike)):
    if not os.path.exists(src):
      raise MediaError(name, "file not found")
    if os.path.getsize(src) == 0:
      raise MediaError(name, "empty file")
    target = os.fspath(src)
  elif isinstance(src, (bytes, bytearray, memoryview)):
    if len(src) == 0:
      raise MediaError(name, "empty bytes")
    target = io.BytesIO(bytes(src))
  else:
    raise TypeError(f"{name}: video source must be a path or bytes, got {type(src).__name__}")
  try:
    return av.open(target, mode="r")
  except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
    raise MediaError(name, f"cannot open container ({type(e).__name__}: {e})") from e


# ffmpeg renders text files (tty demuxer) as "video"; a text file is never a valid clip.
_TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


def _rgb(frame) -> np.ndarray:
  return frame.to_ndarray(format="rgb24")


def read_video(src, *, name: str | None = None, fps: float = FPS, min_frames: int = FPS_MIN_FRAMES,
               max_frames: int = FPS_MAX_FRAMES, frame_factor: int = FRAME_FACTOR, nframes: int | None = None,
               seek: str = "auto", threads: int = 1) -> VideoClip:
  """Decode the SpaceR-sampled frames of a video file path or encoded bytes.

  The container is demuxed once (packets kept in memory; compressed, a few MB for SpaceR's clips) to
  count T and locate keyframes; frame k is the k-th frame in presentation (pts) order, which equals
  the decode-everything order of torchvision.io.read_video. seek="auto" decodes from the keyframe
  before each needed frame when that decodes fewer than 70% of the frames, "always"/"never" force it.
  Only wanted frames are converted to RGB; with threads=1 the decoder also skips unwanted
  non-reference frames. Any wanted frame not recovered this way falls back to a full decode that
  counts frames. `threads` = codec threads (1 = none; grain workers give the parallelism).
  Raises MediaError for a missing/unopenable/truncated/corrupt file, no video stream, zero
  decodable frames or too few frames.
  """
  if seek not in ("auto", "always", "never"):
    raise ValueError(f"read_video: seek must be auto|always|never, got {seek!r}")
  name = _name_of(src, name)
  container = _open(src, name)
  try:
    if not container.streams.video:
      raise MediaError(name, "no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx.name in _TEXT_CODECS:
      raise MediaError(name, f"not a video: ffmpeg reads it as text ({container.format.name}/{ctx.name})")
    if threads > 1:
      ctx.thread_type = "AUTO"
      ctx.thread_count = threads
    else:
      ctx.thread_count = 1
    rate = stream.average_rate or stream.guessed_rate
    video_fps = float(rate) if rate else 0.0
    try:
      packets = [p for p in container.demux(stream) if p.size > 0]
    except av.FFmpegError as e:
      raise MediaError(name, f"corrupt container ({type(e).__name__}: {e})") from e
    total = len(packets)
    if total == 0:
      raise MediaError(name, "zero decodable frames (no video packets)")
    if not video_fps > 0:
      raise MediaError(name, "unknown frame rate")
    try:
      indices = sample_frame_indices(total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames,
                                     frame_factor=frame_factor, nframes=nframes)
    except ValueError as e:
      raise MediaError(name, f"cannot sample frames: {e}") from e
    frames = _decode_by_pts(ctx, packets, indices, seek, skip_nonref=threads <= 1)
    if frames is None:  # no usable pts, or a wanted frame did not come out: count frames instead
      frames = _decode_sequential(ctx, packets, indices, name)
  except av.FFmpegError as e:
    raise MediaError(name, f"corrupt video ({type(e).__name__}: {e})") from e
  finally:
    container.close()
  if len({f.shape for f in frames}) != 1:
    raise MediaError(name, f"frame size changes mid-stream: {sorted({f.shape for f in frames})}")
  sample_fps = len(indices) / max(total, 1e-6) * video_fps
  return VideoClip(np.stack(frames), sample_fps, indices, total, video_fps)


def decode_video(src, **kwargs) -> tuple[np.ndarray, float]:
  """(frames uint8[F, H, W, 3], sample_fps): `read_video` without the sampling details."""
  clip = read_video(src, **kwargs)
  return clip.frames, clip.sample_fps


def _decode_sequential(ctx, packets, indices, name) -> list[np.ndarray]:
  """Decode every packet; convert only the wanted frames. The decoded count must equal the packet count."""
  ctx.flush_buffers()
  want = {}
  for j, k in enumerate(indices.tolist()):
    want.setdefault(k, []).append(j)
  out = [None] * len(indices)
  k = 0

  def take(frame_list):
    nonlocal k
    for frame in frame_list:
      if k in want:
        arr = _rgb(frame)
        for j in want[k]:
          out[j] = arr
      k += 1

  try:
    for p in packets:
      take(ctx.decode(p))
    take(ctx.decode(None))
  except av.FFmpegError as e:
    raise MediaError(name, f"truncated or corrupt stream after {k} frames ({type(e).__name__}: {e})") from e
  if k == 0:
    raise MediaError(name, "zero decodable frames")
  if k != len(packets):
    raise MediaError(name, f"truncated or corrupt stream: decoded {k} of {len(packets)} frames")
  return out


def _decode_by_pts(ctx, packets, indices, seek: str, skip_nonref: bool) -> list[np.ndarray] | None:
  """Decode the wanted frames, matched by pts; None when pts are missing or a frame was not found.

  Frame k is the packet with the k-th smallest pts. With jumps (seek), decoding restarts at the
  keyframe before a wanted frame whenever that keyframe lies ahead of the decoder; without, every
  packet from the first is decoded. skip_nonref tells the decoder to drop non-reference frames that
  are not wanted (nothing references them, so the wanted frames are unchanged).
  """
  pts = [p.pts for p in packets]
  if any(t is None for t in pts) or len(set(pts)) != len(pts):
    return None
  order = sorted(range(len(pts)), key=lambda i: pts[i])  # presentation rank -> decode position
  keyframes = [i for i, p in enumerate(packets) if p.is_keyframe]
  if not keyframes or keyframes[0] != 0:
    return None
  targets = sorted(set(indices.tolist()))
  plan = []  # (first packet to decode from, target pts), by target position in decode order
  for k in targets:
    pos = order[k]
    j = bisect.bisect_right(keyframes, pos) - 1
    if pts[pos] < pts[keyframes[j]] and j > 0:
      j -= 1  # a leading picture of an open GOP references the previous GOP: start one keyframe earlier
    plan.append((keyframes[j], pos, pts[pos]))
  plan.sort()
  if seek == "auto":  # jump only when it decodes < 70% of the packets
    cost, covered = 0, -1
    for start, pos, _ in plan:
      lo = max(start, covered + 1)
      cost += max(0, pos - lo + 1)
      covered = max(covered, pos)
    seek = "always" if cost < 0.7 * len(packets) else "never"
  want_pts = {t for _, _, t in plan}
  got = {}
  next_pos, drained = 0, False
  ctx.flush_buffers()
  for start, _, target in plan:
    if target in got:
      continue
    if seek == "always" and (start > next_pos or drained):
      ctx.flush_buffers()
      next_pos, drained = start, False
    while target not in got:
      if next_pos < len(packets):
        packet = packets[next_pos]
        if skip_nonref:
          ctx.skip_frame = "DEFAULT" if packet.pts in want_pts else "NONREF"
        frames = ctx.decode(packet)
        next_pos += 1
      elif not drained:
        ctx.skip_frame = "DEFAULT"
        frames, drained = ctx.decode(None), True
      else:
        break
      for frame in frames:
        if frame.pts in want_pts and frame.pts not in got:
          got[frame.pts] = _rgb(frame)
    if target not in got:
      ctx.skip_frame = "DEFAULT"
      return None
  ctx.skip_frame = "DEFAULT"
  ctx.flush_buffers()
  by_rank = {k: got[pts[order[k]]] for k in targets}
  return [by_rank[k] for k in indices.tolist()]


# ---------------------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------------------


def _image_name(src, name: str | None) -> str:
  if name is not None:
    return name
  return os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<image>"


def load_image(src, *, name: str | None = None) -> np.ndarray:
  """RGB uint8[H, W, 3] from a path, bytes, PIL image or array; RGBA is composited on white (qwen to_rgb)."""
  name = _image_name(src, name)
  if isinstance(src, np.ndarray):
    arr = src
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype != np.uint8:
      raise MediaError(name, f"expected uint8[H, W, 3|4], got {arr.dtype}{list(arr.shape)}")
    img = PIL.Image.fromarray(arr)
  elif isinstance(src, PIL.Image.Image):
    img = src
  else:
    if isinstance(src, (str, os.PathLike)):
      if not os.path.exists(src):
        raise MediaError(name, "file not found")
      data = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
      data = io.BytesIO(bytes(src))
    else:
      raise TypeError(f"{name}: image source must be a path, bytes, PIL image or array")
    try:
      img = PIL.Image.open(data)
      img.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError, SyntaxError) as e:
      raise MediaError(name, f"unreadable image ({type(e).__name__}: {e})") from e
  try:
    if img.mode == "RGBA":
      rgb = PIL.Image.new("RGB", img.size, (255, 255, 255))
      rgb.paste(img, mask=img.split()[3])
      img = rgb
    else:
      img = img.convert("RGB")
  except (OSError, ValueError) as e:
    raise MediaError(name, f"unreadable image ({type(e).__name__}: {e})") from e
  out = np.asarray(img, dtype=np.uint8)
  if out.shape[0] == 0 or out.shape[1] == 0:
    raise MediaError(name, "empty image")
  return out


# ---------------------------------------------------------------------------------------------------------
# Resize, normalise, patchify.
# ---------------------------------------------------------------------------------------------------------


def _normalise_lut() -> np.ndarray:
  """float32[3, 256]: the HF PIL processor's rescale+normalise of every uint8 value, per channel.

  Same operations and dtypes as transformers image_transforms.rescale / normalize: u8 -> float64
  * (1/255) -> float32, then (x - mean) / std with float32 mean/std.
  """
  v = (np.arange(256).astype(np.float64) * (1 / 255)).astype(np.float32)
  mean = np.array(IMAGE_MEAN, np.float32)[:, None]
  std = np.array(IMAGE_STD, np.float32)[:, None]
  return ((v[None, :] - mean) / std).astype(np.float32)


_LUT = _normalise_lut()


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8[F, H, W, 3] -> uint8[F, height, width, 3] with PIL BICUBIC (as Qwen2VLImageProcessorPil)."""
  if frames.shape[1:3] == (height, width):
    return np.ascontiguousarray(frames)
  out = np.empty((frames.shape[0], height, width, 3), np.uint8)
  for i, frame in enumerate(frames):
    out[i] = np.asarray(PIL.Image.fromarray(frame).resize((width, height), PIL.Image.Resampling.BICUBIC))
  return out


def patchify(frames: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Resized uint8[F, H, W, 3] -> (pixel_values float32[P, C*tp*ps*ps], grid_thw int64[3]), normalised.

  An odd F repeats the last frame. Rows: temporal patch t, then 2x2 merge blocks in raster order,
  then the patches inside a block; columns (c, tp, py, px) (docs/qwen2_5_vl.md, "Preprocessing").
  """
  f, h, w, c = frames.shape
  if f % temporal_patch_size:
    pad = temporal_patch_size - f % temporal_patch_size
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    f += pad
  unit = patch_size * merge_size
  if h % unit or w % unit or h == 0 or w == 0:
    raise ValueError(f"patchify: frame size {h}x{w} is not a positive multiple of {unit}")
  gt, gh, gw = f // temporal_patch_size, h // patch_size, w // patch_size
  x = frames.reshape(gt, temporal_patch_size, gh // merge_size, merge_size, patch_size, gw // merge_size,
                     merge_size, patch_size, c)
  # (t, tp, bh, mh, py, bw, mw, px, c) -> (t, bh, bw, mh, mw, c, tp, py, px), still uint8 (cheap copy).
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(gt * gh * gw, c, temporal_patch_size * patch_size ** 2)
  out = np.empty(x.shape, np.float32)
  for ch in range(c):
    np.take(_LUT[ch], x[:, ch], out=out[:, ch])
  return out.reshape(gt * gh * gw, -1), np.array([gt, gh, gw], np.int64)


def _target_size(name, h, w, min_pixels, max_pixels, rules) -> tuple[int, int]:
  try:
    rh, rw = smart_resize(h, w, IMAGE_FACTOR, min_pixels, max_pixels, rules=rules)
  except ValueError as e:
    raise MediaError(name, str(e)) from e
  if rh <= 0 or rw <= 0:
    raise MediaError(name, f"extreme aspect ratio: {h}x{w} resizes to {rh}x{rw}")
  return rh, rw


def preprocess_video(frames: np.ndarray, *, sample_fps: float | None = None, name: str = "<video>",
                     min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     total_pixels: float = VIDEO_TOTAL_PIXELS, resized_hw: tuple[int, int] | None = None,
                     second_per_grid_t: float | None = SPACER_SECOND_PER_GRID_T,
                     rules: str = "qwen_vl_utils") -> VisionInput:
  """Sampled frames uint8[F, H, W, 3] -> VisionInput(pixel_values, grid_thw, second_per_grid_t).

  Size: smart_resize(H, W) with the per-frame cap `video_max_pixels(F, ...)`, or `resized_hw` exactly.
  second_per_grid_t: a float forces it (default 1.0, SpaceR's effective value, see module docstring);
  None computes temporal_patch_size / sample_fps.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
    raise MediaError(name, f"expected frames uint8[F>0, H, W, 3], got {frames.dtype}{list(frames.shape)}")
  if resized_hw is None:
    cap = video_max_pixels(frames.shape[0], min_pixels, max_pixels, total_pixels)
    resized_hw = _target_size(name, frames.shape[1], frames.shape[2], min_pixels, cap, rules)
  pixel_values, grid_thw = patchify(resize_frames(frames, *resized_hw))
  if second_per_grid_t is None:
    if not sample_fps or sample_fps <= 0:
      raise ValueError(f"{name}: second_per_grid_t=None needs a positive sample_fps, got {sample_fps}")
    second_per_grid_t = TEMPORAL_PATCH_SIZE / sample_fps
  return VisionInput(pixel_values, grid_thw, float(second_per_grid_t))


def preprocess_image(image, *, name: str | None = None, min_pixels: int = MIN_PIXELS,
                     max_pixels: int = MAX_PIXELS, resized_hw: tuple[int, int] | None = None,
                     rules: str = "qwen_vl_utils") -> VisionInput:
  """An image (path, bytes, PIL, uint8 array) -> VisionInput with grid_thw [1, h, w] (frame duplicated)."""
  name = _image_name(image, name)
  arr = load_image(image, name=name)
  if resized_hw is None:
    resized_hw = _target_size(name, arr.shape[0], arr.shape[1], min_pixels, max_pixels, rules)
  pixel_values, grid_thw = patchify(resize_frames(arr[None], *resized_hw))  # odd F=1: frame repeated
  return VisionInput(pixel_values, grid_thw, None)


def load_video(src, *, name: str | None = None, read_kwargs: dict | None = None, **preprocess_kwargs) -> VisionInput:
  """read_video + preprocess_video for one file or bytes (what the data pipeline calls per record)."""
  name = _name_of(src, name)
  clip = read_video(src, name=name, **(read_kwargs or {}))
  return preprocess_video(clip.frames, sample_fps=clip.sample_fps, name=name, **preprocess_kwargs)


def shuffle_frames(frames: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(frames[perm], perm): a uniformly random time order for T-GRPO's temporal contrast.

  Shuffle the sampled frames before preprocess_video, like SpaceR's randperm over the frame axis.
  """
  perm = rng.permutation(len(frames))
  return frames[perm], perm
