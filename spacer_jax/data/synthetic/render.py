"""NumPy ray caster for synthetic scenes, object visibility per frame, and mp4 encoding with PyAV.

One primary ray per pixel is intersected with every object box (slab method) and with the room
box seen from inside; the nearest hit gives the colour (flat category colour times a per-face shade,
1 m floor tiles, a distinct tint per wall) and the object id (-1 for room surfaces). At 56x56 a
frame takes about a millisecond; at 224x224 a few tens of milliseconds.

Host-only NumPy code.
"""

import fractions
import math
import os

import av
import numpy as np

from spacer_jax.data.synthetic import scene as scene_lib

# Face shade by hit axis (x, y, z): top faces brightest, so box edges stay visible.
_FACE_SHADE = np.array([0.82, 0.66, 1.0])
_FLOOR = (np.array([150, 150, 150]), np.array([120, 120, 120]))  # 1 m checker tiles
_CEILING = np.array([235, 235, 235])
# Walls at x = 0, x = W, y = 0, y = D: distinct pale tints so the camera's heading can be read.
_WALLS = np.array([[214, 200, 182], [190, 205, 214], [205, 214, 190], [214, 190, 205]])


def _basis(camera: scene_lib.Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(forward, right, up) unit vectors of the camera in world coordinates."""
  cy, sy = math.cos(camera.yaw), math.sin(camera.yaw)
  cp, sp = math.cos(camera.pitch), math.sin(camera.pitch)
  forward = np.array([cp * cy, cp * sy, sp])
  right = np.array([sy, -cy, 0.0])
  return forward, right, np.cross(right, forward)


def _focal(width: int, fov_deg: float) -> float:
  return (width / 2) / math.tan(math.radians(fov_deg) / 2)


def camera_rays(camera: scene_lib.Camera, height: int, width: int, fov_deg: float) -> np.ndarray:
  """Unit ray directions float64[height, width, 3] (row 0 = top of the image).

  Horizontal field of view fov_deg, square pixels; yaw 0 looks along +x, pitch < 0 looks down.
  """
  focal = _focal(width, fov_deg)
  forward, right, up = _basis(camera)
  u = (np.arange(width) + 0.5 - width / 2) / focal
  v = -(np.arange(height) + 0.5 - height / 2) / focal
  rays = forward + u[None, :, None] * right + v[:, None, None] * up
  return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def _screen_window(obj: scene_lib.Obj, camera: scene_lib.Camera, focal: float, height: int,
                   width: int) -> tuple[int, int, int, int] | None:
  """Pixel rectangle (r0, r1, c0, c1) holding the box's projection; None if it is behind the camera.

  With every corner in front of the camera the projection lies in the hull of the projected corners;
  a box straddling the camera plane gets the whole frame.
  """
  forward, right, up = _basis(camera)
  corners = np.array([[x, y, z] for x in (obj.lo[0], obj.hi[0]) for y in (obj.lo[1], obj.hi[1])
                      for z in (obj.lo[2], obj.hi[2])]) - np.array(camera.position)
  depth = corners @ forward
  if depth.max() <= 0:
    return None
  if depth.min() < 1e-3:
    return 0, height, 0, width
  cols = focal * (corners @ right) / depth + width / 2
  rows = height / 2 - focal * (corners @ up) / depth
  r0, r1 = max(0, math.floor(rows.min()) - 1), min(height, math.ceil(rows.max()) + 1)
  c0, c1 = max(0, math.floor(cols.min()) - 1), min(width, math.ceil(cols.max()) + 1)
  return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def render_frame(scene: scene_lib.Scene, camera: scene_lib.Camera, height: int, width: int,
                 colors: dict[str, tuple[int, int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Renders one frame.

  Returns:
    rgb uint8[height, width, 3] and ids int32[height, width] (object index into scene.objects,
    -1 where a wall, the floor or the ceiling is seen).
  """
  colors = colors or {c.name: c.color for c in scene_lib.CATEGORIES}
  origin = np.array(camera.position)
  dirs = camera_rays(camera, height, width, scene.fov_deg)
  # Avoid 0-division in the slab test; a component of 1e-300 behaves as "parallel".
  inv = 1.0 / np.where(dirs == 0.0, 1e-300, dirs)

  # Room seen from inside: the exit point of the room box.
  w, d, h = scene.room
  t_far = np.maximum((np.zeros(3) - origin) * inv, (np.array([w, d, h]) - origin) * inv)
  exit_axis = np.argmin(t_far, axis=-1)
  t_room = np.take_along_axis(t_far, exit_axis[..., None], -1)[..., 0]
  rgb = np.empty((height, width, 3))
  hit = origin + t_room[..., None] * dirs
  floor = (exit_axis == 2) & (dirs[..., 2] < 0)
  tile = (np.floor(hit[..., 0]) + np.floor(hit[..., 1])).astype(np.int64) % 2
  rgb[floor] = np.where(tile[floor, None] == 0, _FLOOR[0], _FLOOR[1])
  rgb[(exit_axis == 2) & (dirs[..., 2] >= 0)] = _CEILING
  walls = exit_axis < 2
  wall_idx = 2 * exit_axis + (np.take_along_axis(dirs, exit_axis[..., None], -1)[..., 0] > 0)
  rgb[walls] = _WALLS[wall_idx[walls]]

  # Objects (all inside the room, so in front of the wall they cover): z-buffer over the boxes, each
  # tested only on the pixels of its projected bounding rectangle.
  focal = _focal(width, scene.fov_deg)
  t_best = np.full((height, width), np.inf)
  ids = np.full((height, width), -1, np.int32)
  face = np.zeros((height, width), np.int64)
  for k, obj in enumerate(scene.objects):
    window = _screen_window(obj, camera, focal, height, width)
    if window is None:
      continue
    r0, r1, c0, c1 = window
    inv_w = inv[r0:r1, c0:c1]
    t1, t2 = (obj.lo - origin) * inv_w, (obj.hi - origin) * inv_w
    t_min = np.minimum(t1, t2)
    t_near = t_min.max(-1)
    win_t = t_best[r0:r1, c0:c1]  # views: writes land in the full buffers
    front = (t_near <= np.maximum(t1, t2).min(-1)) & (t_near > 0) & (t_near < win_t)
    win_t[front] = t_near[front]
    ids[r0:r1, c0:c1][front] = k
    face[r0:r1, c0:c1][front] = t_min.argmax(-1)[front]
  seen = ids >= 0
  if seen.any():
    obj_rgb = np.array([colors[o.category] for o in scene.objects], np.float64)
    rgb[seen] = obj_rgb[ids[seen]] * _FACE_SHADE[face[seen], None]
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8), ids


def render_video(scene: scene_lib.Scene, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Renders every camera of the scene: rgb uint8[F, H, W, 3], ids int32[F, H, W]."""
  frames = [render_frame(scene, cam, height, width) for cam in scene.cameras]
  return np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames])


def first_visible_frames(ids: np.ndarray, num_objects: int, min_visible_frac: float) -> list[int | None]:
  """Per object: index of the first frame where it covers >= max(1, ceil(frac * H * W)) pixels.

  Args:
    ids: int32[F, H, W] id buffers from render_video.
  Returns:
    list of length num_objects; None for an object never visible.
  """
  f, h, w = ids.shape
  min_px = max(1, math.ceil(min_visible_frac * h * w))
  counts = np.stack([np.bincount(ids[k].ravel() + 1, minlength=num_objects + 1)[1:] for k in range(f)])
  out = []
  for i in range(num_objects):
    frames = np.nonzero(counts[:, i] >= min_px)[0]
    out.append(int(frames[0]) if frames.size else None)
  return out


def available_codec(preferred: str) -> str:
  """The preferred encoder if this av build has it, else mpeg4 (always built into FFmpeg)."""
  if preferred in av.codecs_available:
    return preferred
  if "mpeg4" in av.codecs_available:
    return "mpeg4"
  raise RuntimeError(f"PyAV {av.__version__} has neither {preferred!r} nor 'mpeg4' encoders")


# x264's portable C code: the same bytes on every CPU, and no reads of unwritten memory (encode_mp4).
X264_PARAMS = "asm=0"


def encode_mp4(frames: np.ndarray, path: str, fps: int, codec: str = "libx264", crf: int = 12) -> None:
  """Writes uint8[F, H, W, 3] RGB frames to an mp4 (yuv420p) at `path`, atomically.

  x264 runs single-threaded with bitexact flags and its portable C code (`asm=0`), so the bytes depend
  only on the frames: with its CPU-detected assembly, x264 0.165's AVX-512 path reads memory it never
  wrote, and the same frames encoded twice in one process gave different files (pixel differences of
  up to 5) depending on what the heap held before (37 of the demo's 288 videos differed between two
  runs; the AVX2 and C paths give one file whatever the heap holds). The C path costs ~5 CPU ms per
  84x84 4-frame video (9.5 vs 4.1 ms), ~1.6 s over the demo's dataset.
  """
  codec = available_codec(codec)
  tmp = path + ".tmp"
  with av.open(tmp, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
    stream = container.add_stream(codec, rate=fractions.Fraction(fps))
    stream.width = frames.shape[2]
    stream.height = frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.thread_count = 1
    if codec == "libx264":
      stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "flags": "+bitexact",
                        "x264-params": X264_PARAMS}
    else:
      stream.options = {"flags": "+bitexact"}
      stream.codec_context.bit_rate = 8 * frames.shape[1] * frames.shape[2] * fps
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  os.replace(tmp, path)
