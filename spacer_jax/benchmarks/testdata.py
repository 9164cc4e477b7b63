"""Tiny synthetic files in each benchmark's release format, and a tiny random model to run them with.

For tests and smoke runs of `spacer_jax.evaluate` (the questions are nonsense; only the formats, the
layouts and the field types are the releases'):

  python -m spacer_jax.benchmarks.testdata --out /tmp/bench --tiny_model /tmp/bench/model
  python -m spacer_jax.evaluate --config=configs/eval_stibench.py \
      --config.model_dir=/tmp/bench/model --config.data_dir=/tmp/bench/stibench \
      --config.dtype=float32 --config.max_new_tokens=8 --config.prompt_buckets='(1024,)' \
      --workdir=/tmp/bench/out_sti

Every benchmark gets `per_task` questions for each of its tasks (task names of the release), 56x56
videos of 4 frames at 2 fps (or PNG images for SPAR-Bench), in `{out}/{benchmark}/`.
"""

import io
import json
import os

import numpy as np
import PIL.Image

from spacer_jax.data.synthetic import render

FRAMES, HEIGHT, WIDTH, FPS = 4, 56, 56, 2


def write_video(path, seed=0, frames=FRAMES, height=HEIGHT, width=WIDTH, fps=FPS):
  """A small random-colour mp4 at `path` (parents created)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
  render.encode_mp4(data, path, fps=fps)
  return path


def png_bytes(seed=0, height=HEIGHT, width=84):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _write_rows(path, rows):
  """Rows to *.parquet (pyarrow), *.jsonl or *.json (a list), by the extension of `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.endswith(".parquet"):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.Table.from_pylist(rows), path)
  elif path.endswith(".jsonl"):
    with open(path, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  else:
    with open(path, "w") as f:
      json.dump(rows, f)
  return path


def write_vsibench(root, per_task=1, num_videos=3):
  from spacer_jax import vsibench  # pylint: disable=g-import-not-at-top
  rows, n = [], 0
  for qtype in vsibench.QUESTION_TYPES:
    for _ in range(per_task):
      mca = vsibench.is_mca(qtype)
      rows.append({"id": n, "dataset": "scannet", "scene_name": f"scene{n % num_videos:04d}_00",
                   "question_type": qtype, "question": f"Question {n} about the room?",
                   "options": ["A. left", "B. right", "C. behind", "D. front"] if mca else None,
                   "ground_truth": "ABCD"[n % 4] if mca else str(1.5 + n)})
      n += 1
  for k in range(num_videos):
    write_video(os.path.join(root, "scannet", f"scene{k:04d}_00.mp4"), seed=k)
  return _write_rows(os.path.join(root, "test-00000-of-00001.parquet"), rows)


def write_stibench(root, per_task=1, num_videos=3):
  from spacer_jax.benchmarks import stibench  # pylint: disable=g-import-not-at-top
  rows, n = [], 0
  for task in stibench.TASKS:
    for _ in range(per_task):
      rows.append({"ID": n, "Video": f"clip{n % num_videos}.mp4", "Task": task,
                   "time_start": 0.0, "time_end": 1.5 + n % 2,
                   "Question": f"What does the camera do in clip {n}?",
                   "Candidates": {"A": "moves left", "B": "moves right", "C": "stays",
                                  "D": "turns", "E": "rises"},
                   "Answer": "ABCDE"[n % 5]})
      n += 1
  for k in range(num_videos):
    write_video(os.path.join(root, "video", f"clip{k}.mp4"), seed=10 + k)
  return _write_rows(os.path.join(root, "qa.parquet"), rows)


def _spar_answer(task, n):
  from spacer_jax.benchmarks import sparbench  # pylint: disable=g-import-not-at-top
  if task in sparbench.MCA_TASKS:
    return "ABCD"[n % 4]
  if task in sparbench.NA_TASKS:
    return f"{1.25 + n:.2f}"
  return "move_right:0.5,rotate_left:15.0"


def write_sparbench(root, per_task=1, shards=2):
  from spacer_jax.benchmarks import sparbench  # pylint: disable=g-import-not-at-top
  rows, n = [], 0
  for task in sparbench.TASKS:
    multi = task.endswith("_mv") or task in sparbench.GROUPS["Middle"]
    for _ in range(per_task):
      rows.append({"id": f"spar_{n}", "task": task,
                   "img_type": "multi-view" if multi else "single-view",
                   "question": f"Question {n} about the images.",
                   "answer": _spar_answer(task, n),
                   "image": [{"bytes": png_bytes(100 + n + k), "path": f"img_{n}_{k}.png"}
                             for k in range(2 if multi else 1)]})
      n += 1
  paths = []
  for s in range(shards):
    paths.append(_write_rows(os.path.join(root, "data", f"test-{s:05d}-of-{shards:05d}.parquet"),
                             rows[s::shards]))
  return paths


def write_videomme(root, per_task=1, num_videos=3):
  from spacer_jax.benchmarks import videomme  # pylint: disable=g-import-not-at-top
  rows, n = [], 0
  for task in videomme.TASK_TYPES:
    for _ in range(per_task):
      rows.append({"video_id": f"{n % num_videos:03d}", "videoID": f"vid{n % num_videos}",
                   "duration": videomme.DURATIONS[n % 3], "domain": "Knowledge",
                   "question_id": f"{n:03d}-1", "task_type": task,
                   "question": f"Question {n} about the video?",
                   "options": ["A. one", "B. two", "C. three", "D. four"],
                   "answer": "ABCD"[n % 4]})
      n += 1
  for k in range(num_videos):
    write_video(os.path.join(root, "data", f"vid{k}.mp4"), seed=20 + k)
  return _write_rows(os.path.join(root, "videomme", "test-00000-of-00001.parquet"), rows)


def write_tempcompass(root, per_task=1, num_videos=3):
  rows, n = [], 0
  for dim in ("action", "speed", "direction", "order", "attribute_change"):
    for _ in range(per_task):
      rows.append({"problem_id": n, "video_id": f"tc{n % num_videos}", "question": dim,
                   "problem": f"What is the {dim} in video {n}?", "data_type": "video",
                   "problem_type": "multiple choice",
                   "options": ["A. first", "B. second", "C. third", "D. fourth"],
                   "solution": f"<answer>{'ABCD'[n % 4]}</answer>"})
      n += 1
  for k in range(num_videos):
    write_video(os.path.join(root, "videos", f"tc{k}.mp4"), seed=30 + k)
  return _write_rows(os.path.join(root, "eval_tempcompass.json"), rows)


def write_longvideobench(root, per_task=1, num_videos=3):
  from spacer_jax.benchmarks import longvideobench  # pylint: disable=g-import-not-at-top
  rows, n = [], 0
  for cat in longvideobench.PERCEPTION[:3] + longvideobench.RELATION[:3]:
    for _ in range(per_task):
      rows.append({"id": f"lvb_{n}", "video_id": f"lv{n % num_videos}",
                   "question": f"Question {n} about the long video?",
                   "candidates": ["red", "green", "blue", "white", "black"][:4 + n % 2],
                   "correct_choice": n % 4, "question_category": cat, "topic_category": "NP-News",
                   "duration": 15.0})
      n += 1
  for k in range(num_videos):
    write_video(os.path.join(root, "videos", f"lv{k}.mp4"), seed=40 + k)
  return _write_rows(os.path.join(root, "lvb_val.json"), rows)


WRITERS = {
    "vsibench": write_vsibench,
    "stibench": write_stibench,
    "sparbench": write_sparbench,
    "videomme": write_videomme,
    "tempcompass": write_tempcompass,
    "longvideobench": write_longvideobench,
}


def write(benchmark, root, per_task=1):
  """Writes `benchmark`'s synthetic files under `root` (its data_dir); returns root."""
  WRITERS[benchmark](root, per_task=per_task)
  return root


def write_tiny_model(model_dir, seed=0):
  """A tiny random Qwen2.5-VL with the project's offline tokenizer, saved as an HF checkpoint."""
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  ids = tokenizer_lib.build_offline_tokenizer(model_dir).special_ids()
  ids["eos_token_id"] = (ids["eos_token_id"],)
  qwen2_5_vl.save_hf(qwen2_5_vl.init_model(qwen2_5_vl.tiny(**ids), seed=seed), model_dir)
  return model_dir


def define_flags(fv=None):
  """The command-line flags (defined only when run as a program)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if fv is None else fv
  flags.DEFINE_string("out", None, "one subdirectory per benchmark is written here", flag_values=fv)
  flags.DEFINE_enum("benchmark", "all", ["all", *WRITERS], "which benchmark's files",
                    flag_values=fv)
  flags.DEFINE_integer("per_task", 1, "questions per task", flag_values=fv)
  flags.DEFINE_string("tiny_model", "", "also write a tiny random model here", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def main(argv, fv=None):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if fv is None else fv
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  names = tuple(WRITERS) if fv.benchmark == "all" else (fv.benchmark,)
  for name in names:
    print(write(name, os.path.join(fv.out, name), per_task=fv.per_task))
  if fv.tiny_model:
    print(write_tiny_model(fv.tiny_model))


if __name__ == "__main__":
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, define_flags, __doc__)
