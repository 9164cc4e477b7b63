"""Procedural indoor scenes: the config, the category table, scene sampling and exact geometry.

A scene is a box-shaped room `[0, W] x [0, D] x [0, H]` (metres, z up) holding axis-aligned boxes
that stand on the floor, plus a camera path: the camera stays inside an object-free disc around the
room centre, travels a short straight segment through it and turns (yaw) while it moves, looking
slightly down. Everything a question needs (closest-point distances, sizes, directions, grid cells)
is computed exactly from this description; which frame first shows an object comes from the
renderer's id buffer (render.py).

Host-only NumPy code.
"""

import dataclasses
import hashlib
import json
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Category:
  """One object category: its name (lower case, the cognitive-map key), colour and size range.

  Sizes are (length, width, height) in metres before a random 90-degree turn of the footprint.
  The colour alone identifies the category, so a small model can tell categories apart at 56 px.
  """
  name: str
  color: tuple[int, int, int]
  size_min: tuple[float, float, float]
  size_max: tuple[float, float, float]


# Saturated colours far from the grey floor and the pale walls; sizes roughly as in real rooms.
CATEGORIES = (
    Category("chair", (230, 25, 25), (0.45, 0.45, 0.80), (0.60, 0.60, 1.00)),
    Category("table", (30, 60, 230), (0.90, 0.60, 0.70), (1.60, 1.00, 0.80)),
    Category("bed", (20, 170, 40), (1.90, 0.90, 0.45), (2.10, 1.80, 0.65)),
    Category("sofa", (245, 205, 20), (1.60, 0.80, 0.75), (2.20, 1.00, 0.90)),
    Category("cabinet", (175, 30, 205), (0.80, 0.45, 1.70), (1.20, 0.60, 2.10)),
    Category("trash can", (20, 205, 215), (0.30, 0.30, 0.45), (0.40, 0.40, 0.60)),
    Category("refrigerator", (250, 125, 20), (0.70, 0.70, 1.70), (0.80, 0.75, 1.90)),
    Category("bookshelf", (120, 70, 30), (0.80, 0.30, 1.80), (1.20, 0.40, 2.00)),
)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}

# VSI-Bench question_type names (docs/spacer_recipe.md, "VSI-Bench"); route_planning is not
# generated.
TASKS = (
    "object_counting",
    "object_abs_distance",
    "object_size_estimation",
    "room_size_estimation",
    "object_rel_distance",
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "obj_appearance_order",
)

# Bump when the output for a fixed config changes, so cached datasets are regenerated.
GENERATOR_VERSION = 2  # 2: training records carry the SFT trace in `process`


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Every knob of the synthetic dataset. Frozen: its hash names the generated dataset.

  Attributes:
    seed: master seed; scene i of split s uses its own generator seeded by (seed, s, i), so adding
      scenes never changes the earlier ones.
    num_scenes / num_eval_scenes: videos in the training split and in the VSI-format held-out split.
    questions_per_scene / eval_questions_per_scene: questions drawn per video (fewer if the scene
      cannot support the drawn tasks).
    num_frames: frames per video (even). At `fps` = 1, SpaceR's sampling (2 fps, at most 16 frames)
      and SpaceR-Eval's (1 fps, at most 32) both keep every frame of a video of <= 16 frames, so
      the model sees exactly the frames the answers (appearance order) were computed from.
    height / width: frame size in pixels (even: yuv420p).
    categories: category names used (subset of CATEGORIES).
    categories_per_scene: inclusive range of distinct categories per room.
    max_instances / multi_instance_prob: each present category gets 1 instance, or with
      probability multi_instance_prob, 2..max_instances.
    room_size: inclusive range of each floor side (m); room_height likewise.
    wall_margin: minimal gap between an object and a wall (m).
    min_gap: minimal closest-point distance between two objects (m); keeps distances >= 0.1 m.
    free_radius: radius of the object-free disc around the room centre (m) that holds the camera.
    camera_travel: length of the straight camera path through the centre (m), < 2 * free_radius.
    camera_height / camera_pitch_deg / fov_deg: pinhole camera (horizontal field of view).
    sweep_deg: total yaw turned over the video; frame k looks at yaw0 + sweep * k / num_frames.
    min_visible_frac: an object is visible in a frame when it covers at least this fraction of the
      pixels (and at least one pixel).
    order_length: categories per appearance-order question (VSI-Bench: 4).
    direction_margin_deg: relative-direction questions skip objects closer than this to a boundary.
    distance_margin: relative-distance questions need the closest option to win by this (m).
    task_weights: (task, weight) pairs; tasks from TASKS.
    codec / crf: video encoder (libx264, or mpeg4 where the av wheel lacks x264) and x264 quality.
  """
  seed: int = 0
  num_scenes: int = 200
  num_eval_scenes: int = 40
  questions_per_scene: int = 12
  eval_questions_per_scene: int = 12
  num_frames: int = 16
  height: int = 224
  width: int = 224
  fps: int = 1
  categories: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
  categories_per_scene: tuple[int, int] = (4, 7)
  max_instances: int = 3
  multi_instance_prob: float = 0.3
  room_size: tuple[float, float] = (4.0, 8.0)
  room_height: tuple[float, float] = (2.6, 3.0)
  wall_margin: float = 0.05
  min_gap: float = 0.2
  free_radius: float = 0.9
  camera_travel: float = 0.6
  camera_height: float = 1.5
  camera_pitch_deg: float = -20.0
  fov_deg: float = 90.0
  sweep_deg: float = 360.0
  min_visible_frac: float = 0.002
  order_length: int = 4
  direction_margin_deg: float = 10.0
  distance_margin: float = 0.25
  task_weights: tuple[tuple[str, float], ...] = (
      ("object_counting", 1.0),
      ("object_abs_distance", 1.0),
      ("object_size_estimation", 1.0),
      ("room_size_estimation", 0.5),
      ("object_rel_distance", 1.0),
      ("object_rel_direction_easy", 0.5),
      ("object_rel_direction_medium", 0.5),
      ("object_rel_direction_hard", 1.0),
      ("obj_appearance_order", 1.0),
  )
  codec: str = "libx264"
  crf: int = 12

  def __post_init__(self):
    # ml_collections / JSON hand over lists; keep the dataclass hashable and its hash stable.
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, list):
        object.__setattr__(self, f.name, tuple(tuple(x) if isinstance(x, list) else x for x in v))
    unknown = [c for c in self.categories if c not in CATEGORY_BY_NAME]
    if unknown:
      raise ValueError(f"SyntheticConfig.categories: unknown {unknown}; known: {list(CATEGORY_BY_NAME)}")
    lo, hi = self.categories_per_scene
    if not 1 <= lo <= hi <= len(self.categories):
      raise ValueError(f"SyntheticConfig.categories_per_scene={self.categories_per_scene} must satisfy "
                       f"1 <= lo <= hi <= len(categories)={len(self.categories)}")
    bad = [t for t, _ in self.task_weights if t not in TASKS]
    if bad:
      raise ValueError(f"SyntheticConfig.task_weights: unknown tasks {bad}; known: {list(TASKS)}")
    if not self.task_weights or min(w for _, w in self.task_weights) < 0 or \
        sum(w for _, w in self.task_weights) <= 0:
      raise ValueError(f"SyntheticConfig.task_weights={self.task_weights}: need >= 0 weights, sum > 0")
    if self.height % 2 or self.width % 2:
      raise ValueError(f"SyntheticConfig: height={self.height}, width={self.width} must be even (yuv420p)")
    if self.num_frames < 2 or self.num_frames % 2:
      raise ValueError(f"SyntheticConfig.num_frames={self.num_frames} must be even and >= 2 (frame factor 2)")
    if self.camera_travel / 2 >= self.free_radius:
      raise ValueError("SyntheticConfig: camera_travel / 2 must be < free_radius (camera stays off objects)")
    if 2 * (self.free_radius + self.wall_margin) >= self.room_size[0]:
      raise ValueError("SyntheticConfig: room_size[0] too small for free_radius (no room for objects)")
    if self.order_length < 2:
      raise ValueError(f"SyntheticConfig.order_length={self.order_length} must be >= 2")

  @classmethod
  def default(cls, **overrides) -> "SyntheticConfig":
    """The benchmark-like set: 16 frames at 224x224, 8 categories, every task type."""
    return cls(**overrides)

  @classmethod
  def demo(cls, **overrides) -> "SyntheticConfig":
    """The CPU demo set: 4 frames at 56x56, 5 big saturated categories, tasks a tiny model can learn.

    Counting and appearance order are read off the frames; object size depends mostly on the
    category (learnable from the question text, refined by vision); left/right direction needs a
    coarse layout. Four frames turning 90 degrees each cover the whole room once.
    """
    base = dict(
        num_scenes=256, num_eval_scenes=32, questions_per_scene=10, eval_questions_per_scene=10,
        num_frames=4, height=56, width=56,
        categories=("chair", "table", "bed", "sofa", "cabinet"),
        categories_per_scene=(4, 5), max_instances=3, multi_instance_prob=0.5,
        room_size=(4.0, 6.0), min_visible_frac=0.004, order_length=3,
        # Realised mix (appearance order and direction need suitable rooms): about 35% counting,
        # 20% size, 25% appearance order, 20% left/right; see the manifest's task_counts.
        task_weights=(("object_counting", 0.25), ("object_size_estimation", 0.15),
                      ("obj_appearance_order", 0.3), ("object_rel_direction_easy", 0.3)),
    )
    base.update(overrides)
    return cls(**base)

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def hash(self) -> str:
    """Stable hash of the config and the generator version (names a generated dataset)."""
    blob = json.dumps({"version": GENERATOR_VERSION, "config": self.to_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Obj:
  """An axis-aligned box standing on the floor: centre (x, y) and size (sx, sy, sz) in metres."""
  category: str
  center: tuple[float, float]
  size: tuple[float, float, float]

  @property
  def lo(self) -> np.ndarray:
    return np.array([self.center[0] - self.size[0] / 2, self.center[1] - self.size[1] / 2, 0.0])

  @property
  def hi(self) -> np.ndarray:
    return np.array([self.center[0] + self.size[0] / 2, self.center[1] + self.size[1] / 2, self.size[2]])


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera pose: position (x, y, z), yaw (radians, 0 = +x, counter-clockwise), pitch."""
  position: tuple[float, float, float]
  yaw: float
  pitch: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """A room, its objects and the camera path (one camera per video frame)."""
  name: str
  room: tuple[float, float, float]  # (W, D, H): x extent, y extent, height
  objects: tuple[Obj, ...]
  cameras: tuple[Camera, ...]
  fov_deg: float

  def to_json(self) -> dict:
    return {
        "name": self.name,
        "room": list(self.room),
        "fov_deg": self.fov_deg,
        "objects": [{"category": o.category, "center": list(o.center), "size": list(o.size)}
                    for o in self.objects],
        "cameras": [{"position": list(c.position), "yaw": c.yaw, "pitch": c.pitch} for c in self.cameras],
    }

  def categories_present(self, config: SyntheticConfig) -> list[str]:
    """Present categories in config order (the cognitive-map key order)."""
    present = {o.category for o in self.objects}
    return [c for c in config.categories if c in present]

  def counts(self) -> dict[str, int]:
    out = {}
    for o in self.objects:
      out[o.category] = out.get(o.category, 0) + 1
    return out


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """Independent generator for scene `index` of `split` ("train" | "eval")."""
  return np.random.default_rng([seed, {"train": 0, "eval": 1}[split], index])


def _rect_gap(a_lo, a_hi, b_lo, b_hi) -> float:
  """Closest-point distance between two axis-aligned rectangles (0 if they touch or overlap)."""
  dx = max(0.0, b_lo[0] - a_hi[0], a_lo[0] - b_hi[0])
  dy = max(0.0, b_lo[1] - a_hi[1], a_lo[1] - b_hi[1])
  return math.hypot(dx, dy)


def sample_scene(config: SyntheticConfig, rng: np.random.Generator, name: str) -> Scene:
  """Draws a room, places objects without overlap (rejection sampling) and lays out the camera path."""
  # Room sides rounded to 0.1 m so room areas read cleanly.
  w = round(float(rng.uniform(*config.room_size)), 1)
  d = round(float(rng.uniform(*config.room_size)), 1)
  h = round(float(rng.uniform(*config.room_height)), 2)
  center = np.array([w / 2, d / 2])

  lo_n, hi_n = config.categories_per_scene
  n_cat = int(rng.integers(lo_n, hi_n + 1))
  chosen = [config.categories[i] for i in sorted(rng.choice(len(config.categories), n_cat, replace=False))]
  wanted = []
  for cat in chosen:
    n = 1
    if config.max_instances > 1 and rng.random() < config.multi_instance_prob:
      n = int(rng.integers(2, config.max_instances + 1))
    wanted += [cat] * n

  objects: list[Obj] = []
  for cat in wanted:
    spec = CATEGORY_BY_NAME[cat]
    size = [round(float(rng.uniform(a, b)), 2) for a, b in zip(spec.size_min, spec.size_max)]
    if rng.random() < 0.5:  # turn the footprint by 90 degrees
      size[0], size[1] = size[1], size[0]
    half = np.array(size[:2]) / 2
    for _ in range(200):
      c = np.array([rng.uniform(config.wall_margin + half[0], w - config.wall_margin - half[0]),
                    rng.uniform(config.wall_margin + half[1], d - config.wall_margin - half[1])])
      if np.any(np.isnan(c)):
        break  # object wider than the room
      c = np.round(c, 2)
      lo, hi = c - half, c + half
      # distance from the room centre to the footprint: the camera disc must stay free.
      nearest = np.clip(center, lo, hi)
      if np.hypot(*(nearest - center)) < config.free_radius:
        continue
      if any(_rect_gap(lo, hi, o.lo[:2], o.hi[:2]) < config.min_gap for o in objects):
        continue
      objects.append(Obj(cat, (float(c[0]), float(c[1])), (size[0], size[1], size[2])))
      break

  # Camera: straight segment through the centre, turning by sweep_deg over the video.
  theta = float(rng.uniform(0, 2 * math.pi))
  yaw0 = float(rng.uniform(0, 2 * math.pi))
  step = np.array([math.cos(theta), math.sin(theta)]) * config.camera_travel
  start = center - step / 2
  t_frames = config.num_frames
  cameras = []
  for k in range(t_frames):
    p = start + step * (k / (t_frames - 1))
    cameras.append(Camera((float(p[0]), float(p[1]), config.camera_height),
                          yaw0 + math.radians(config.sweep_deg) * k / t_frames,
                          math.radians(config.camera_pitch_deg)))
  return Scene(name, (w, d, h), tuple(objects), tuple(cameras), config.fov_deg)


def box_distance(a: Obj, b: Obj) -> float:
  """Closest-point (Euclidean, 3D) distance between two boxes in metres; 0 if they intersect."""
  gap = np.maximum(0.0, np.maximum(b.lo - a.hi, a.lo - b.hi))
  return float(np.sqrt(np.sum(gap * gap)))


def cognitive_map(scene: Scene, config: SyntheticConfig, grid: int = 10) -> dict[str, list[list[int]]]:
  """Ground-truth cognitive map: category -> [[x, y], ...] grid cells of the instance centres.

  The grid covers the floor: cell x = floor(cx / W * grid) (clipped to grid - 1), y likewise with D.
  Keys are lower-case, in config category order; instances in scene order.
  """
  w, d, _ = scene.room
  out: dict[str, list[list[int]]] = {}
  for cat in scene.categories_present(config):
    out[cat] = [[min(grid - 1, int(math.floor(o.center[0] / w * grid))),
                 min(grid - 1, int(math.floor(o.center[1] / d * grid)))]
                for o in scene.objects if o.category == cat]
  return out
