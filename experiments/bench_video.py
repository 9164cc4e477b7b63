"""Benchmark: clips/s for decode + sample + resize + patchify, spacer_jax vs the reference path.

  PYTHONPATH=. .venv/bin/python experiments/bench_video.py [--clips 4] [--reps 2] [--gops 250,30] [--seconds 10]

Generates 640x480, 10 s (--seconds), 30 fps H.264 clips (libx264, or mpeg4 when libx264 is missing) with PyAV,
once per GOP length (250 = libx264's default: one keyframe per ~8 s; 30 = one per second, common for
cameras), then times, single-threaded, on the same files:

  ours       video.load_video(path): demux once, decode only what the 16 sampled frames need
             (keyframe jumps when cheaper), RGB-convert only those, PIL resize, LUT normalise, patchify.
  reference  what qwen-vl-utils fetch_video + transformers do: decode and RGB-convert every frame with
             PyAV (torchvision.io.read_video's decoder; torchvision itself is not installed), then
             qwen-vl-utils smart_nframes / linspace / smart_resize (SpaceR constants), then
             transformers' Qwen2VLImageProcessorPil resize + rescale + normalise per frame and the
             video patch layout (docs/qwen2_5_vl.md, "Preprocessing").

Both paths must produce identical pixel_values (checked) before any timing is printed. Rates are
clips per second of process CPU time (see `timed`).
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ[_var] = "1"

import argparse  # noqa: E402
import collections  # noqa: E402
import ast  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from spacer_jax.data import video  # noqa: E402

torch.set_num_threads(1)


def qwen_vl_utils_pure(**constants):
  """smart_resize / smart_nframes from qwen_vl_utils without importing it (it imports torchvision)."""
  spec = importlib.util.find_spec("qwen_vl_utils")
  path = os.path.join(os.path.dirname(spec.origin), "vision_process.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  keep = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize", "smart_nframes"}
  body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in keep]
  body += [n for n in tree.body if isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) for t in n.targets)
           and all((t.id.isupper() and t.id != "VIDEO_READER_BACKENDS") or t.id == "logger" for t in n.targets)]
  ns = {"math": math, "os": os, "logging": logging, **{n: getattr(typing, n) for n in typing.__all__}}
  exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
  ns.update(constants)
  return ns


def make_clip(path, gop, seed, codec, w=640, h=480, fps=30, seconds=10):
  rng = np.random.default_rng(seed)
  # A smooth random scene (1/16-resolution noise upsampled) plus fine grain: compresses like camera
  # footage rather than like pure noise.
  coarse = PIL.Image.fromarray(rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8))
  texture = np.asarray(coarse.resize((w * 2, h * 2), PIL.Image.Resampling.BICUBIC))
  texture = np.clip(texture + rng.normal(0, 4, texture.shape), 0, 255).astype(np.uint8)
  yy, xx = np.mgrid[:h, :w]
  with av.open(path, "w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.codec_context.gop_size = gop
    if codec == "libx264":
      s.codec_context.options = {"preset": "fast"}
    for i in range(fps * seconds):
      dy, dx = (2 * i) % h, (3 * i) % w  # a slow pan over the scene with a drifting gradient on top
      img = texture[dy:dy + h, dx:dx + w] // 4 * 3 + (((xx + yy + 2 * i) % 256) // 4)[..., None].astype(np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


class Reference:
  """qwen-vl-utils fetch_video (torchvision-style full decode) + Qwen2VLImageProcessorPil, SpaceR settings."""

  def __init__(self):
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf
    from transformers.image_utils import SizeDict, PILImageResampling
    self.q = qwen_vl_utils_pure(FPS_MAX_FRAMES=16)
    self.proc = hf.Qwen2VLImageProcessorPil()
    self.size_dict = SizeDict
    self.bicubic = PILImageResampling.BICUBIC

  def decode(self, path):
    with av.open(path) as c:
      s = c.streams.video[0]
      s.codec_context.thread_count = 1
      frames = [torch.from_numpy(f.to_rgb().to_ndarray()) for f in c.decode(s)]
      fps = float(s.average_rate)
    vid = torch.stack(frames).permute(0, 3, 1, 2)  # TCHW, as read_video(output_format="TCHW")
    total = vid.shape[0]
    n = self.q["smart_nframes"]({}, total_frames=total, video_fps=fps)
    idx = torch.linspace(0, total - 1, n).round().long()
    return vid[idx], n / total * fps

  def preprocess(self, vid):
    n, _, h, w = vid.shape
    min_px = video.VIDEO_MIN_PIXELS
    max_px = max(min(video.VIDEO_MAX_PIXELS, video.VIDEO_TOTAL_PIXELS / n * 2), int(min_px * 1.05))
    rh, rw = self.q["smart_resize"](h, w, factor=28, min_pixels=min_px, max_pixels=max_px)
    out = []
    for frame in vid.numpy():  # CHW uint8
      x = self.proc.resize(frame, size=self.size_dict(shortest_edge=min_px, longest_edge=max_px),
                           resample=self.bicubic, factor=28)
      x = self.proc.rescale(x, 1 / 255)
      out.append(self.proc.normalize(x, self.proc.image_mean, self.proc.image_std))
    v = np.stack(out)
    assert v.shape[2:] == (rh, rw)
    gt, gh, gw = n // 2, rh // 14, rw // 14
    v = v.reshape(gt, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return v.reshape(gt * gh * gw, 1176), np.array([gt, gh, gw])


def timed(fn, paths, reps):
  """Clips per second of process CPU time (best of reps): the work is single-threaded, and CPU time
  stays meaningful on a machine shared with other jobs, where wall time does not."""
  best = math.inf
  for _ in range(reps):
    t0 = time.process_time()
    for p in paths:
      fn(p)
    best = min(best, time.process_time() - t0)
  return len(paths) / best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--clips", type=int, default=4)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--gops", default="250,30")
  ap.add_argument("--seconds", type=int, default=10)
  ap.add_argument("--dir", default="/tmp/bench_video2")
  args = ap.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  ref = Reference()
  print(f"codec {codec}, {args.clips} clips x 640x480 x {args.seconds} s @ 30 fps per GOP, best of {args.reps}, "
        f"1 thread, av {av.__version__}")
  for gop in [int(g) for g in args.gops.split(",")]:
    paths = []
    for i in range(args.clips):
      path = os.path.join(args.dir, f"{codec}_gop{gop}_{args.seconds}s_{i}.mp4")
      if not os.path.exists(path):
        make_clip(path, gop, i, codec, seconds=args.seconds)
      paths.append(path)
    # Identical outputs first.
    for p in paths:
      ours = video.load_video(p)
      vid, _ = ref.decode(p)
      pv, grid = ref.preprocess(vid)
      np.testing.assert_array_equal(ours.grid_thw, grid)
      np.testing.assert_array_equal(ours.pixel_values, pv)
    clip = video.read_video(paths[0])
    with av.open(paths[0]) as c:
      kinds = collections.Counter(str(f.pict_type).split(".")[-1] for f in c.decode(video=0))
    mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
    print(f"\nGOP {gop}: {clip.total_frames} frames ({dict(kinds)}, {mb:.1f} MB) -> {len(clip.indices)} sampled, "
          f"grid {ours.grid_thw.tolist()}, pixel_values identical on all clips")
    rows = {
        "ours (auto seek)": timed(lambda p: video.load_video(p), paths, args.reps),
        "ours (seek=never)": timed(lambda p: video.load_video(p, read_kwargs={"seek": "never"}), paths, args.reps),
        "ours decode only": timed(lambda p: video.read_video(p), paths, args.reps),
        "reference": timed(lambda p: ref.preprocess(ref.decode(p)[0]), paths, args.reps),
        "reference decode only": timed(lambda p: ref.decode(p), paths, args.reps),
    }
    for k, v in rows.items():
      print(f"  {k:24s} {v:7.2f} clips/s")
    print(f"  ratio ours/reference: {rows['ours (auto seek)'] / rows['reference']:.2f}x")


if __name__ == "__main__":
  main()
