"""Tests for spacer_jax.data.synthetic: determinism, record formats, and every answer and cognitive map
re-derived here from the scene description by independent code (own geometry, own ray caster)."""

import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys

import av
import numpy as np
import pytest
from absl import app

from spacer_jax.data import synthetic
from spacer_jax.data.synthetic import generate as generate_lib
from spacer_jax.data.synthetic import render as render_lib
from spacer_jax.data.synthetic import scene as scene_lib

# Small frames so the independent ray caster below stays fast; many questions so every task shows up.
TINY = synthetic.SyntheticConfig.default(
    seed=3, num_scenes=4, num_eval_scenes=2, questions_per_scene=40, eval_questions_per_scene=20,
    num_frames=6, height=32, width=40, categories_per_scene=(5, 8), multi_instance_prob=0.3,
    room_size=(5.0, 8.0), min_visible_frac=0.01)

SPACER_KEYS = ["problem_id", "problem", "data_type", "problem_type", "options", "process", "solution", "path",
               "data_source"]
VSI_KEYS = ["id", "dataset", "scene_name", "question_type", "question", "options", "ground_truth"]


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth"))
  synthetic.generate_dataset(root, TINY, progress=False)
  return root


# ---------------------------------------------------------------------------------------------------
# Independent re-computations from the scene description (scenes.jsonl), not using the package.


def _box(obj):
  (cx, cy), (sx, sy, sz) = obj["center"], obj["size"]
  return np.array([cx - sx / 2, cy - sy / 2, 0.0]), np.array([cx + sx / 2, cy + sy / 2, sz])


def _closest_distance(a, b):
  """Closest points of two convex boxes by alternating projections (exact for boxes after 2 rounds)."""
  (alo, ahi), (blo, bhi) = _box(a), _box(b)
  p = (alo + ahi) / 2
  for _ in range(50):
    q = np.clip(p, blo, bhi)
    p = np.clip(q, alo, ahi)
  return float(np.linalg.norm(np.clip(p, blo, bhi) - p))


def _ego_xy(scene, stand, face, query):
  """Coordinates of `query` in the frame of someone at `stand` facing `face` (+y forward, +x right)."""
  a, b, c = (np.array(o["center"], np.float64) for o in (stand, face, query))
  fwd = (b - a) / np.linalg.norm(b - a)
  right = np.array([fwd[1], -fwd[0]])
  rel = c - a
  return float(rel @ right), float(rel @ fwd)


def _rotation(yaw, pitch):
  """World-from-camera rotation; camera axes (forward, left, up) start as world (x, y, z)."""
  rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
  ry = np.array([[math.cos(-pitch), 0, math.sin(-pitch)], [0, 1, 0], [-math.sin(-pitch), 0, math.cos(-pitch)]])
  return rz @ ry


def _id_buffer(scene, cam, height, width):
  """Ray caster by explicit face-plane intersections (not the slab method the package uses)."""
  rot = _rotation(cam["yaw"], cam["pitch"])
  focal = (width / 2) / math.tan(math.radians(scene["fov_deg"]) / 2)
  jj, ii = np.meshgrid(np.arange(width), np.arange(height))
  right_px = (jj + 0.5 - width / 2) / focal
  up_px = (height / 2 - ii - 0.5) / focal
  # camera frame: x forward, y left, z up
  local = np.stack([np.ones_like(right_px), -right_px, up_px], -1).reshape(-1, 3)
  dirs = local @ rot.T
  origin = np.array(cam["position"])
  best_t = np.full(len(dirs), np.inf)
  ids = np.full(len(dirs), -1)
  for k, obj in enumerate(scene["objects"]):
    lo, hi = _box(obj)
    for axis in range(3):
      others = [a for a in range(3) if a != axis]
      for plane in (lo[axis], hi[axis]):
        with np.errstate(divide="ignore", invalid="ignore"):
          t = (plane - origin[axis]) / dirs[:, axis]
        pts = origin + t[:, None] * dirs
        inside = np.all([(pts[:, a] >= lo[a]) & (pts[:, a] <= hi[a]) for a in others], axis=0)
        ok = inside & (t > 0) & (t < best_t)
        best_t[ok] = t[ok]
        ids[ok] = k
  return ids.reshape(height, width)


def _first_frames(scene):
  bufs = [_id_buffer(scene, cam, scene["height"], scene["width"]) for cam in scene["cameras"]]
  need = max(1, math.ceil(scene["min_visible_frac"] * scene["height"] * scene["width"]))
  first = []
  for k in range(len(scene["objects"])):
    seen = [f for f, buf in enumerate(bufs) if int((buf == k).sum()) >= need]
    first.append(seen[0] if seen else None)
  return first, bufs


def _expected_answer(question_type, question, options, scene, first):
  """The answer derived from the scene description; returns the answer text (letter or number)."""
  objs = scene["objects"]
  by_cat = {}
  for o in objs:
    by_cat.setdefault(o["category"], []).append(o)
  visible = lambda o: first[objs.index(o)] is not None

  def one(name):  # the single, visible instance a question about "the {name}" refers to
    assert len(by_cat[name]) == 1 and visible(by_cat[name][0]), f"{name}: not unique or never visible"
    return by_cat[name][0]

  labels = [o.split(". ", 1)[1] for o in options or []]
  letter = lambda label: options[labels.index(label)].split(".")[0]
  if question_type == "object_counting":
    (cat,) = re.fullmatch(r"How many (.+)\(s\) are in this room\?", question).groups()
    assert all(visible(o) for o in by_cat[cat]), f"an instance of {cat} is never visible"
    return str(len(by_cat[cat]))
  if question_type == "object_abs_distance":
    a, b = re.search(r"between the (.+) and the (.+) \(in meters\)", question).groups()
    return f"{round(_closest_distance(one(a), one(b)), 1):.1f}"
  if question_type == "object_size_estimation":
    (cat,) = re.search(r"dimension \(length, width, or height\) of the (.+), measured", question).groups()
    return str(int(round(max(one(cat)["size"]) * 100)))
  if question_type == "room_size_estimation":
    return f"{round(scene['room'][0] * scene['room'][1], 1):.1f}"
  if question_type == "object_rel_distance":
    (target,) = re.search(r"closest to the (.+)\?$", question).groups()
    dists = {lab: _closest_distance(one(target), one(lab)) for lab in labels}
    best = min(dists, key=dists.get)
    assert sorted(dists.values())[1] - dists[best] > 0.2, "ambiguous relative distance"
    return letter(best)
  if question_type.startswith("object_rel_direction"):
    a, b, c = re.search(r"standing by the (.+) and facing the (.+), is the (.+?) to ", question).groups()
    x, y = _ego_xy(scene, one(a), one(b), one(c))
    ang = math.degrees(math.atan2(-x, y))  # counter-clockwise from forward
    level = question_type.rsplit("_", 1)[1]
    boundaries = {"easy": (0, 180), "medium": (45, 135), "hard": (0, 90, 180)}[level]
    assert min(abs(abs(ang) - t) for t in boundaries) > 1.0, "too close to a direction boundary"
    if level == "easy":
      return letter("left" if x < 0 else "right")
    if level == "medium":
      assert abs(ang) > 45, "front is not an option"
      return letter("back" if abs(ang) >= 135 else ("left" if x < 0 else "right"))
    return letter(("front" if y > 0 else "back") + "-" + ("left" if x < 0 else "right"))
  if question_type == "obj_appearance_order":
    (listed,) = re.search(r"in the video: (.+)\?$", question).groups()
    cats = listed.split(", ")
    firsts = {c: min(f for o, f in zip(objs, first) if o["category"] == c and f is not None) for c in cats}
    assert len(set(firsts.values())) == len(cats), "tie in first appearance"
    return letter(", ".join(sorted(cats, key=firsts.get)))
  raise AssertionError(f"unexpected question_type {question_type}")


def _check_split(records, scenes, maps, get):
  """Every record's answer and every scene's map against the independent computations."""
  by_name = {s["name"]: s for s in scenes}
  firsts = {}
  for name, scene in by_name.items():
    first, _ = _first_frames(scene)
    assert first == scene["first_visible_frame"], name
    firsts[name] = first
  seen_types = set()
  for rec in records:
    qtype, question, options, answer, name = get(rec)
    seen_types.add(qtype)
    expected = _expected_answer(qtype, question, options, by_name[name], firsts[name])
    assert answer == expected, (name, qtype, question, options, answer, expected)
  for m in maps:
    scene = by_name[m["video_id"]]
    w, d = scene["room"][:2]
    expected = {}
    for cat in TINY.categories:  # config order, lower-case keys
      cells = [[int(np.digitize(o["center"][0], np.linspace(0, w, 11)[1:-1])),
                int(np.digitize(o["center"][1], np.linspace(0, d, 11)[1:-1]))]
               for o in scene["objects"] if o["category"] == cat]
      if cells:
        expected[cat] = cells
    assert m["cognitive_map"] == expected
    assert list(m["cognitive_map"]) == list(expected) == m["object_list"]
    assert all(k == k.lower() for k in m["cognitive_map"])
  return seen_types


# ---------------------------------------------------------------------------------------------------


def test_train_answers_and_maps_match_independent_computation(tiny_root):
  paths = synthetic.dataset_paths(tiny_root)
  records = _read_jsonl(paths.train_jsonl)
  qtypes = {q["problem_id"]: q["question_type"] for q in _read_jsonl(paths.question_types)}

  def get(rec):
    answer = re.fullmatch(r"<answer>(.+)</answer>", rec["solution"]).group(1)
    return qtypes[rec["problem_id"]], rec["problem"], rec["options"], answer, os.path.basename(rec["path"])[:-4]

  seen = _check_split(records, _read_jsonl(paths.scenes), _read_jsonl(paths.cognitive_map), get)
  assert seen == set(synthetic.TASKS), set(synthetic.TASKS) - seen


def test_eval_answers_and_maps_match_independent_computation(tiny_root):
  paths = synthetic.dataset_paths(tiny_root)
  records = _read_jsonl(paths.eval_jsonl)

  def get(rec):
    return rec["question_type"], rec["question"], rec["options"], rec["ground_truth"], rec["scene_name"]

  seen = _check_split(records, _read_jsonl(paths.eval_scenes), _read_jsonl(paths.eval_cognitive_map), get)
  assert len(seen) >= 5


def test_renderer_id_buffer_matches_independent_ray_caster(tiny_root):
  scene_json = _read_jsonl(synthetic.dataset_paths(tiny_root).scenes)[0]
  scene, _, _, _ = generate_lib.build_scene(TINY, "train", 0)
  _, ids = render_lib.render_video(scene, TINY.height, TINY.width)
  _, bufs = _first_frames(scene_json)
  mismatch = float(np.mean(ids != np.stack(bufs)))
  assert mismatch < 0.002, mismatch  # only rays grazing a box edge may differ
  assert (ids >= 0).any()


def test_spacer_record_format(tiny_root):
  paths = synthetic.dataset_paths(tiny_root)
  records = _read_jsonl(paths.train_jsonl)
  maps = {m["video_id"] for m in _read_jsonl(paths.cognitive_map)}
  assert [r["problem_id"] for r in records] == list(range(1, len(records) + 1))
  for r in records:
    assert list(r) == SPACER_KEYS
    assert r["data_type"] == "video" and r["data_source"] == "SR_dataset"
    # process: the templated SFT trace (<think>...<map>...</map>...</think>; traces.sft_process).
    assert r["process"].startswith("<think>") and r["process"].endswith("</think>")
    assert re.fullmatch(r"<answer>[^<>]+</answer>", r["solution"])
    assert not os.path.isabs(r["path"]) and os.path.exists(os.path.join(tiny_root, r["path"]))
    assert os.path.splitext(os.path.basename(r["path"]))[0] in maps
    if r["problem_type"] == "multiple choice":
      letters = [o.split(". ", 1)[0] for o in r["options"]]
      assert letters == [chr(65 + i) for i in range(len(letters))] and 2 <= len(letters) <= 4
      assert r["solution"][8:-9] in letters
    else:
      assert r["problem_type"] == "numerical" and r["options"] == []
      assert float(r["solution"][8:-9]) > 0


def test_vsibench_record_format(tiny_root):
  paths = synthetic.dataset_paths(tiny_root)
  assert sorted(os.listdir(paths.eval_root)) == ["synthetic", "test.jsonl"]  # usable as a VSI data_dir
  for r in _read_jsonl(paths.eval_jsonl):
    assert list(r) == VSI_KEYS
    assert os.path.exists(os.path.join(paths.eval_root, r["dataset"], r["scene_name"] + ".mp4"))
    assert (r["options"] is None) == (r["question_type"] in ("object_counting", "object_abs_distance",
                                                             "object_size_estimation", "room_size_estimation"))


def test_records_load_through_project_readers(tiny_root):
  from spacer_jax.data import sources  # the text-data helper's readers: our files must pass strictly

  paths = synthetic.dataset_paths(tiny_root)
  train = sources.load_spacer(paths.train_jsonl, strict=True)
  assert len(train) == len(_read_jsonl(paths.train_jsonl)) and train[0].cognitive_map is not None
  held_out = sources.load_vsibench(paths.eval_jsonl, strict=True)
  assert len(held_out) == len(_read_jsonl(paths.eval_jsonl)) and os.path.exists(held_out[0].media)


def test_mp4_decodes_through_pipeline(tiny_root):
  from spacer_jax.data import video

  scene, rgb, _, _ = generate_lib.build_scene(TINY, "train", 1)
  path = os.path.join(tiny_root, "videos", f"{scene.name}.mp4")
  frames, _ = video.decode_video(path)  # SpaceR sampling (2 fps, <= 16 frames) keeps every frame
  assert frames.shape == (TINY.num_frames, TINY.height, TINY.width, 3) and frames.dtype == np.uint8
  eval_frames, _ = video.decode_video(path, fps=1.0, max_frames=32)  # SpaceR-Eval's sampling too
  np.testing.assert_array_equal(eval_frames, frames)
  assert np.abs(frames.astype(np.float64) - rgb).mean() < 6.0  # lossy, but the same pictures
  with av.open(path) as container:
    stream = container.streams.video[0]
    assert stream.average_rate == TINY.fps and stream.frames == TINY.num_frames


def test_deterministic_by_seed(tmp_path, tiny_root):
  config = dataclasses.replace(TINY, num_scenes=2, num_eval_scenes=1)
  a = synthetic.generate_dataset(str(tmp_path / "a"), config, progress=False)
  b = synthetic.generate_dataset(str(tmp_path / "b"), config, progress=False)
  for field in ("train_jsonl", "cognitive_map", "scenes", "eval_jsonl", "eval_scenes"):
    with open(getattr(a, field), "rb") as fa, open(getattr(b, field), "rb") as fb:
      assert fa.read() == fb.read(), field
  for name in sorted(os.listdir(os.path.join(a.root, "videos"))):
    with open(os.path.join(a.root, "videos", name), "rb") as fa, open(os.path.join(b.root, "videos", name), "rb") as fb:
      assert fa.read() == fb.read(), name
  # Scene i does not depend on how many scenes are generated: the first 2 equal the 4-scene run's.
  with open(a.train_jsonl) as fa, open(synthetic.dataset_paths(tiny_root).train_jsonl) as fb:
    small, big = fa.read(), fb.read()
  assert big.startswith(small) and len(big) > len(small)
  other = synthetic.generate_dataset(str(tmp_path / "c"), dataclasses.replace(config, seed=4), progress=False)
  with open(other.train_jsonl) as fc:
    assert fc.read() != small


_ENCODE_SCENES = """
import hashlib, sys
from spacer_jax.data import synthetic
from spacer_jax.data.synthetic import generate, render
config = synthetic.SyntheticConfig.demo(height=84, width=84)
for i in (2, 27, 88, 99):
  render.encode_mp4(generate.build_scene(config, "train", i)[1], sys.argv[1], config.fps, config.codec,
                    config.crf)
  print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
"""


def test_encoding_does_not_read_uninitialised_memory(tmp_path):
  """The same frames give the same mp4 bytes whatever fresh heap memory holds (glibc's MALLOC_PERTURB_
  fills each new allocation with a byte pattern). With its CPU-detected assembly, x264's AVX-512 path
  reads memory it never wrote: on an AVX-512 CPU these 4 demo scenes gave a different file for 3-4 of
  them under each pattern (the synthetic datasets of two demo runs differed in 37 of 288 videos)."""
  outs = []
  for perturb in ("", "85", "170"):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MALLOC_PERTURB_": perturb,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _ENCODE_SCENES, str(tmp_path / f"v{perturb}.mp4")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(proc.stdout.split())
  assert len(outs[0]) == 4 and outs[0] == outs[1] == outs[2], outs


def test_generate_is_idempotent_per_config(tmp_path):
  config = dataclasses.replace(TINY, num_scenes=1, num_eval_scenes=1, questions_per_scene=3)
  root = str(tmp_path / "d")
  paths = synthetic.generate_dataset(root, config, progress=False)
  stamp = os.stat(paths.manifest).st_mtime_ns
  video = os.path.join(root, "videos", "synth_train_00000.mp4")
  os.utime(video, ns=(1, 1))
  assert synthetic.generate_dataset(root, config, progress=False) == paths
  assert os.stat(paths.manifest).st_mtime_ns == stamp and os.stat(video).st_mtime_ns == 1  # nothing rewritten
  changed = dataclasses.replace(config, questions_per_scene=4)
  with pytest.raises(FileExistsError, match="overwrite"):
    synthetic.generate_dataset(root, changed, progress=False)
  synthetic.generate_dataset(root, changed, overwrite=True, progress=False)
  with open(paths.manifest) as f:
    assert json.load(f)["config_hash"] == changed.hash() != config.hash()
  # A run cut short (no manifest) is redone from scratch.
  os.remove(paths.manifest)
  assert not synthetic.is_generated(root, changed)
  synthetic.generate_dataset(root, changed, progress=False)
  assert synthetic.is_generated(root, changed)


def test_objects_do_not_overlap_and_keep_camera_free():
  for i in range(20):
    scene = scene_lib.sample_scene(TINY, scene_lib.scene_rng(0, "train", i), "s")
    w, d, _ = scene.room
    center = np.array([w / 2, d / 2])
    for o in scene.objects:
      assert np.all(o.lo[:2] >= TINY.wall_margin - 1e-9) and o.hi[0] <= w - TINY.wall_margin + 1e-9
      assert o.hi[1] <= d - TINY.wall_margin + 1e-9
      assert np.hypot(*(np.clip(center, o.lo[:2], o.hi[:2]) - center)) >= TINY.free_radius
    for a, b in itertools.combinations(scene.objects, 2):
      gap = np.maximum(0, np.maximum(a.lo[:2] - b.hi[:2], b.lo[:2] - a.hi[:2]))
      assert np.hypot(*gap) >= TINY.min_gap - 1e-9
    for cam in scene.cameras:
      assert np.hypot(*(np.array(cam.position[:2]) - center)) <= TINY.camera_travel / 2 + 1e-9


def test_demo_preset_is_small_and_uses_its_task_mix():
  config = synthetic.SyntheticConfig.demo()
  assert (config.num_frames, config.height, config.width) == (4, 56, 56)
  tasks = {t for t, _ in config.task_weights}
  qtypes = set()
  for i in range(6):
    scene, rgb, _, qs = generate_lib.build_scene(config, "train", i)
    assert rgb.shape == (4, 56, 56, 3) and len(scene.objects) >= 3
    qtypes |= {q.question_type for q in qs}
    assert all(len(q.problem.split(": ")[-1].split(", ")) == 3 for q in qs
               if q.question_type == "obj_appearance_order")
  assert qtypes <= tasks and len(qtypes) >= 3


def test_config_validation_and_hash():
  with pytest.raises(ValueError, match="unknown"):
    synthetic.SyntheticConfig(categories=("chair", "dragon"))
  with pytest.raises(ValueError, match="task_weights"):
    synthetic.SyntheticConfig(task_weights=(("route_planning", 1.0),))
  with pytest.raises(ValueError, match="even"):
    synthetic.SyntheticConfig(height=57)
  assert synthetic.SyntheticConfig().hash() == synthetic.SyntheticConfig.default().hash()
  as_lists = dict(categories=["chair", "bed", "sofa", "table"], categories_per_scene=[2, 3],
                  task_weights=[["object_counting", 1.0]])  # what a ConfigDict or JSON hands over
  listed = synthetic.SyntheticConfig(**as_lists)
  assert listed == synthetic.SyntheticConfig(categories=("chair", "bed", "sofa", "table"),
                                             categories_per_scene=(2, 3), task_weights=(("object_counting", 1.0),))
  assert hash(listed) == hash(dataclasses.replace(listed))
  assert synthetic.SyntheticConfig().hash() != synthetic.SyntheticConfig(seed=1).hash()


def test_command_line(tmp_path, capsys):
  from spacer_jax import cli
  from spacer_jax.data.synthetic import __main__ as synthetic_cli

  out = str(tmp_path / "cli")
  cli.call(synthetic_cli, ["--out", out, "--preset", "demo", "--num_scenes", "2", "--num_eval_scenes",
                           "1", "--seed", "5"])
  assert "num_train_records" in capsys.readouterr().out
  expected = synthetic.SyntheticConfig.demo(num_scenes=2, num_eval_scenes=1, seed=5)
  assert synthetic.is_generated(out, expected)
  out2 = str(tmp_path / "cli2")
  cli.call(synthetic_cli, ["--out", out2, "--num_scenes", "1", "--num_eval_scenes", "1", "--height",
                           "28", "--width", "28", "--num_frames", "4", "--categories",
                           "chair,table,bed,sofa", "--categories_per_scene", "2,4",
                           "--task_weights", "object_counting=1,room_size_estimation=0.5"])
  with pytest.raises(app.UsageError, match="--room_size: expected LO,HI"):
    cli.call(synthetic_cli, ["--out", out2, "--room_size", "4"])
  with open(os.path.join(out2, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["config"]["task_weights"] == [["object_counting", 1.0], ["room_size_estimation", 0.5]]
  assert set(manifest["task_counts"]["train"]) <= {"object_counting", "room_size_estimation"}
  assert manifest["config"]["categories_per_scene"] == [2, 4] and manifest["config"]["height"] == 28


def test_sft_traces_score_full_reward(tiny_root):
  from spacer_jax import rewards  # the rewards helper's scorer: a trace must earn format 1 and accuracy 2
  from spacer_jax.data.synthetic import traces

  paths = synthetic.dataset_paths(tiny_root)
  maps = {m["video_id"]: m["cognitive_map"] for m in _read_jsonl(paths.cognitive_map)}
  qtypes = {q["problem_id"]: q["question_type"] for q in _read_jsonl(paths.question_types)}
  records = _read_jsonl(paths.train_jsonl)
  comps, sols, ptypes, cmaps = [], [], [], []
  for r in records:
    cmap = maps[os.path.basename(r["path"])[:-4]]
    comps.append(traces.sft_completion(qtypes[r["problem_id"]], r["problem"], r["options"],
                                       r["solution"][8:-9], cmap))
    sols.append(r["solution"])
    ptypes.append(r["problem_type"])
    cmaps.append(cmap)
  np.testing.assert_array_equal(rewards.format_reward(comps), 1.0)
  np.testing.assert_allclose(rewards.accuracy_reward(comps, sols, ptypes, cmaps), 2.0)
  with pytest.raises(ValueError, match="not one of the options"):
    traces.sft_completion("object_rel_direction_easy", "If I am standing by the bed and facing the sofa, is the "
                          "chair to the left or the right of the sofa?", ["A. left", "B. right"], "C", {})
  with pytest.raises(ValueError, match="wording"):
    traces.sft_completion("object_counting", "How many chairs?", [], "2", {})


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
  import threading

  config = dataclasses.replace(TINY, num_scenes=2, num_eval_scenes=1, questions_per_scene=3)
  calls = []
  build = generate_lib.build_scene
  monkeypatch.setattr(generate_lib, "build_scene", lambda *a: calls.append(a) or build(*a))
  root = str(tmp_path / "shared")
  threads = [threading.Thread(target=synthetic.generate_dataset, args=(root, config), kwargs={"progress": False})
             for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 3 and synthetic.is_generated(root, config)  # 2 train + 1 eval scene, once
