"""TFDS round trip (array_record, media bytes, no TensorFlow) for SpaceR-151k and VSI-Bench."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import PIL.Image
import pytest

from spacer_jax.data import sources
from spacer_jax.data import tfds_builders
from spacer_jax.data import video
from tests.media import make_mp4


def _jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def spacer_manual(tmp_path):
  d = tmp_path / "manual"
  make_mp4(d / "vids" / "scene0001_00.mp4", seed=1)
  make_mp4(d / "vids" / "clip2.mp4", frames=6, seed=2)
  (d / "imgs").mkdir(parents=True)
  PIL.Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(d / "imgs" / "a.png")
  _jsonl(d / "annotation" / "cognitive_map.jsonl",
         [{"video_id": "scene0001_00", "cognitive_map": {"sofa": [[1, 2]], "tv": [[3, 4]]}, "object_list": []}])
  base = {"problem": "How many sofa(s)?", "problem_type": "numerical", "options": [], "solution": "<answer>1</answer>",
          "data_source": "LLaVA-Video", "data_type": "video"}
  _jsonl(d / "SpaceR-151k.jsonl", [
      {**base, "problem_id": 1, "path": "vids/scene0001_00.mp4", "data_source": "SR_dataset",
       "process": "<think>one sofa</think>"},
      {**base, "problem_id": 2, "path": "vids/clip2.mp4", "problem_type": "multiple choice",
       "options": ["A. a", "B. b"], "solution": "<answer>A</answer>"},
      {**base, "problem_id": 3, "path": "imgs/a.png", "data_type": "image"},
      {**base, "problem_id": 4, "path": "vids/missing.mp4"},
      {**base, "problem_id": 5, "path": "vids/clip2.mp4", "problem_type": "unknown"},
  ])
  return d


def test_spacer151k_round_trip(spacer_manual, tmp_path):
  bad = tfds_builders.prepare("spacer151k", spacer_manual, tmp_path / "tfds")
  assert bad.counts == {"missing_media": 1, "unknown_problem_type": 1}
  assert "tensorflow" not in sys.modules
  src = tfds_builders.data_source("spacer151k", tmp_path / "tfds")
  assert len(src) == 3
  got = {r.id: r for r in (tfds_builders.record_from_example(src[i]) for i in range(len(src)))}
  want = {r.id: r for r in sources.load_spacer(spacer_manual / "SpaceR-151k.jsonl")}
  assert sorted(got) == ["1", "2", "3"]
  for rid, rec in got.items():
    assert rec.media_bytes == open(want[rid].media, "rb").read()
    assert rec == want[rid].__class__(**{**want[rid].__dict__, "media_bytes": rec.media_bytes})
  assert got["1"].cognitive_map == {"sofa": [[1, 2]], "tv": [[3, 4]]} and got["1"].categories == ("sofa", "tv")
  assert got["1"].process == "<think>one sofa</think>" and got["2"].process == ""
  # Datasets prepared by 1.0.0 have no `process` feature: read as "".
  old = {k: v for k, v in src[0].items() if k != "process"}
  assert tfds_builders.record_from_example(old).process == ""
  clip = video.read_video(got["2"].media_bytes, name=got["2"].media)
  direct = video.read_video(want["2"].media)
  np.testing.assert_array_equal(clip.frames, direct.frames)
  img = video.load_image(got["3"].media_bytes, name=got["3"].media)
  assert img.shape == (40, 60, 3)


def test_vsibench_round_trip(tmp_path):
  d = tmp_path / "vsi"
  make_mp4(d / "scannet" / "scene0011_00.mp4", seed=3)
  rows = [
      {"id": 0, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_counting",
       "question": "How many chair(s)?", "options": None, "ground_truth": "2"},
      {"id": 1, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "route_planning",
       "question": "Which way?", "options": ["A. left", "B. right"], "ground_truth": "A"},
      {"id": 2, "dataset": "arkitscenes", "scene_name": "404", "question_type": "object_counting",
       "question": "How many?", "options": None, "ground_truth": "1"},
  ]
  pq.write_table(pa.Table.from_pylist(rows), d / "test-00000-of-00001.parquet")
  bad = tfds_builders.prepare("vsibench", d, tmp_path / "tfds")
  assert bad.counts == {"missing_media": 1}
  src = tfds_builders.data_source("vsibench", tmp_path / "tfds")
  recs = sorted((tfds_builders.record_from_example(src[i]) for i in range(len(src))), key=lambda r: r.id)
  want = sources.load_vsibench(d / "test-00000-of-00001.parquet")[:2]
  assert [r.id for r in recs] == ["0", "1"]
  for r, w in zip(recs, want):
    assert r.prompt == w.prompt and r.question_type == w.question_type and r.ground_truth == w.ground_truth
    assert r.options == w.options and r.solution == w.solution and r.categories == w.categories
  assert recs[1].media_bytes == (d / "scannet" / "scene0011_00.mp4").read_bytes()


def test_media_outside_the_manual_dir_is_never_stored(spacer_manual, tmp_path):
  """A `../` path, an absolute path, a symlink leading out and a VSI `dataset` of `..` are bad
  records: the secret's bytes never reach the dataset (unless explicitly allowed)."""
  secret = tmp_path / "secret.mp4"
  make_mp4(secret, seed=9)
  (spacer_manual / "vids" / "link.mp4").symlink_to(secret)
  base = {"problem": "How many?", "problem_type": "numerical", "solution": "<answer>1</answer>",
          "data_type": "video"}
  with open(spacer_manual / "SpaceR-151k.jsonl", "a") as f:
    for pid, path in ((6, "../secret.mp4"), (7, str(secret)), (8, "vids/link.mp4")):
      f.write(json.dumps({**base, "problem_id": pid, "path": path}) + "\n")
  bad = tfds_builders.prepare("spacer151k", spacer_manual, tmp_path / "tfds")
  assert bad.counts == {"missing_media": 1, "unknown_problem_type": 1, "media_outside_root": 2,
                        "absolute_media_path": 1}
  src = tfds_builders.data_source("spacer151k", tmp_path / "tfds")
  assert secret.read_bytes() not in {bytes(src[i]["media_bytes"]) for i in range(len(src))}
  bad = tfds_builders.prepare("spacer151k", spacer_manual, tmp_path / "tfds_allowed",
                              allow_media_outside_root=True)
  assert "media_outside_root" not in bad.counts and len(tfds_builders.data_source(
      "spacer151k", tmp_path / "tfds_allowed")) == 6

  vsi = tmp_path / "vsi"
  make_mp4(vsi / "scannet" / "scene0011_00.mp4", seed=3)
  row = {"question_type": "object_counting", "question": "How many?", "options": None,
         "ground_truth": "2"}
  rows = [{**row, "id": 0, "dataset": "scannet", "scene_name": "scene0011_00"},
          {**row, "id": 1, "dataset": "..", "scene_name": "secret"},
          {**row, "id": 2, "dataset": str(tmp_path), "scene_name": "secret"}]
  pq.write_table(pa.Table.from_pylist(rows), vsi / "test-00000-of-00001.parquet")
  bad = tfds_builders.prepare("vsibench", vsi, tmp_path / "tfds")
  assert bad.counts == {"media_outside_root": 1, "absolute_media_path": 1}
  assert len(tfds_builders.data_source("vsibench", tmp_path / "tfds")) == 1


def test_prepare_strict_raises(spacer_manual, tmp_path):
  with pytest.raises(sources.BadRecordError, match=r"record '5' in .*SpaceR-151k.jsonl: unknown_problem_type"):
    tfds_builders.prepare("spacer151k", spacer_manual, tmp_path / "tfds", strict=True)


def test_pipeline_reads_tfds_source(spacer_manual, tmp_path):
  """grain over tfds.data_source gives the same batches' content as over the JSONL records."""
  from spacer_jax.data import pipeline
  from spacer_jax.data import tokenizer as tokenizer_lib

  tfds_builders.prepare("spacer151k", spacer_manual, tmp_path / "tfds")
  src = tfds_builders.data_source("spacer151k", tmp_path / "tfds")
  tok = tokenizer_lib.build_offline_tokenizer()
  cfg = pipeline.DataConfig(batch_size=3, buckets=(512, 1024, 2048), video_min_pixels=28 * 28 * 4,
                            video_max_pixels=28 * 28 * 8, image_max_pixels=28 * 28 * 16, num_epochs=1,
                            shuffle=False, prefetch_batches=0)
  (b,) = list(pipeline.make_iterator(src, tok, cfg, process_index=0, process_count=1))
  assert sorted(b["id"]) == ["1", "2", "3"] and b["bad_records"] == {"data/bad_records": 0}
  recs = {r.id: r for r in sources.load_spacer(spacer_manual / "SpaceR-151k.jsonl")}
  for row, rid in enumerate(b["id"]):
    want = pipeline.Preprocess(tok, cfg, 0)(0, (0, recs[rid]))
    np.testing.assert_array_equal(b["input_ids"][row][b["attention_mask"][row] == 1], want["input_ids"])
  assert b["cognitive_map"][b["id"].index("1")] == {"sofa": [[1, 2]], "tv": [[3, 4]]}
  assert len(b["video_grid_thw"]) == 2 and len(b["image_grid_thw"]) == 1
