"""Tiny test videos written with PyAV (shared by the pipeline, tfds and sampler tests)."""

import av
import numpy as np


def make_mp4(path, frames=8, height=56, width=84, fps=4, seed=0, colors=None, codec="libx264"):
  """Writes a small clip (random content, or one flat RGB colour per frame) and returns `path`."""
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    for k in range(frames):
      img = (np.full((height, width, 3), colors[k], np.uint8) if colors is not None
             else rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path
