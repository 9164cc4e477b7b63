"""Tests for the VSI-Bench evaluator: hand-computed scoring vectors (docs/spacer_recipe.md,
"VSI-Bench"), aggregation, the table, the resumable predictions file and record validation
(spacer_jax.vsibench), then an end-to-end run of spacer_jax.evaluate on a tiny random model (slow)."""

import json
import os

import numpy as np
import pytest

from spacer_jax import vsibench

# ---------------------------------------------------------------------------------------------------
# Parsing and scoring.


@pytest.mark.parametrize(
    "output, gt, spacer, official",
    [
        # SpaceR-Eval's reference values; official = first word, trailing dots stripped, case-insensitive.
        ("B. Sofa", "B", 1.0, 1.0),
        ("(B)", "B", 0.0, 0.0),
        ("b", "B", 1.0, 1.0),
        ("Answer: C", "C", 1.0, 0.0),  # official's first word is "Answer:".
        ("B is correct", "B", 1.0, 1.0),
        ("The answer is B", "B", 0.0, 0.0),
        ("B.", "B", 1.0, 1.0),
        # Further differences, hand-derived from the two rules.
        ("b.", "B", 0.0, 1.0),  # SpaceR's letter regex is uppercase only -> compares "b." whole.
        (" B", "B", 1.0, 0.0),  # official's first word is "".
        ("E", "E", 1.0, 1.0),  # not A-D: SpaceR compares the whole stripped text.
        ("A.B", "A", 0.0, 0.0),
        ("<think>t</think><answer>B</answer>", "B", 1.0, 0.0),
        ("<think>t</think><answer> C. chair </answer>", "C", 1.0, 0.0),
        ("<think>t</think><answer>B", "B", 0.0, 0.0),  # unclosed tag -> "None".
    ],
)
def test_mca_scores(output, gt, spacer, official):
  assert vsibench.parse_and_score("spacer", "object_rel_distance", output, gt)[1] == spacer
  assert vsibench.parse_and_score("official", "route_planning", output, gt)[1] == official


@pytest.mark.parametrize(
    "output, gt, spacer, official",
    [
        # The reference values: SpaceR-Eval [official].
        ("2.5", "3.0", 0.7, 0.7),
        ("about 2.5 m", "3.0", 0.7, 0.0),
        ("a 2.5", "3.0", 0.0, 0.0),  # fuzzy_number: the article "a" reads as 1.
        ("None", "3.0", 0.0, 0.0),
        # MRA's float64 thresholds: relative error 0.1 passes theta = 0.9.
        ("<think>hm</think><answer>about 4.5 meters</answer>", "5.0", 0.9, 0.0),
        ("4.5", "5", 0.9, 0.9),
        ("2.5.", "3.0", 0.7, 0.7),  # official strips trailing dots; fuzzy's regex stops at the dot.
        ("2.5m", "3.0", 0.7, 0.0),
        ("-2.5", "3.0", 0.7, 0.0),  # fuzzy drops the sign; official keeps it (rel. error 1.83).
        ("three", "3", 1.0, 0.0),
        ("<think>t</think><answer>4", "4", 0.0, 0.0),
        ("nan", "4", 0.0, 0.0),
    ],
)
def test_na_scores(output, gt, spacer, official):
  assert vsibench.parse_and_score("spacer", "object_counting", output, gt)[1] == pytest.approx(spacer)
  assert vsibench.parse_and_score("official", "room_size_estimation", output, gt)[1] == (
      pytest.approx(official))


@pytest.mark.parametrize(
    "output, expected",
    [
        # SpaceR-Eval's reference extraction.
        ("<think>t</think><answer>B</answer>", "B"),
        ("<think>t</think><answer>B", "None"),
        ("B", "B"),
        # First match, stripped, across newlines.
        ("<answer>\n 3 \n</answer><answer>4</answer>", "3"),
        ("no tags at all ", "no tags at all "),
    ],
)
def test_extract_answer(output, expected):
  assert vsibench.extract_answer(output) == expected


def test_answers_recorded():
  assert vsibench.parse_and_score("spacer", "object_rel_distance", "B. Sofa", "B")[0] == "B"
  assert vsibench.parse_and_score("official", "object_rel_distance", "B. Sofa", "B")[0] == "B"
  assert vsibench.parse_and_score("spacer", "object_counting", "x", "3")[0] == "None"
  assert vsibench.parse_and_score("official", "object_counting", "4. ok", "3")[0] == "4"
  with pytest.raises(ValueError, match="protocol"):
    vsibench.parse_and_score("lmms", "object_counting", "4", "3")
  with pytest.raises(ValueError, match="question_type"):
    vsibench.parse_and_score("official", "object_color", "4", "3")


# ---------------------------------------------------------------------------------------------------
# Aggregation and the table.

# Hand-made scores: per task the mean is written next to it.
_SCORES = {
    "object_counting": [0.7, 0.9],  # 0.8
    "object_abs_distance": [0.0],  # 0.0
    "object_size_estimation": [1.0, 0.5],  # 0.75
    "room_size_estimation": [0.3],  # 0.3
    "object_rel_distance": [1, 1, 0, 0],  # 0.5
    "object_rel_direction_easy": [1, 0],  # 0.5
    "object_rel_direction_medium": [1],  # 1.0
    "object_rel_direction_hard": [0, 0, 0],  # 0.0 -> Rel.Dir = mean(0.5, 1, 0) = 0.5 (micro: 2/6)
    "route_planning": [1],  # 1.0
    "obj_appearance_order": [0, 1, 1, 1],  # 0.75
}


def _preds(scores):
  return [{"question_type": q, "score": s} for q, ss in scores.items() for s in ss]


def test_aggregate_macro_and_rel_direction_levels():
  m = vsibench.aggregate(_preds(_SCORES))
  assert m["tasks"] == pytest.approx({
      "object_counting": 0.8, "object_abs_distance": 0.0, "object_size_estimation": 0.75,
      "room_size_estimation": 0.3, "object_rel_distance": 0.5, "object_rel_direction": 0.5,
      "route_planning": 1.0, "obj_appearance_order": 0.75})
  # (0.8 + 0 + 0.75 + 0.3 + 0.5 + 0.5 + 1 + 0.75) / 8 = 4.6 / 8.
  assert m["overall"] == pytest.approx(0.575)
  assert m["per_type"]["object_rel_direction_hard"] == 0.0
  assert m["counts"]["object_rel_direction_hard"] == 3
  assert m["num_scored"] == 21


def test_aggregate_missing_tasks_and_levels():
  scores = {k: v for k, v in _SCORES.items()
            if k not in ("route_planning", "object_rel_direction_medium")}
  m = vsibench.aggregate(_preds(scores))
  assert "route_planning" not in m["tasks"]
  assert m["tasks"]["object_rel_direction"] == pytest.approx(0.25)  # mean(0.5, 0.0)
  assert m["overall"] == pytest.approx((0.8 + 0 + 0.75 + 0.3 + 0.5 + 0.25 + 0.75) / 7)
  assert vsibench.aggregate([])["overall"] is None
  with pytest.raises(ValueError, match="unknown question_type"):
    vsibench.aggregate([{"question_type": "nope", "score": 1.0}])


def test_render_table():
  m = vsibench.aggregate(_preds(_SCORES))
  table = vsibench.render_table(m, name="tiny", skipped_videos=["d/a.mp4", "d/b.mp4"],
                                num_skipped=2, num_records=23, protocol="spacer")
  lines = table.splitlines()
  assert lines[0] == ("| Model | Avg | Obj.Count | Abs.Dist | Obj.Size | Room Size | Rel.Dist | Rel.Dir"
                      " | Route Plan | Appr.Order |")
  assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|"
  assert lines[2] == "| tiny | 57.5 | 80.0 | 0.0 | 75.0 | 30.0 | 50.0 | 50.0 | 100.0 | 75.0 |"
  assert "Scored 21 of 23 questions" in table
  assert "Skipped 2 question(s) on 2 missing or unreadable video(s): d/a.mp4, d/b.mp4" in table
  m2 = vsibench.aggregate(_preds({"object_counting": [0.5]}))
  row = vsibench.render_table(m2).splitlines()[2]
  assert row == "| model | 50.0 | 50.0 | - | - | - | - | - | - | - |"
  assert "Missing videos: 0." in vsibench.render_table(m2)


# ---------------------------------------------------------------------------------------------------
# Predictions file.


def test_predictions_file_resume_and_torn_line(tmp_path):
  path = str(tmp_path / "out" / "predictions.jsonl")
  with vsibench.PredictionsFile(path, "spacer") as f:
    f.add({"id": 1, "question_type": "object_counting", "score": 0.5})
    f.add({"id": "2", "question_type": "route_planning", "score": 1.0})
  with open(path, "a") as f:
    f.write('{"id": "3", "question_type": "route_pl')  # killed mid-write
  with vsibench.PredictionsFile(path, "spacer") as f:
    assert sorted(f.done) == ["1", "2"]
    assert 1 in f and "2" in f and "3" not in f
    f.add({"id": "3", "question_type": "route_planning", "score": 0.0})
  lines = open(path).read().splitlines()
  assert [json.loads(l)["id"] for l in lines] == ["1", "2", "3"]
  assert all(json.loads(l)["protocol"] == "spacer" for l in lines)
  with pytest.raises(ValueError, match="protocol 'spacer'"):
    vsibench.PredictionsFile(path, "official")


def test_predictions_file_corrupt_middle_line(tmp_path):
  path = tmp_path / "predictions.jsonl"
  path.write_text('{"id": "1", "protocol": "official"}\nnot json\n')
  with pytest.raises(ValueError, match=r"predictions.jsonl:2"):
    vsibench.PredictionsFile(str(path), "official")


# ---------------------------------------------------------------------------------------------------
# Records.


def _record(i, qtype="object_counting", gt="3", **kw):
  r = {"id": i, "dataset": "scannet", "scene_name": f"scene{i}", "question_type": qtype,
       "question": "How many chairs?", "options": None, "ground_truth": gt}
  r.update(kw)
  return r


def _write_jsonl(d, rows, name="test.jsonl"):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, name), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_load_records_jsonl_and_parquet(tmp_path):
  rows = [_record(0), _record(1, "route_planning", "B", options=["A. left", "B. right"])]
  _write_jsonl(tmp_path / "j", rows)
  recs = vsibench.load_records(str(tmp_path / "j"))
  assert [r["id"] for r in recs] == ["0", "1"]
  assert recs[1]["options"] == ["A. left", "B. right"] and recs[0]["options"] is None
  assert vsibench.video_path("/v", recs[0]) == "/v/scannet/scene0.mp4"
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "p")
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "p" / "test-00000-of-00001.parquet"))
  assert vsibench.load_records(str(tmp_path / "p")) == recs


@pytest.mark.parametrize(
    "rows, match",
    [
        ([_record(0, gt="0")], "non-zero"),
        ([_record(0, gt="three")], "not a number"),
        ([_record(0, "route_planning", "A")], "options is empty"),
        ([_record(0, "object_color")], "question_type='object_color'"),
        ([{"id": 5, "question": "q"}], r"id=5.*missing field\(s\) \['dataset'"),
        ([_record(0), _record(0)], "duplicate id '0'"),
    ],
)
def test_load_records_errors(tmp_path, rows, match):
  _write_jsonl(tmp_path, rows)
  with pytest.raises(ValueError, match=match):
    vsibench.load_records(str(tmp_path))


def test_wrong_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    vsibench.load_records(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="exactly one annotation file"):
    vsibench.load_records(str(tmp_path))
  _write_jsonl(tmp_path, [_record(0)], "a.jsonl")
  _write_jsonl(tmp_path, [_record(0)], "b.jsonl")
  with pytest.raises(FileNotFoundError, match=r"found \['a.jsonl', 'b.jsonl'\]"):
    vsibench.load_records(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# SpaceR-Eval's frames.


@pytest.mark.parametrize(
    "total, fps, expected",
    [
        (45, 10.0, [0, 14, 29, 44]),  # dur int(4.5) = 4 frames; rounding would give 15, not 14
        (3000, 30.0, list(np.linspace(0, 2999, 32).astype(int))),  # 100 s -> capped at 32
        (10, 30.0, [0]),  # dur int(0.33) = 0 -> at least 1 frame
        (95, 30.0, [0, 47, 94]),  # dur 3 -> 3 frames (odd: padded later by patchify)
    ],
)
def test_spacer_eval_frame_indices(total, fps, expected):
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  assert evaluate.spacer_eval_frame_indices(total, fps).tolist() == expected


def test_load_video_spacer_eval(tmp_path):
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax.data.synthetic import render  # pylint: disable=g-import-not-at-top
  # 45 flat grey frames (grey level 5 * index), 640x480 (W x H), 10 fps.
  frames = np.repeat((5 * np.arange(45, dtype=np.uint8))[:, None, None, None], 3, axis=3)
  frames = np.broadcast_to(frames, (45, 480, 640, 3))
  path = str(tmp_path / "grey.mp4")
  render.encode_mp4(frames, path, fps=10)
  vis = evaluate.load_video_spacer_eval(path)
  # Swapped: 640x480 -> 336 wide x 448 high; 4 frames -> 2 temporal patches.
  assert vis.grid_thw.tolist() == [2, 448 // 14, 336 // 14] and vis.second_per_grid_t == 1.0
  rows = vis.pixel_values.reshape(2, -1, 3, 2, 14, 14)  # [t, patches, c, tp, py, px]
  mean, std = video_lib.IMAGE_MEAN[0], video_lib.IMAGE_STD[0]
  grey = (rows[:, :, 0] * std + mean).mean(axis=(1, 3, 4)) * 255  # [t, tp]
  np.testing.assert_allclose(grey.reshape(-1), [0, 70, 145, 220], atol=3)  # frames 0, 14, 29, 44
  intended = evaluate.load_video_spacer_eval(path, swap_hw=False)
  assert intended.grid_thw.tolist() == [2, 336 // 14, 448 // 14]
  with pytest.raises(video_lib.MediaError, match="file not found"):
    evaluate.load_video_spacer_eval(str(tmp_path / "absent.mp4"))


# ---------------------------------------------------------------------------------------------------
# End to end: tiny random model + offline tokenizer saved as an HF checkpoint, synthetic VSI split.


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
  from spacer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("eval_e2e")
  cfg = synthetic.SyntheticConfig(num_scenes=1, num_eval_scenes=3, questions_per_scene=1,
                                  eval_questions_per_scene=6, num_frames=4, height=56, width=56)
  paths = synthetic.generate_dataset(str(root / "data"), cfg, progress=False)
  model_dir = str(root / "model")
  ids = tokenizer_lib.build_offline_tokenizer(model_dir).special_ids()
  ids["eos_token_id"] = (ids["eos_token_id"],)
  model = qwen2_5_vl.init_model(qwen2_5_vl.tiny(**ids), seed=0)
  qwen2_5_vl.save_hf(model, model_dir)
  return root, model_dir, paths.eval_root


def _eval_config(model_dir, data_dir, protocol="spacer"):
  from spacer_jax.configs import eval_vsibench  # pylint: disable=g-import-not-at-top
  c = eval_vsibench.get_config(f"protocol={protocol}")
  c.model_dir, c.data_dir, c.dtype = model_dir, data_dir, "float32"
  c.max_new_tokens, c.batch_size, c.prompt_buckets = 6, 8, (1024,)
  c.video.max_frames, c.video.min_pixels, c.video.max_pixels = 4, 56 * 56, 56 * 56
  c.progress = False
  return c


def _check_outputs(workdir, protocol, num_records, skipped, num_videos=None):
  preds = [json.loads(l) for l in open(os.path.join(workdir, "predictions.jsonl"))]
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  table = open(os.path.join(workdir, "table.md")).read()
  assert len(preds) == len({p["id"] for p in preds}) == num_records - skipped
  for p in preds:  # every stored score is what the parser gives for the stored output
    assert p["protocol"] == protocol and 0 < p["num_tokens"] <= 6
    assert vsibench.parse_and_score(protocol, p["question_type"], p["output"], p["ground_truth"]) == (
        p["answer"], p["score"])
  agg = vsibench.aggregate(preds)
  assert metrics["overall"] == pytest.approx(100 * agg["overall"])
  assert metrics["tasks"] == pytest.approx({k: 100 * v for k, v in agg["tasks"].items()})
  assert metrics["num_scored"] == len(preds) and metrics["num_records"] == num_records
  assert len(metrics["skipped"]) == (num_videos if skipped else 0)
  assert metrics["num_skipped"] == skipped
  assert table.startswith("| Model | Avg | Obj.Count |")
  return preds, metrics, table


@pytest.mark.slow
def test_end_to_end_resume_and_missing_video(tiny_setup, monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  root, model_dir, data_dir = tiny_setup
  records = vsibench.load_records(data_dir)
  n = len(records)

  # 1. Full run in-process. Each video is decoded once, however many questions it holds.
  full = str(root / "full")
  decoded = []
  load_video = evaluate._load_video  # pylint: disable=protected-access
  monkeypatch.setattr(evaluate, "_load_video",
                      lambda path, kw: decoded.append(path) or load_video(path, kw))
  result = evaluate.evaluate(_eval_config(model_dir, data_dir), full)
  monkeypatch.undo()
  assert sorted(decoded) == sorted({vsibench.video_path(data_dir, r) for r in records})
  preds, metrics, _ = _check_outputs(full, "spacer", n, 0)
  assert result["overall"] == metrics["overall"]

  # 2. A killed run: 5 finished lines and a torn one. The command line resumes it and computes only the
  #    missing items; the outputs (greedy) and the metrics equal the uninterrupted run's.
  resumed = root / "resumed"
  resumed.mkdir()
  lines = open(os.path.join(full, "predictions.jsonl")).read().splitlines(keepends=True)
  (resumed / "predictions.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
  cmd = [sys.executable, "-m", "spacer_jax.evaluate", "--config=configs/eval_vsibench.py",
         f"--config.model_dir={model_dir}", f"--config.data_dir={data_dir}",
         "--config.dtype=float32", "--config.max_new_tokens=6", "--config.prompt_buckets=(1024,)",
         "--config.video.max_frames=4", f"--config.video.min_pixels={56 * 56}",
         f"--config.video.max_pixels={56 * 56}", f"--workdir={resumed}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| Model | Avg |" in proc.stdout
  preds2, metrics2, _ = _check_outputs(str(resumed), "spacer", n, 0)
  assert metrics2["overall"] == metrics["overall"] and metrics2["tasks"] == metrics["tasks"]
  assert {p["id"]: p["output"] for p in preds2} == {p["id"]: p["output"] for p in preds}

  # 3. Rerun with nothing left to do: same metrics, file untouched.
  before = open(os.path.join(full, "predictions.jsonl")).read()
  again = evaluate.evaluate(_eval_config(model_dir, data_dir), full)
  assert again["overall"] == result["overall"] and again["tasks"] == result["tasks"]
  assert open(os.path.join(full, "predictions.jsonl")).read() == before

  # 3b. Resuming with other settings (here max_new_tokens) is refused rather than mixing runs.
  c = _eval_config(model_dir, data_dir)
  c.max_new_tokens = 7
  with pytest.raises(ValueError, match=r"run_info.json.*max_new_tokens: 6 then, 7 now"):
    evaluate.evaluate(c, full)
  c = _eval_config(model_dir, data_dir)
  assert c.repetition_penalty == 1.05  # SpaceR-Eval's decoding
  c.repetition_penalty = 1.0
  with pytest.raises(ValueError, match=r"run_info.json.*repetition_penalty: 1.05 then, 1.0 now"):
    evaluate.evaluate(c, full)

  # 4. A missing video: its questions are skipped, counted and named in the table's footer.
  data2 = str(root / "data_missing")
  shutil.copytree(data_dir, data2)
  gone = vsibench.video_path(data2, records[0])
  os.remove(gone)
  lost = sum(r["scene_name"] == records[0]["scene_name"] for r in records)
  # ... and an unreadable one (not an mp4) is skipped the same way, with the decoder's reason.
  other = next(r for r in records if r["scene_name"] != records[0]["scene_name"])
  broken = vsibench.video_path(data2, other)
  with open(broken, "wb") as f:
    f.write(b"not a video")
  lost_broken = sum(r["scene_name"] == other["scene_name"] for r in records)
  out = str(root / "missing")
  res = evaluate.evaluate(_eval_config(model_dir, data2, "official"), out)
  _, _, table = _check_outputs(out, "official", n, lost + lost_broken, num_videos=2)
  assert res["skipped"][gone] == "missing" and res["skipped"][broken].startswith("unreadable")
  assert res["num_skipped"] == lost + lost_broken
  assert (f"Skipped {lost + lost_broken} question(s) on 2 missing or unreadable video(s): "
          f"{gone} (missing), {broken} (unreadable") in table
  assert f"Scored {n - lost - lost_broken} of {n} questions" in table

  # 5. A Qwen2.5-VL config.json whose weights have other shapes: the strict loader names the keys.
  wrong = root / "wrong_shapes"
  shutil.copytree(model_dir, wrong)
  cfg = json.load(open(wrong / "config.json"))
  cfg.get("text_config", cfg)["intermediate_size"] += 4
  (wrong / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(KeyError, match="wrong shape"):
    evaluate.load_model(str(wrong), dtype="float32")


def test_importing_defines_no_flags():
  """train.py imports evaluate for `run` and defines --config/--workdir itself."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top,unused-import
  for name in ("config", "workdir"):
    if name in flags.FLAGS:
      assert flags.FLAGS.find_module_defining_flag(name) != evaluate.__name__


def test_clear_errors(tmp_path):
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  # Wrong architecture: refused before any weight is read.
  bad = tmp_path / "llava"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "llava",
                                               "architectures": ["LlavaForConditionalGeneration"]}))
  with pytest.raises(ValueError, match=r"model_type='llava'.*Qwen2.5-VL"):
    evaluate.load_model(str(bad), dtype="float32")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    evaluate.load_model(str(tmp_path / "absent"))
  # Wrong data layout (no annotation file) and no video where the layout says: both fail before the
  # model directory is even looked at.
  data = tmp_path / "data"
  data.mkdir()
  with pytest.raises(FileNotFoundError, match="exactly one annotation file"):
    evaluate.evaluate(_eval_config(str(bad), str(data)), str(tmp_path / "o1"))
  _write_jsonl(data, [_record(0), _record(1)])
  (data / "scannet").mkdir()
  with pytest.raises(FileNotFoundError, match=r"none of the 2 videos exist.*scannet/scene0.mp4"):
    evaluate.evaluate(_eval_config(str(bad), str(data)), str(tmp_path / "o2"))
  (data / "scannet" / "scene0.mp4").write_bytes(b"")
  present, skipped = evaluate.find_videos(str(data), vsibench.load_records(str(data)))
  assert [r["id"] for r in present] == ["0"]
  assert skipped == {str(data / "scannet" / "scene1.mp4"): "missing"}
  with pytest.raises(FileNotFoundError, match=r"id=1: video .*scene1.mp4 is missing"):
    evaluate.find_videos(str(data), vsibench.load_records(str(data)), allow_missing_videos=False)


def _write_trainer_workdir(run, model_dir, shift=1.0):
  """A train.py workdir: model_config.json + ckpt/<step>/{state,data}, state holding more than params
  (the params are the HF model's plus `shift`). Returns the HF model's flat params."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spacer_jax import checkpoint, evaluate, tree_utils  # pylint: disable=g-import-not-at-top
  model = evaluate.load_model(model_dir, dtype="float32")
  _, flat, _ = tree_utils.split_model(model)
  os.makedirs(run, exist_ok=True)
  with open(os.path.join(run, "model_config.json"), "w") as f:
    json.dump(model.config.to_hf_dict(), f)
  ckpt = checkpoint.Checkpointer(os.path.join(run, "ckpt"), use_async=False)
  state = {"step": np.int32(7), "params": {k: v + shift for k, v in flat.items()},
           "opt_state": {"mu": dict(flat)}, "rng": np.zeros(2, np.uint32)}
  ckpt.save(7, state)
  ckpt.close()
  return flat


def test_trainer_checkpoint(tmp_path, tiny_setup):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spacer_jax import evaluate, tree_utils  # pylint: disable=g-import-not-at-top
  _, model_dir, _ = tiny_setup
  run = tmp_path / "run"
  flat = _write_trainer_workdir(str(run), model_dir)
  for d in (run, run / "ckpt"):
    restored = evaluate.load_model(str(d), dtype="bfloat16")
    _, got, _ = tree_utils.split_model(restored)
    assert set(got) == set(flat)
    for k, v in got.items():
      assert v.dtype == np.dtype("bfloat16")
      np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(flat[k] + 1.0, np.float32),
                                 rtol=1e-2, atol=1e-2)
  # On an 8-device FSDP mesh (dims that 8 does not divide are replicated).
  from spacer_jax import config_lib, sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config_lib.MESH_PRESETS["fsdp"])
  sharded = evaluate.load_model(str(run), dtype="float32", mesh=mesh,
                                rules=config_lib.SHARDING_PRESETS["fsdp"])
  emb = sharded.model.embed_tokens.weight.get_value()
  assert emb.sharding.mesh.shape["fsdp"] == 8
  np.testing.assert_array_equal(np.asarray(emb), np.asarray(flat["model.embed_tokens.weight"] + 1.0))
  # A tokenizer of another model is refused.
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer(model_dir)
  from spacer_jax import modeling  # pylint: disable=g-import-not-at-top
  modeling.check_tokenizer(tok, restored.config)
  with pytest.raises(ValueError, match=r"video_token_id: tokenizer \d+ != model 121"):
    modeling.check_tokenizer(tok, qwen2_5_vl.tiny(vocab_size=2000))
  # Neither layout: a clear error naming both.
  with pytest.raises(FileNotFoundError, match="neither a Hugging Face checkpoint"):
    evaluate.load_model(str(tmp_path))


@pytest.mark.slow
def test_demo_config_on_trainer_workdir(tmp_path, tiny_setup):
  """configs/eval_vsibench.py:demo reads a demo workdir: its checkpoint, tokenizer and VSI split."""
  import shutil  # pylint: disable=g-import-not-at-top
  from spacer_jax.configs import eval_vsibench  # pylint: disable=g-import-not-at-top
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  root, model_dir, _ = tiny_setup
  run = str(tmp_path / "demo")
  _write_trainer_workdir(run, model_dir, shift=0.0)
  shutil.copytree(str(root / "data"), os.path.join(run, "data", "synthetic"))
  os.makedirs(os.path.join(run, "tokenizer"))
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(model_dir, name), os.path.join(run, "tokenizer", name))
  c = eval_vsibench.get_config(f"demo,demo_workdir={run}")
  c.max_new_tokens, c.max_items, c.progress = 4, 8, False
  out = os.path.join(run, "eval")
  result = evaluate.evaluate(c, out)
  assert result["num_scored"] == 8 and result["num_records"] == 8
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  assert metrics["name"] == "demo" and metrics["protocol"] == "spacer"
  assert "| demo |" in open(os.path.join(out, "table.md")).read()
