"""Writes a synthetic dataset to disk in the SpaceR-151k and VSI-Bench formats, once per config.

Layout under `root` (all paths in records are relative to `root`):

  manifest.json                          config, config hash, counts; written last (= "complete")
  SpaceR-synthetic.jsonl                 training records, SpaceR-151k schema;
                                         `process` holds the templated <think> trace (traces.py)
  videos/synth_train_00000.mp4           training videos
  annotation/cognitive_map.jsonl         GT 10x10 maps of the training videos
  annotation/scenes.jsonl                full scene descriptions (room, boxes, cameras, first frames)
  annotation/question_types.jsonl        problem_id -> VSI question_type and video_id (for metrics)
  annotation/cognitive_map_heldout.jsonl, annotation/scenes_heldout.jsonl   the same for held-out scenes
  vsibench_heldout/test.jsonl            held-out questions, VSI-Bench schema
  vsibench_heldout/synthetic/synth_eval_00000.mp4   held-out videos ({vsi_root}/{dataset}/{scene_name}.mp4)

vsibench_heldout/ holds nothing else, so it can be passed as a VSI-Bench data_dir as it is.

Host-only code.
"""

import dataclasses
import fcntl
import json
import os
import shutil

import tqdm

from spacer_jax.data.synthetic import questions as questions_lib
from spacer_jax.data.synthetic import render
from spacer_jax.data.synthetic import scene as scene_lib
from spacer_jax.data.synthetic import traces

TRAIN_JSONL = "SpaceR-synthetic.jsonl"
EVAL_DIR = "vsibench_heldout"  # VSI-Bench-format root of the held-out split
EVAL_DATASET = "synthetic"  # the VSI-Bench `dataset` field of held-out records


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
  """Where generate_dataset put things (absolute paths)."""
  root: str
  manifest: str
  train_jsonl: str
  cognitive_map: str
  scenes: str
  question_types: str
  eval_root: str  # VSI-Bench root: eval_jsonl and {eval_root}/{dataset}/{scene_name}.mp4
  eval_jsonl: str
  eval_cognitive_map: str
  eval_scenes: str


def dataset_paths(root: str) -> SyntheticPaths:
  root = os.path.abspath(root)
  ev = os.path.join(root, EVAL_DIR)
  return SyntheticPaths(
      root=root,
      manifest=os.path.join(root, "manifest.json"),
      train_jsonl=os.path.join(root, TRAIN_JSONL),
      cognitive_map=os.path.join(root, "annotation", "cognitive_map.jsonl"),
      scenes=os.path.join(root, "annotation", "scenes.jsonl"),
      question_types=os.path.join(root, "annotation", "question_types.jsonl"),
      eval_root=ev,
      eval_jsonl=os.path.join(ev, "test.jsonl"),
      eval_cognitive_map=os.path.join(root, "annotation", "cognitive_map_heldout.jsonl"),
      eval_scenes=os.path.join(root, "annotation", "scenes_heldout.jsonl"),
  )


def _dumps(obj) -> str:
  return json.dumps(obj, ensure_ascii=False)


def build_scene(config: scene_lib.SyntheticConfig, split: str, index: int):
  """Samples, renders and questions scene `index` of `split`; fully determined by (config, split, index).

  Returns:
    (scene, rgb uint8[F, H, W, 3], first_frames per object, questions).
  """
  rng = scene_lib.scene_rng(config.seed, split, index)
  scene = scene_lib.sample_scene(config, rng, f"synth_{split}_{index:05d}")
  rgb, ids = render.render_video(scene, config.height, config.width)
  first = render.first_visible_frames(ids, len(scene.objects), config.min_visible_frac)
  n_q = config.questions_per_scene if split == "train" else config.eval_questions_per_scene
  qs = questions_lib.scene_questions(scene, first, config, rng, n_q)
  return scene, rgb, first, qs


def _scene_json(scene, first, config) -> dict:
  return {**scene.to_json(), "first_visible_frame": first, "height": config.height, "width": config.width,
          "min_visible_frac": config.min_visible_frac}


def _map_json(scene, config) -> dict:
  cmap = scene_lib.cognitive_map(scene, config)
  return {"video_id": scene.name, "cognitive_map": cmap, "object_list": list(cmap)}


def is_generated(root: str, config: scene_lib.SyntheticConfig) -> bool:
  """True when root holds a complete dataset for exactly this config."""
  paths = dataset_paths(root)
  if not os.path.exists(paths.manifest):
    return False
  with open(paths.manifest) as f:
    return json.load(f).get("config_hash") == config.hash()


def generate_dataset(root: str, config: scene_lib.SyntheticConfig, *, overwrite: bool = False,
                     progress: bool = True) -> SyntheticPaths:
  """Generates the dataset into root, or returns at once if root already holds it for this config.

  Args:
    root: data directory (created if missing).
    config: the dataset knobs; its hash is recorded in root/manifest.json.
    overwrite: replace a dataset generated from a different config (otherwise that raises).
    progress: show a tqdm bar over scenes.
  Returns:
    SyntheticPaths of the generated files.
  Raises:
    FileExistsError: root holds a complete dataset of another config and overwrite is False.
  """
  paths = dataset_paths(root)
  if is_generated(root, config):
    return paths
  os.makedirs(paths.root, exist_ok=True)
  # Several processes (e.g. one per host on a shared disk) may ask at once: one generates, the
  # others wait on the lock and then find the manifest.
  with open(os.path.join(paths.root, ".generate.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if is_generated(root, config):
        return paths
      _generate_locked(paths, config, overwrite, progress)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return paths


def _generate_locked(paths: SyntheticPaths, config: scene_lib.SyntheticConfig, overwrite: bool,
                     progress: bool) -> None:
  """generate_dataset's body, run under the directory lock."""
  if os.path.exists(paths.manifest) and not overwrite:
    with open(paths.manifest) as f:
      other = json.load(f).get("config_hash")
    raise FileExistsError(f"{paths.manifest}: holds synthetic dataset {other}, not {config.hash()}; "
                          f"pass overwrite=True (--overwrite) or use another directory")
  # Partial (no manifest) or overwritten: start clean so no stale video survives.
  for sub in ("videos", "annotation", EVAL_DIR):
    shutil.rmtree(os.path.join(paths.root, sub), ignore_errors=True)
  if os.path.exists(paths.manifest):
    os.remove(paths.manifest)
  for d in ("videos", "annotation", os.path.join(EVAL_DIR, EVAL_DATASET)):
    os.makedirs(os.path.join(paths.root, d), exist_ok=True)

  task_counts = {"train": {}, "eval": {}}
  bar = tqdm.tqdm(total=config.num_scenes + config.num_eval_scenes, desc="synthetic scenes",
                  disable=not progress, unit="scene")
  problem_id = 1
  with open(paths.train_jsonl, "w") as f_rec, open(paths.cognitive_map, "w") as f_map, \
      open(paths.scenes, "w") as f_scene, open(paths.question_types, "w") as f_qt:
    for i in range(config.num_scenes):
      scene, rgb, first, qs = build_scene(config, "train", i)
      rel = f"videos/{scene.name}.mp4"
      render.encode_mp4(rgb, os.path.join(paths.root, rel), config.fps, config.codec, config.crf)
      map_row = _map_json(scene, config)
      # The trace shows the map exactly as the annotation file holds it (JSON lists, file key order).
      cmap = json.loads(_dumps(map_row))["cognitive_map"]
      for q in qs:
        rec = questions_lib.spacer_record(q, problem_id, rel)
        rec["process"] = traces.sft_process(q.question_type, rec["problem"], rec["options"],
                                            rec["solution"], cmap)
        f_rec.write(_dumps(rec) + "\n")
        f_qt.write(_dumps({"problem_id": problem_id, "question_type": q.question_type,
                           "video_id": scene.name}) + "\n")
        task_counts["train"][q.question_type] = task_counts["train"].get(q.question_type, 0) + 1
        problem_id += 1
      f_map.write(_dumps(map_row) + "\n")
      f_scene.write(_dumps(_scene_json(scene, first, config)) + "\n")
      bar.update(1)

  record_id = 0
  with open(paths.eval_jsonl, "w") as f_rec, open(paths.eval_cognitive_map, "w") as f_map, \
      open(paths.eval_scenes, "w") as f_scene:
    for i in range(config.num_eval_scenes):
      scene, rgb, first, qs = build_scene(config, "eval", i)
      render.encode_mp4(rgb, os.path.join(paths.eval_root, EVAL_DATASET, f"{scene.name}.mp4"),
                        config.fps, config.codec, config.crf)
      for q in qs:
        f_rec.write(_dumps(questions_lib.vsibench_record(q, record_id, EVAL_DATASET, scene.name)) + "\n")
        task_counts["eval"][q.question_type] = task_counts["eval"].get(q.question_type, 0) + 1
        record_id += 1
      f_map.write(_dumps(_map_json(scene, config)) + "\n")
      f_scene.write(_dumps(_scene_json(scene, first, config)) + "\n")
      bar.update(1)
  bar.close()

  manifest = {
      "generator_version": scene_lib.GENERATOR_VERSION,
      "config_hash": config.hash(),
      "config": config.to_json(),
      "codec": render.available_codec(config.codec),
      "num_train_records": problem_id - 1,
      "num_eval_records": record_id,
      "task_counts": task_counts,
      "files": {k: os.path.relpath(v, paths.root) for k, v in dataclasses.asdict(paths).items() if k != "root"},
  }
  tmp = paths.manifest + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, paths.manifest)
