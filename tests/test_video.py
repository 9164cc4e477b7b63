"""Tests for spacer_jax.data.video: reference values, qwen-vl-utils / transformers parity, decoding, bad media."""

import ast
import importlib.util
import logging
import math
import os
import typing

import av
import numpy as np
import PIL.Image
import pytest

from spacer_jax.data import video

# ---------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------

_QWEN_PURE = ("round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize", "smart_nframes")


def qwen_vl_utils_pure(**constants):
  """The pure functions of qwen_vl_utils.vision_process, without importing the module.

  The module imports torchvision at the top (not installed here), so its source is parsed and only
  the constants and the five pure functions are executed. `constants` override module constants
  (SpaceR's copy sets FPS_MAX_FRAMES = 16).
  """
  spec = importlib.util.find_spec("qwen_vl_utils")
  path = os.path.join(os.path.dirname(spec.origin), "vision_process.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  body = []
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name in _QWEN_PURE:
      body.append(node)
    elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
      names = [t.id for t in node.targets]
      if all(n.isupper() and n != "VIDEO_READER_BACKENDS" for n in names) or names == ["logger"]:
        body.append(node)
  ns = {"math": math, "os": os, "logging": logging, **{n: getattr(typing, n) for n in typing.__all__}}
  exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
  ns.update(constants)
  missing = [n for n in _QWEN_PURE if n not in ns]
  assert not missing, f"qwen_vl_utils changed: {missing} not found in {path}"
  return ns


def frame_pattern(i, h, w):
  yy, xx = np.mgrid[:h, :w]
  return np.stack([(xx * 7 + i * 11) % 256, (yy * 5 + i * 3) % 256, ((xx + yy) * 3 + i * 29) % 256],
                  -1).astype(np.uint8)


def make_video(path, n=60, fps=30, w=96, h=64, codec="libx264", gop=None, faststart=False, x264_params=None):
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(str(path), "w", options=options) as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if gop:
      s.codec_context.gop_size = gop
    if x264_params:
      s.codec_context.options = {"x264-params": x264_params}
    for i in range(n):
      for p in s.encode(av.VideoFrame.from_ndarray(frame_pattern(i, h, w), format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return str(path)


def decode_all_reference(path):
  """What torchvision.io.read_video does: decode every frame with PyAV, in pts order."""
  with av.open(path) as c:
    frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    fps = float(c.streams.video[0].average_rate)
  frames.sort(key=lambda x: x[0])
  return np.stack([f for _, f in frames]), fps


CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
  d = tmp_path_factory.mktemp("vids")
  return {
      "short": make_video(d / "short.mp4", n=60),  # 2 s -> 4 frames
      "long_gop": make_video(d / "long_gop.mp4", n=300, gop=12),  # 10 s -> 16 frames, seekable
      "long": make_video(d / "long.mp4", n=300),  # default GOP: keyframe path not cheaper
      "mpeg4": make_video(d / "mpeg4.mp4", n=45, fps=15, codec="mpeg4", gop=5),
      # Open GOPs: B-frames after a keyframe in decode order that display before it and reference the
      # previous GOP (keyframe jumps must start one keyframe earlier for them).
      "open_gop": make_video(d / "open_gop.mp4", n=150, x264_params="open-gop=1:keyint=12:min-keyint=12:"
                             "scenecut=0:bframes=3") if CODEC == "libx264" else None,
      "dir": str(d),
  }


# ---------------------------------------------------------------------------------------------------------
# The reference qwen-vl-utils values with SpaceR's constants (docs/spacer_recipe.md, "Video
# preprocessing", test vectors).
# ---------------------------------------------------------------------------------------------------------


def test_reference_video_smart_resize():
  cap = video.video_max_pixels(16)
  assert cap == 105369
  assert all(video.video_max_pixels(n) == 105369 for n in range(2, 17, 2))
  got = [video.smart_resize(h, w, 28, video.VIDEO_MIN_PIXELS, cap)
         for h, w in [(480, 640), (1080, 1920), (640, 480), (360, 640), (30, 5000)]]
  assert got == [(280, 364), (224, 420), (364, 280), (224, 420), (0, 4172)]


def test_reference_image_smart_resize():
  got = [video.smart_resize(h, w, 28, 3136, 200704) for h, w in [(480, 640), (2000, 3000), (50, 50), (448, 336)]]
  assert got == [(364, 504), (364, 532), (56, 56), (448, 336)]


def test_reference_frames():
  assert video.smart_nframes(300, 30) == 16
  np.testing.assert_array_equal(video.sample_frame_indices(300, 30),
                                [0, 20, 40, 60, 80, 100, 120, 140, 159, 179, 199, 219, 239, 259, 279, 299])
  np.testing.assert_array_equal(video.sample_frame_indices(60, 30), [0, 20, 39, 59])
  np.testing.assert_array_equal(video.sample_frame_indices(5, 30), [0, 1, 3, 4])
  np.testing.assert_array_equal(video.sample_frame_indices(1800, 30),
                                [0, 120, 240, 360, 480, 600, 720, 840, 959, 1079, 1199, 1319, 1439, 1559, 1679, 1799])
  np.testing.assert_array_equal(video.sample_frame_indices(9, 30), [0, 3, 5, 8])
  assert video.sample_frame_indices(300, 30).dtype == np.int64


def test_aspect_ratio_over_200_raises():
  with pytest.raises(ValueError, match="aspect ratio"):
    video.smart_resize(10, 2010)
  with pytest.raises(ValueError, match="aspect ratio"):
    video.smart_resize(3000, 14, rules="transformers")
  video.smart_resize(10, 2000)  # exactly 200 is allowed


def test_too_few_frames_raises():
  with pytest.raises(ValueError, match="nframes"):
    video.smart_nframes(1, 30)


# ---------------------------------------------------------------------------------------------------------
# Parity with qwen-vl-utils, transformers and torch.
# ---------------------------------------------------------------------------------------------------------


def _sizes():
  rng = np.random.default_rng(0)
  sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4000, size=(400, 2))]
  sizes += [(int(a), int(a * r)) for a, r in zip(rng.integers(1, 60, 200), rng.uniform(1, 200, 200))]
  sizes += [(1, 1), (13, 13), (14, 14), (27, 2700), (5, 1000), (2000, 10), (30, 5000)]
  return [(h, w) for h, w in sizes if min(h, w) > 0 and max(h, w) / min(h, w) <= 200]


def test_smart_resize_matches_qwen_vl_utils():
  q = qwen_vl_utils_pure()
  budgets = [(3136, 200704), (video.VIDEO_MIN_PIXELS, video.video_max_pixels(16)), (3136, 12845056),
             (100352, 602112)]
  for h, w in _sizes():
    for lo, hi in budgets:
      assert video.smart_resize(h, w, 28, lo, hi) == q["smart_resize"](h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.hf
def test_smart_resize_transformers_rules_match_transformers():
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf
  for h, w in _sizes():
    for lo, hi in [(3136, 200704), (3136, 12845056), (56 * 56, 28 * 28 * 1280)]:
      assert video.smart_resize(h, w, 28, lo, hi, rules="transformers") == hf.smart_resize(h, w, 28, lo, hi)


def test_smart_nframes_matches_qwen_vl_utils():
  spacer = qwen_vl_utils_pure(FPS_MAX_FRAMES=16)  # SpaceR's constants, empty message dict
  upstream = qwen_vl_utils_pure()
  rng = np.random.default_rng(1)
  cases = [(int(t), float(f)) for t, f in zip(rng.integers(2, 5000, 300), rng.uniform(1, 120, 300))]
  cases += [(300, 30.0), (60, 30.0), (5, 30.0), (9, 30.0), (2, 30.0), (3, 1.0), (17, 29.97)]
  for t, f in cases:
    assert video.smart_nframes(t, f) == spacer["smart_nframes"]({}, t, f), (t, f)
    ele = {"fps": 1.0, "min_frames": 6, "max_frames": 64}
    assert (video.smart_nframes(t, f, fps=1.0, min_frames=6, max_frames=64)
            == upstream["smart_nframes"](ele, t, f)) if t >= 6 else True
  for t, n in [(100, 7), (100, 8), (50, 50), (33, 9)]:
    assert video.smart_nframes(t, 30.0, nframes=n) == upstream["smart_nframes"]({"nframes": n}, t, 30.0)


@pytest.mark.hf
def test_frame_indices_match_torch():
  import torch
  rng = np.random.default_rng(2)
  for t, f in zip(rng.integers(2, 200000, 3000), rng.uniform(0.5, 240, 3000)):
    t, f = int(t), float(f)
    n = video.smart_nframes(t, f, max_frames=768)
    want = torch.linspace(0, t - 1, n).round().long().numpy()
    np.testing.assert_array_equal(video.sample_frame_indices(t, f, max_frames=768), want)


def _hf_image_processor(min_pixels, max_pixels):
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf
  return hf.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


@pytest.mark.hf
@pytest.mark.parametrize("hw", [(37, 53), (97, 151), (151, 97), (9, 300), (300, 9), (480, 640), (1, 3), (29, 29)])
def test_image_patches_bit_exact_with_transformers_pil(hw):
  rng = np.random.default_rng(hw[0] * 1000 + hw[1])
  arr = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
  for lo, hi in [(3136, 200704), (3136, 12845)]:
    proc = _hf_image_processor(lo, hi)
    ref = proc(images=[PIL.Image.fromarray(arr)], return_tensors="np")
    ours = video.preprocess_image(arr, min_pixels=lo, max_pixels=hi, rules="transformers")
    np.testing.assert_array_equal(ours.grid_thw, ref["image_grid_thw"][0])
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape[1] == 1176
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])  # bit-exact
    assert ours.second_per_grid_t is None


@pytest.mark.hf
def test_image_default_rules_bit_exact_where_sizes_agree(tmp_path):
  """SpaceR's default (qwen-vl-utils sizes, RGBA on white) equals HF on a normal-aspect RGBA file."""
  rng = np.random.default_rng(5)
  rgba = rng.integers(0, 256, size=(123, 77, 4), dtype=np.uint8)
  path = tmp_path / "x.png"
  PIL.Image.fromarray(rgba).save(path)
  ours = video.preprocess_image(str(path))
  flat = PIL.Image.new("RGB", (77, 123), (255, 255, 255))
  flat.paste(PIL.Image.fromarray(rgba), mask=PIL.Image.fromarray(rgba[..., 3]))
  ref = _hf_image_processor(video.MIN_PIXELS, video.MAX_PIXELS)(images=[flat], return_tensors="np")
  np.testing.assert_array_equal(ours.grid_thw, ref["image_grid_thw"][0])
  np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
  # Same result from bytes.
  np.testing.assert_array_equal(video.preprocess_image(path.read_bytes()).pixel_values, ours.pixel_values)


def test_patch_layout_matches_reshape_formula():
  """patchify == the processor's reshape/transpose (docs/qwen2_5_vl.md, "Preprocessing") on a normalised float video."""
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, size=(4, 56, 84, 3), dtype=np.uint8)
  pv, grid = video.patchify(frames)
  np.testing.assert_array_equal(grid, [2, 4, 6])
  x = video._LUT[np.arange(3)[None, :, None, None], frames.transpose(0, 3, 1, 2)]  # (F, C, H, W)
  v = x.reshape(2, 2, 3, 2, 2, 14, 3, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(2 * 4 * 6, 1176)
  np.testing.assert_array_equal(pv, v)


def test_video_frame_pairs_match_image_path():
  rng = np.random.default_rng(4)
  imgs = [rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8) for _ in range(3)]
  frames = np.stack([imgs[0], imgs[0], imgs[1], imgs[1], imgs[2]])  # odd: the last frame is repeated
  out = video.preprocess_video(frames, resized_hw=(56, 84))
  np.testing.assert_array_equal(out.grid_thw, [3, 4, 6])
  per_t = out.pixel_values.reshape(3, 24, 1176)
  for t in range(3):
    img = video.preprocess_image(imgs[t], resized_hw=(56, 84))
    np.testing.assert_array_equal(img.grid_thw, [1, 4, 6])
    np.testing.assert_array_equal(per_t[t], img.pixel_values)


def test_video_distinct_frames_each_match_image_columns():
  rng = np.random.default_rng(6)
  frames = rng.integers(0, 256, size=(4, 480, 640, 3), dtype=np.uint8)
  out = video.preprocess_video(frames, sample_fps=1.6)
  np.testing.assert_array_equal(out.grid_thw, [2, 20, 26])  # 480x640 -> 280x364 (vector #27)
  assert out.pixel_values.shape == (2 * 20 * 26, 1176)
  assert out.second_per_grid_t == 1.0  # SpaceR's fixed value by default
  cols = out.pixel_values.reshape(2, 520, 3, 2, 196)
  for f in range(4):
    img = video.preprocess_image(frames[f], resized_hw=(280, 364)).pixel_values.reshape(520, 3, 2, 196)
    np.testing.assert_array_equal(cols[f // 2, :, :, f % 2], img[:, :, 0])
  real = video.preprocess_video(frames, sample_fps=1.6, second_per_grid_t=None)
  assert real.second_per_grid_t == pytest.approx(2 / 1.6)
  np.testing.assert_array_equal(real.pixel_values, out.pixel_values)


def test_video_budget_shrinks_large_frames():
  frames = np.zeros((2, 1080, 1920, 3), np.uint8)
  out = video.preprocess_video(frames)
  np.testing.assert_array_equal(out.grid_thw, [1, 16, 30])  # 224x420


# ---------------------------------------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["short", "long_gop", "long", "mpeg4", "open_gop"])
@pytest.mark.parametrize("every_frame", [False, True])
def test_read_video_matches_full_decode(vids, key, every_frame):
  path = vids[key]
  if path is None:
    pytest.skip("libx264 not available")
  ref, fps = decode_all_reference(path)
  kw = {"fps": fps, "max_frames": len(ref)} if every_frame else {}  # every frame: every B-frame case
  idx = video.sample_frame_indices(len(ref), fps, **kw)
  for seek in ("never", "always", "auto"):
    clip = video.read_video(path, seek=seek, **kw)
    assert clip.total_frames == len(ref) and clip.video_fps == fps
    np.testing.assert_array_equal(clip.indices, idx)
    np.testing.assert_array_equal(clip.frames, ref[idx], err_msg=f"{key} seek={seek}")
    assert clip.sample_fps == pytest.approx(len(idx) / len(ref) * fps)


@pytest.mark.parametrize("key", ["long_gop", "mpeg4"])
def test_counting_fallback_and_threads_match_full_decode(vids, key, monkeypatch):
  path = vids[key]
  ref, fps = decode_all_reference(path)
  idx = video.sample_frame_indices(len(ref), fps)
  np.testing.assert_array_equal(video.read_video(path, threads=2).frames, ref[idx])  # no non-ref skipping
  monkeypatch.setattr(video, "_decode_by_pts", lambda *a, **k: None)  # force the frame-counting path
  np.testing.assert_array_equal(video.read_video(path).frames, ref[idx])


def test_read_video_counts(vids):
  clip = video.read_video(vids["long_gop"])
  assert clip.frames.shape == (16, 64, 96, 3) and clip.total_frames == 300
  assert clip.sample_fps == pytest.approx(1.6)
  assert video.read_video(vids["short"]).frames.shape[0] == 4


def test_decode_from_bytes_equals_path(vids):
  with open(vids["long_gop"], "rb") as f:
    data = f.read()
  frames, fps = video.decode_video(data, name="clip.mp4")
  frames2, fps2 = video.decode_video(vids["long_gop"])
  np.testing.assert_array_equal(frames, frames2)
  assert fps == fps2


def test_load_video_end_to_end(vids):
  out = video.load_video(vids["long_gop"], second_per_grid_t=None)
  # 64x96 frames: rounds to 56x84 (4,704 px) < min -> scaled up to the 100,352 px floor.
  h, w = video.smart_resize(64, 96, 28, video.VIDEO_MIN_PIXELS, video.video_max_pixels(16))
  np.testing.assert_array_equal(out.grid_thw, [8, h // 14, w // 14])
  assert out.second_per_grid_t == pytest.approx(1.25)


def test_shuffle_frames():
  frames = np.arange(16)[:, None, None, None] * np.ones((16, 2, 2, 3), np.uint8)
  a, perm = video.shuffle_frames(frames, np.random.default_rng(0))
  b, perm2 = video.shuffle_frames(frames, np.random.default_rng(0))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, 0, 0, 0], perm)
  assert sorted(perm.tolist()) == list(range(16)) and not np.array_equal(perm, np.arange(16))
  c, _ = video.shuffle_frames(frames, np.random.default_rng(1))
  assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# Bad media.
# ---------------------------------------------------------------------------------------------------------


def _raises_media_error(fn, name):
  with pytest.raises(video.MediaError) as e:
    fn()
  assert name in str(e.value) and e.value.path.endswith(name)
  return e.value


def test_missing_and_empty_files(tmp_path):
  _raises_media_error(lambda: video.read_video(str(tmp_path / "nope.mp4")), "nope.mp4")
  (tmp_path / "empty.mp4").write_bytes(b"")
  _raises_media_error(lambda: video.read_video(str(tmp_path / "empty.mp4")), "empty.mp4")
  _raises_media_error(lambda: video.read_video(b"", name="empty_bytes.mp4"), "empty_bytes.mp4")


def test_truncated_video(tmp_path, vids):
  data = open(vids["long_gop"], "rb").read()
  (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end is lost
  _raises_media_error(lambda: video.read_video(str(tmp_path / "trunc.mp4")), "trunc.mp4")
  fast = make_video(tmp_path / "fast.mp4", n=120, faststart=True)  # index first: frames are lost instead
  data = open(fast, "rb").read()
  (tmp_path / "trunc_fast.mp4").write_bytes(data[: len(data) * 2 // 3])
  err = _raises_media_error(lambda: video.read_video(str(tmp_path / "trunc_fast.mp4"), seek="never"),
                            "trunc_fast.mp4")
  assert "truncated" in str(err) or "corrupt" in str(err)


def test_corrupt_and_non_video_files(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "noise.mp4").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
  _raises_media_error(lambda: video.read_video(str(tmp_path / "noise.mp4")), "noise.mp4")
  (tmp_path / "notes.txt").write_text("this is not a video\n" * 50)
  _raises_media_error(lambda: video.read_video(str(tmp_path / "notes.txt")), "notes.txt")
  PIL.Image.fromarray(frame_pattern(0, 32, 32)).save(tmp_path / "still.png")  # 1 frame: cannot sample 2
  _raises_media_error(lambda: video.read_video(str(tmp_path / "still.png")), "still.png")


def test_audio_only_and_zero_frame_containers(tmp_path):
  path = tmp_path / "zero.mp4"
  with av.open(str(path), "w") as c:
    s = c.add_stream(CODEC, rate=30)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for p in s.encode():
      c.mux(p)
  _raises_media_error(lambda: video.read_video(str(path)), "zero.mp4")
  apath = tmp_path / "audio.wav"
  with av.open(str(apath), "w") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
      c.mux(p)
    for p in s.encode():
      c.mux(p)
  err = _raises_media_error(lambda: video.read_video(str(apath)), "audio.wav")
  assert "no video stream" in str(err)


def test_corrupted_payload_detected_or_decoded(tmp_path, vids):
  """Garbage in the middle of the stream: either a MediaError naming the file or a full-size clip."""
  data = bytearray(open(vids["long_gop"], "rb").read())
  rng = np.random.default_rng(1)
  mid = len(data) // 2
  data[mid:mid + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
  (tmp_path / "garbled.mp4").write_bytes(bytes(data))
  try:
    clip = video.read_video(str(tmp_path / "garbled.mp4"))
  except video.MediaError as e:
    assert "garbled.mp4" in str(e)
  else:
    assert clip.frames.shape == (16, 64, 96, 3)


def test_unreadable_image(tmp_path):
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
  _raises_media_error(lambda: video.preprocess_image(str(tmp_path / "bad.jpg")), "bad.jpg")
  _raises_media_error(lambda: video.preprocess_image(str(tmp_path / "missing.png")), "missing.png")
  _raises_media_error(lambda: video.preprocess_image(b"garbage", name="blob.png"), "blob.png")


def test_extreme_aspect_ratio_is_media_error(tmp_path):
  PIL.Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(tmp_path / "thin.png")
  err = _raises_media_error(lambda: video.preprocess_image(str(tmp_path / "thin.png")), "thin.png")
  assert "aspect ratio" in str(err)
  # Ratio 166 passes the check but the video budget gives a 0 side ((30, 5000) above): also
  # rejected.
  err = _raises_media_error(lambda: video.preprocess_video(np.zeros((2, 30, 5000, 3), np.uint8),
                                                           name="wide.mp4"), "wide.mp4")
  assert "0x4172" in str(err)
