"""Tests for the benchmarks besides VSI-Bench (spacer_jax.benchmarks): parsing and scoring tables with
the reference quirks, code|readme aggregation against the numbers of SpaceR's README, prompts, bad
records, media paths confined to data_dir, image parity, and end-to-end runs of spacer_jax.evaluate on
every benchmark's synthetic files with a tiny random model."""

import json
import os

import numpy as np
import pytest

from spacer_jax import vsibench
from spacer_jax.benchmarks import common
from spacer_jax.benchmarks import longvideobench
from spacer_jax.benchmarks import sparbench
from spacer_jax.benchmarks import stibench
from spacer_jax.benchmarks import tempcompass
from spacer_jax.benchmarks import testdata
from spacer_jax.benchmarks import videomme
from spacer_jax.data import prompts

# ---------------------------------------------------------------------------------------------------
# Answer extraction (every benchmark, thinking mode).


@pytest.mark.parametrize("text, expected", [
    ("<think>t</think><answer> B </answer>", "B"),
    ("<answer>B", "None"),  # opened, never closed
    ("B", "B"),  # no tag: the raw text
    ("<answer>\n3\n</answer><answer>4</answer>", "3"),
    ("<answer></answer>", ""),
    ("<answer>" * 16000, "None"),  # linear time (the regex takes seconds here)
    ("<answer>" * 16000 + "x</answer>", "<answer>" * 15999 + "x"),
])
def test_extract_answer(text, expected):
  assert common.extract_answer(text) == expected
  assert common.maybe_extract(text, "spacer_default") == text


# ---------------------------------------------------------------------------------------------------
# STI-Bench.


@pytest.mark.parametrize("output, protocol, expected", [
    ("(b)", "spacer", "B"),
    ("Ans='C'", "spacer", "C"),
    ('ans = "e"', "spacer", "E"),
    ("answer: d", "spacer", "D"),
    ("Answer=A", "spacer", "A"),
    ("Option E", "spacer", "E"),
    ("a is correct", "spacer", "A"),
    ("B was correct", "spacer", "B"),
    ("The answer is C.", "spacer", "C"),
    ("C", "spacer", "C"),  # no pattern: the stripped text
    ("  C \n", "spacer", "C"),
    ("B)", "spacer", "B"),
    ("it is b.", "spacer", "B"),
    ("I think it's B", "spacer", "I think it's B"),
    ("x.\nA.\nmore", "spacer", "A"),  # `$` matches at every line end
    ("(F)", "spacer", "(F)"),
    ("Option D, not (A)", "spacer", "A"),  # patterns are tried in order, not by position
    ("<think>maybe (A)</think><answer>B</answer>", "spacer", "B"),
    ("<think>maybe (A)</think><answer>B</answer>", "spacer_default", "A"),  # no extraction
    ("<think>t</think><answer>B", "spacer", "None"),
])
def test_stibench_parse(output, protocol, expected):
  assert stibench.parse_answer(output, protocol) == expected


def _sti_predictions(accuracies, counts):
  preds = []
  for task, acc in accuracies.items():
    n = counts[task]
    k = round(acc / 100 * n)
    preds += [{"task": task, "score": float(i < k)} for i in range(n)]
  return preds


# SpaceR's README (Qwen2.5-VL-7B zero-shot row) and the question count of each task (its header).
STI_QWEN = {"3D Video Grounding": 33.75, "Dimensional Measurement": 21.45,
            "Displacement & Path Length": 23.74, "Ego-Centric Orientation": 35.14,
            "Pose Estimation": 50.83, "Spatial Relation": 44.52, "Speed & Acceleration": 31.71,
            "Trajectory Description": 47.44}
STI_COUNTS = {"3D Video Grounding": 317, "Dimensional Measurement": 289,
              "Displacement & Path Length": 358, "Ego-Centric Orientation": 185,
              "Pose Estimation": 360, "Spatial Relation": 146, "Speed & Acceleration": 331,
              "Trajectory Description": 78}


def test_stibench_aggregation_code_and_readme():
  preds = _sti_predictions(STI_QWEN, STI_COUNTS)
  assert len(preds) == 2064
  readme = stibench.aggregate(preds, "readme")
  code = stibench.aggregate(preds)
  # The README prints Overall 36.07 and SR_sub 30.21 (1,387 SR questions, micro).
  assert 100 * readme["overall"] == pytest.approx(36.07, abs=0.01)
  assert 100 * readme["sr_sub"] == pytest.approx(30.21, abs=0.01)
  # The code: SR_sub = mean of six task means (34.00); overall = (8 task means + SR_sub) / 9.
  assert 100 * code["sr_sub"] == pytest.approx(34.00, abs=0.01)
  assert 100 * code["overall"] == pytest.approx(35.84, abs=0.01)
  tasks = list(code["tasks"].values())
  assert code["overall"] == pytest.approx((sum(tasks) + code["sr_sub"]) / 9)
  assert code["tasks"] == readme["tasks"] and code["counts"]["Pose Estimation"] == 360


@pytest.mark.parametrize("scores, code_overall, code_sr, readme_overall, readme_sr", [
    # No SR task: the code still adds sr_sub = 0.0 as a term (mean(1, 0) = 0.5); readme has none.
    ({"Pose Estimation": [1.0, 1.0]}, 0.5, 0.0, 1.0, None),
    # SR tasks with unequal sizes: code macro (1 + 0) / 2, readme micro 1 / 4.
    ({"Spatial Relation": [1.0], "Speed & Acceleration": [0.0, 0.0, 0.0], "Pose Estimation": [1.0]},
     (1 + 0 + 1 + 0.5) / 4, 0.5, 2 / 3, 0.25),
    ({"3D Video Grounding": [0.0, 1.0], "Spatial Relation": [1.0]}, (0.5 + 1 + 1) / 3, 1.0, 0.75,
     1.0),
])
def test_stibench_aggregation_table(scores, code_overall, code_sr, readme_overall, readme_sr):
  preds = [{"task": t, "score": s} for t, ss in scores.items() for s in ss]
  code, readme = stibench.aggregate(preds, "code"), stibench.aggregate(preds, "readme")
  assert (code["overall"], code["sr_sub"]) == pytest.approx((code_overall, code_sr))
  assert readme["overall"] == pytest.approx(readme_overall)
  assert readme["sr_sub"] == (None if readme_sr is None else pytest.approx(readme_sr))
  with pytest.raises(ValueError, match="aggregation"):
    stibench.aggregate(preds, "paper")
  assert stibench.aggregate([])["overall"] is None


def test_stibench_prompts():
  rec = {"time_start": 1.0, "time_end": 2.5, "question": "Where does the car go?",
         "candidates": {"A": "left", "B": "right"}}
  q = "From 1.0 seconds to 2.5 seconds. Where does the car go?\nA left\nB right"
  assert stibench.question_text(rec) == q
  text, system = stibench.build_prompt(rec, "spacer")
  assert system is None and text == (
      prompts.QUESTION_TEMPLATE.format(Question=q) + "\nPlease provide only the single option letter"
      " (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
  assert stibench.build_prompt(rec, "spacer_default")[0] == (
      f"Question: {q}\n\nAnswer with the option's letter from the given choices directly.")


# ---------------------------------------------------------------------------------------------------
# SPAR-Bench.


@pytest.mark.parametrize("pred, gt, expected", [
    ("B", "B", 1.0),
    ("b", "B", 1.0),
    ("", "B", 1.0),  # quirk: "" is a substring of every answer
    ("B. sofa", "B", 1.0),  # first character
    ("bc", "B", 1.0),
    (" B", "B", 0.0),
    ("The answer is B", "B", 0.0),
    ("None", "B", 0.0),
    ("A", "B", 0.0),
])
def test_sparbench_mc(pred, gt, expected):
  rec = {"task": "obj_spatial_relation_oo", "ground_truth": gt}
  assert sparbench.score(rec, pred, "spacer_default")["score"] == expected
  if pred.strip() == pred:  # inside tags (the extraction strips)
    assert sparbench.score(rec, f"<think>x</think><answer>{pred}</answer>", "spacer")["score"] == (
        expected)


@pytest.mark.parametrize("pred, gt, task, expected", [
    ("about 2.5 m", "2.5", "depth_prediction_oc", 1.0),
    ("1.5 or 3", "3", "depth_prediction_oc", 0.1),  # first number: error 0.5
    ("1.5 or 3", "3", "depth_prediction_oc_mv", 1.0),  # *_mv: the last one
    ("no number", "1", "distance_prediction_oo", 0.0),
    ("no number", "1", "distance_prediction_oo_mv", 0.0),  # -1
    ("^2 is 4", "4", "depth_prediction_oo", 1.0),  # a number right after ^ is skipped
    ("-2.5", "2.5", "depth_prediction_oo", 1.0),  # no sign
    ("2,500", "2500", "depth_prediction_oo", 0.0),  # "2"
    ("0.3", "0", "distance_prediction_oc", 0.5),  # g == 0: absolute error 0.3
    ("0", "0", "distance_prediction_oc", 1.0),
    ("4.5", "5", "distance_prediction_oc", 0.9),  # relative error 0.1 passes 0.9 (float64)
    ("9" * 400, "5", "distance_prediction_oc", 0.0),  # int beyond float: the reference's 0
    ("1" * 5000, "5", "distance_prediction_oc", 0.0),
    ("3", "abc", "distance_prediction_oc", 0.0),  # unparseable ground truth: 0
])
def test_sparbench_na(pred, gt, task, expected):
  rec = {"task": task, "ground_truth": gt}
  out = sparbench.score(rec, pred, "spacer_default")
  assert out["score"] == pytest.approx(expected) and out["metric"] == "MRA:.5:.95:.05"


@pytest.mark.parametrize("pred, gt, expected", [
    # Components pred (1, 0, 0, -10, 0), gt (0.5, 0, 0, -15, 0); the error is normalised by the
    # PREDICTION: |0.5 - 1| / 1 = 0.5 -> 0.1, |-15 + 10| / 10 = 0.5 -> 0.1; the zero axes 1.0.
    # (Normalised by the ground truth it would be (0 + 1 + 1 + 0.4 + 1) / 5 = 0.68.)
    ("move_right:1,rotate_left:10", "move_right:0.5,rotate_left:15", 0.64),
    ("move_right:1", "move_right:0", 0.8),  # |0 - 1| / 1 = 1 -> 0
    ("move_right:0", "move_right:1", 0.8),  # p == 0: absolute error 1 -> 0
    ("move_left:1,move_right:1", "move_up:0", 1.0),  # 1 - 1 = 0 on every axis
    ("move_right:1,move_right:2", "move_right:2", 1.0),  # a repeated key: the last one
    ("", "move_right:1", 0.0),
    ("move_right 1", "move_right:1", 0.0),
    ("move_right:abc", "move_right:1", 0.0),
    ("move_right:1:2", "move_right:1", 0.0),
    ("move_right:nan", "move_right:1", 0.8),
])
def test_sparbench_vci(pred, gt, expected):
  rec = {"task": "view_change_infer", "ground_truth": gt}
  assert sparbench.score(rec, pred, "spacer_default")["score"] == pytest.approx(expected)


# SpaceR's README, Spatial-R1-exp-1500 row (x100).
SPAR_EXP1500 = {
    "camera_motion_infer": 40.00, "depth_prediction_oc": 36.14, "depth_prediction_oc_mv": 35.16,
    "depth_prediction_oo": 15.40, "depth_prediction_oo_mv": 19.25,
    "distance_infer_center_oo": 62.35, "distance_infer_center_oo_mv": 61.61,
    "distance_prediction_oc": 40.13, "distance_prediction_oc_mv": 35.07,
    "distance_prediction_oo": 36.97, "distance_prediction_oo_mv": 29.16,
    "obj_spatial_relation_oc_mv": 52.25, "obj_spatial_relation_oo": 51.92,
    "obj_spatial_relation_oo_mv": 46.81, "position_matching": 38.68, "spatial_imagination_oc": 37.90,
    "spatial_imagination_oc_mv": 36.05, "spatial_imagination_oo": 24.83,
    "spatial_imagination_oo_mv": 34.17, "view_change_infer": 17.23,
}


def _img_type(task):
  return "multi-view" if task.endswith("_mv") or task in sparbench.GROUPS["Middle"] else "single-view"


def test_sparbench_aggregation_code_and_readme():
  preds = [{"task": t, "img_type": _img_type(t), "score": v / 100} for t, v in SPAR_EXP1500.items()]
  code, readme = sparbench.aggregate(preds), sparbench.aggregate(preds, "readme")
  for m in (code, readme):
    # README: overall 37.55, single-view 38.21, multi-view 37.12 (all 20 tasks, VCI included).
    assert 100 * m["overall"] == pytest.approx(37.55, abs=0.01)
    assert 100 * m["by_img_type"]["single-view"]["overall"] == pytest.approx(38.21, abs=0.01)
    assert 100 * m["by_img_type"]["multi-view"]["overall"] == pytest.approx(37.12, abs=0.01)
    assert 100 * m["Low"] == pytest.approx(30.91, abs=0.01)
    assert 100 * m["High"] == pytest.approx(45.32, abs=0.01)
  # The code's Middle drops view_change_infer: mean(38.68, 40.00); readme keeps it.
  assert 100 * code["Middle"] == pytest.approx(39.34, abs=0.01)
  assert 100 * readme["Middle"] == pytest.approx(31.97, abs=0.01)
  assert 100 * code["by_img_type"]["multi-view"]["Middle"] == pytest.approx(39.34, abs=0.01)
  assert code["by_img_type"]["single-view"]["Middle"] is None  # the reference: NaN
  cols = dict(sparbench.table_columns(code))
  assert list(cols)[:6] == ["Avg", "Low", "Middle", "High", "multi-view", "single-view"]
  assert len(cols) == 26 and cols["view_change_infer"] == pytest.approx(0.1723)


def test_sparbench_prompts():
  q = "Which is closer?"
  rec = {"question": q, "task": "position_matching"}
  think = prompts.QUESTION_TEMPLATE.format(Question=q)
  assert sparbench.build_prompt(rec, "spacer")[0] == (
      think + "\n" + sparbench.BBOX_NOTE + "\nPlease provide only the single option letter (e.g., A,"
      " B, C, D, etc.) within the <answer> </answer> tags.")
  rec["task"] = "obj_spatial_relation_oo"
  assert sparbench.build_prompt(rec, "spacer_default")[0] == (
      f"Question: {q}\n\n\nAnswer with the option's letter from the given choices directly.")
  rec["task"] = "depth_prediction_oc"
  assert sparbench.build_prompt(rec, "spacer")[0] == (
      think + "\nPlease provide the numerical value (e.g., 42 or 3.1) within the <answer> </answer>"
      " tags.")
  rec["task"] = "view_change_infer"
  assert sparbench.build_prompt(rec, "spacer")[0] == (
      think + "\nFirst output the thinking process in <think> </think> tags and then output the"
      " answer in <answer> </answer> tags.")
  assert sparbench.build_prompt(rec, "spacer_default")[0] == (
      f"Question: {q}\n\nPlease output the answer directly.")


@pytest.mark.hf
def test_sparbench_images_match_qwen_vl_utils_and_transformers(tmp_path):
  """An image of a SPAR row -> qwen-vl-utils' resize (image budget) -> transformers' processor equals
  the evaluator's patches, bit for bit."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spacer_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf  # pylint: disable=g-import-not-at-top
  import test_video  # pylint: disable=g-import-not-at-top
  qwen = test_video.qwen_vl_utils_pure()
  proc = hf.Qwen2VLImageProcessorPil(min_pixels=video_lib.MIN_PIXELS, max_pixels=video_lib.MAX_PIXELS)
  for seed, (h, w) in enumerate([(480, 640), (97, 151), (1000, 700), (30, 40)]):
    data = testdata.png_bytes(seed, h, w)
    vis, failure = evaluate._load_images("r", [data], {"min_pixels": video_lib.MIN_PIXELS,  # pylint: disable=protected-access
                                                       "max_pixels": video_lib.MAX_PIXELS})
    assert failure is None
    img = PIL.Image.open(__import__("io").BytesIO(data)).convert("RGB")
    rh, rw = qwen["smart_resize"](h, w, 28, video_lib.MIN_PIXELS, video_lib.MAX_PIXELS)
    ref = proc(images=[img.resize((rw, rh))], return_tensors="np")  # fetch_image, then the processor
    np.testing.assert_array_equal(vis[0].grid_thw, ref["image_grid_thw"][0])
    np.testing.assert_array_equal(vis[0].pixel_values, ref["pixel_values"])


# ---------------------------------------------------------------------------------------------------
# Video-MME, LongVideoBench, TempCompass.


@pytest.mark.parametrize("output, mme, lvb", [
    ("The best answer is B.", "B", "B"),
    ("Answer: (C)", "C", "C"),
    ("Based on the video, A", "B", "B"),  # the first capital A-D(E) anywhere
    ("a", "", ""),
    ("E", "", "E"),
    ("The answerD", "D", "D"),
    ("The correct option D", "D", "D"),  # prefix list differs; "D" remains either way
    ("one two three four five six seven eight nine ten eleven", "", ""),
    ("<think>Clearly (C)</think><answer>A</answer>", "A", "A"),
])
def test_video_mc_letters(output, mme, lvb):
  assert videomme.score({"ground_truth": mme or "X"}, output, "spacer")["answer"] == mme
  assert longvideobench.score({"ground_truth": lvb or "X"}, output, "spacer")["answer"] == lvb


@pytest.mark.parametrize("pred, gt, expected", [
    ("A", "A", 1.0), ("B", "A", 0.0), ("A. first", "A", 1.0), ("A)", "A", 1.0),
    ("B. first", "A", 0.0), ("first", "A", 0.0), ("A", "A. first", 1.0), ("a", "A", 0.0),
])
def test_tempcompass_eval_mc(pred, gt, expected):
  assert tempcompass.eval_mc(pred, gt) == expected


def test_video_prompts():
  lvb = {"question": "Q?", "candidates": ["x", "y"]}
  assert longvideobench.build_prompt(lvb, "spacer")[0] == (
      prompts.QUESTION_TEMPLATE.format(Question="Q?\nOptions:\nA. x\nB. y\n")
      + "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer>"
      " </answer> tags.")  # no separator, as the reference
  mme = {"question": "Q?", "options": ["A. x", "B. y"]}
  assert videomme.build_prompt(mme, "spacer_default")[0] == (
      "Question: Q?\nOptions:\nA. x\nB. y\n\nAnswer with the option's letter from the given choices"
      " directly.")
  tc = {"problem": "Q?", "problem_type": "multiple choice", "options": ["A. x", "B. y"]}
  text, system = tempcompass.build_prompt(tc, "spacer")
  assert system == "You are a helpful assistant"
  assert text == (prompts.QUESTION_TEMPLATE.format(Question="Q?Options:\nA. x\nB. y\n")
                  + prompts.TYPE_TEMPLATE["multiple choice"])
  tc["problem_type"] = "numerical"
  assert tempcompass.build_prompt(tc, "spacer")[0].endswith("(e.g., 42 or 3.14) within the <answer>"
                                                            " </answer> tags.")
  assert prompts.chat_text("t", "video", system).startswith(
      "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")


def test_video_aggregations():
  preds = [{"task": "S2E", "duration": "short", "score": 1.0},
           {"task": "S2E", "duration": "long", "score": 0.0},
           {"task": "E3E", "duration": "long", "score": 1.0},
           {"task": "XYZ", "duration": "medium", "score": 1.0}]
  m = videomme.aggregate(preds)
  assert m["overall"] == 0.75 and m["by_duration"]["long"]["overall"] == 0.5
  assert [t for t, _ in videomme.table_columns(m)][:4] == ["Overall", "Short", "Medium", "Long"]
  m = longvideobench.aggregate(preds)
  assert (m["overall"], m["perception"], m["relation"]) == (0.75, 0.5, 1.0)
  assert tempcompass.aggregate(preds)["overall"] == 0.75


# ---------------------------------------------------------------------------------------------------
# Readers: bad records and media paths.


def test_vsibench_default_protocol():
  rec = {"question": "How many chairs?", "question_type": "object_counting", "options": None}
  assert vsibench.build_prompt(rec, "spacer_default")[0] == (
      "Question: How many chairs?\n\nPlease answer the question using a numerical value (e.g., 42 or"
      " 3.1).")
  mc = {"question": "Which?", "question_type": "route_planning", "options": ["A. l", "B. r"]}
  assert vsibench.build_prompt(mc, "spacer_default")[0] == (
      "Question: Which?\nOptions:\nA. l\nB. r\n\nAnswer with the option's letter from the given"
      " choices directly.")
  # SpaceR parsing without tag extraction.
  assert vsibench.parse_and_score("spacer_default", "object_counting", "about 3 chairs", "3")[1] == 1
  assert vsibench.parse_and_score("spacer_default", "route_planning", "B. right", "B")[1] == 1
  assert vsibench.parse_and_score("spacer_default", "route_planning", "<answer>B</answer>",
                                  "B")[1] == 0


def _vsi_row(i, **kw):
  row = {"id": i, "dataset": "scannet", "scene_name": f"scene{i}", "question_type": "object_counting",
         "question": "How many?", "options": None, "ground_truth": "3"}
  row.update(kw)
  return row


def test_bad_records_skipped_named_counted(tmp_path):
  d = tmp_path / "vsi"
  (d / "scannet").mkdir(parents=True)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "x.mp4").write_bytes(b"")
  os.symlink(outside / "x.mp4", d / "scannet" / "link.mp4")
  lines = [json.dumps(_vsi_row(0)).encode(),
           b'{"id": 1, "question": "caf\xe9"}',  # not UTF-8
           json.dumps(_vsi_row(2, dataset="../../outside", scene_name="x")).encode(),
           json.dumps(_vsi_row(3, dataset=str(outside), scene_name="x")).encode(),  # absolute
           json.dumps(_vsi_row(4, scene_name="link")).encode(),  # symlink out of data_dir
           b"{not json",
           json.dumps(_vsi_row(6, ground_truth="0")).encode(),
           json.dumps(_vsi_row(0)).encode()]  # duplicate id
  path = d / "test.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  bad = common.BadItems()
  recs = vsibench.load_records(str(d), bad=bad)
  assert [r["id"] for r in recs] == ["0"]
  assert set(bad.records) == {f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)}
  assert dict(bad.by_cause) == {"not_utf8": 1, "outside_data_dir": 3, "malformed_json": 1,
                                "bad_record": 2}
  assert "outside data_dir" in bad.records[f"{path}:3"]
  # allow_outside accepts the three paths; without `bad` the first bad line raises, naming it.
  assert len(vsibench.load_records(str(d), bad=common.BadItems(), allow_outside=True)) == 4
  with pytest.raises(ValueError, match=rf"{path}:2: not_utf8 \(byte .* is not UTF-8"):
    vsibench.load_records(str(d))


def test_other_readers_bad_records(tmp_path):
  root = str(tmp_path / "sti")
  testdata.write_stibench(root)
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = pq.read_table(os.path.join(root, "qa.parquet")).to_pylist()
  rows[1]["Video"] = "../../etc/passwd"
  rows[2]["Answer"] = None
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "qa.parquet"))
  bad = common.BadItems()
  recs = stibench.read_records(root, bad=bad)
  assert len(recs) == len(rows) - 2 and len(bad) == 2
  assert dict(bad.by_cause) == {"outside_data_dir": 1, "bad_record": 1}
  spar = str(tmp_path / "spar")
  os.makedirs(os.path.join(spar, "data"))
  with open(os.path.join(spar, "data", "test.jsonl"), "w") as f:
    f.write(json.dumps({"id": "a", "task": "view_change_infer", "img_type": "multi-view",
                        "question": "q", "answer": "move_right:1", "image": [{"path": "/etc/hosts"}]})
            + "\n")
    f.write(json.dumps({"id": "b", "task": "no_such_task", "img_type": "x", "question": "q",
                        "answer": "A", "image": [{"path": "i.png"}]}) + "\n")
  bad = common.BadItems()
  assert sparbench.read_records(spar, bad=bad) == [] and len(bad) == 2


def test_confined_path(tmp_path):
  assert common.confined_path(str(tmp_path), "a/b.mp4") == os.path.join(str(tmp_path), "a/b.mp4")
  for rel in ("../x.mp4", "/etc/passwd", "a/../../x.mp4"):
    with pytest.raises(common.OutsideDataDir):
      common.confined_path(str(tmp_path), rel)
  assert common.confined_path(str(tmp_path), "/etc/passwd", allow_outside=True) == "/etc/passwd"


# ---------------------------------------------------------------------------------------------------
# End to end: every benchmark's synthetic files through spacer_jax.evaluate with a tiny model.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return testdata.write_tiny_model(str(tmp_path_factory.mktemp("bench_model") / "model"))


def _config(benchmark, model_dir, data_dir, **kw):
  from spacer_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.eval_config(f"benchmark={benchmark}")
  c.model_dir, c.data_dir, c.dtype = model_dir, data_dir, "float32"
  c.max_new_tokens, c.batch_size, c.prompt_buckets, c.progress = 6, 8, (512,), False
  c.video.max_frames = 4
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _check_run(bench, workdir, aggregation="code"):
  """Every stored score is the module's score of the stored output; metrics are its aggregate."""
  preds = [json.loads(l) for l in open(os.path.join(workdir, "predictions.jsonl"))]
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  recs = {r["id"]: r for r in bench.read_records(metrics["data_dir"])}
  for p in preds:
    got = bench.score(recs[p["id"]], p["output"], p["protocol"])
    assert {k: p[k] for k in got} == got
  agg = bench.aggregate(preds, aggregation)
  assert metrics["overall"] == pytest.approx(100 * agg["overall"])
  assert metrics["tasks"] == pytest.approx({k: 100 * v for k, v in agg["tasks"].items()})
  table = open(os.path.join(workdir, "table.md")).read()
  assert table.startswith("| Model | " + bench.table_columns(agg)[0][0])
  return preds, metrics, table


@pytest.mark.parametrize("benchmark", ["stibench", "sparbench"])
def test_end_to_end(benchmark, tiny_model, tmp_path):
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  bench = evaluate.BENCHMARKS[benchmark]
  data = testdata.write(benchmark, str(tmp_path / benchmark))
  out = str(tmp_path / "out")
  result = evaluate.evaluate(_config(benchmark, tiny_model, data), out)
  preds, metrics, _ = _check_run(bench, out)
  assert len(preds) == metrics["num_scored"] == metrics["num_records"] == len(
      bench.read_records(data))
  assert result["num_skipped"] == 0 and result["benchmark"] == benchmark
  if benchmark == "sparbench":  # one or two images per question, each its own vision span
    assert metrics["details"]["by_img_type"].keys() == {"multi-view", "single-view"}
  # The readme aggregation of the same predictions is one switch away: rerunning the finished
  # workdir with it generates nothing and rewrites metrics.json and table.md.
  before = open(os.path.join(out, "predictions.jsonl")).read()
  again = evaluate.evaluate(_config(benchmark, tiny_model, data, aggregation="readme"), out)
  assert open(os.path.join(out, "predictions.jsonl")).read() == before
  _check_run(bench, out, "readme")
  assert again["aggregation"] == "readme" and json.load(open(os.path.join(
      out, "metrics.json")))["aggregation"] == "readme"
  # Scalars for TensorBoard: tag-safe task names.
  assert all(" " not in k and "&" not in k for k in evaluate.scalars(result, "eval/"))


@pytest.mark.slow
@pytest.mark.parametrize("benchmark,protocol", [("videomme", "spacer"), ("tempcompass", "spacer"),
                                                ("longvideobench", "spacer_default"),
                                                ("vsibench", "spacer_default")])
def test_end_to_end_other_benchmarks(benchmark, protocol, tiny_model, tmp_path):
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  data = testdata.write(benchmark, str(tmp_path / benchmark))
  out = str(tmp_path / "out")
  c = _config(benchmark, tiny_model, data, protocol=protocol)
  evaluate.evaluate(c, out)
  preds, metrics, _ = _check_run(evaluate.BENCHMARKS[benchmark], out)
  assert metrics["protocol"] == protocol and metrics["num_skipped"] == 0
  assert len(preds) == metrics["num_records"]


def _bad_videos(d):
  """(1x2000 video, truncated video) under directory d."""
  from spacer_jax.data.synthetic import render  # pylint: disable=g-import-not-at-top
  import test_video  # pylint: disable=g-import-not-at-top
  os.makedirs(d, exist_ok=True)
  wide = os.path.join(d, "wide.mp4")
  render.encode_mp4(np.zeros((4, 2, 2000, 3), np.uint8), wide, fps=2)
  long = os.path.join(d, "long.mp4")
  test_video.make_video(long, n=60, fps=30, w=64, h=64, faststart=True)  # index first
  blob = open(long, "rb").read()
  open(long, "wb").write(blob[:len(blob) * 2 // 3])  # truncated: declares 60 frames, holds fewer
  return wide, long


def test_bad_videos_same_under_both_samplers(tmp_path):
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  wide, long = _bad_videos(str(tmp_path))
  for sampler in ("spacer_eval", "pipeline"):
    vis, reason = evaluate._load_video(long, {"sampler": sampler})  # pylint: disable=protected-access
    assert vis is None and reason.startswith("unreadable (truncated: the container declares 60")
  # SpaceR-Eval's resize takes 2000x2 (W x H) to 448 x 0: named, not a bare PIL ValueError.
  vis, reason = evaluate._load_video(wide, {"sampler": "spacer_eval"})  # pylint: disable=protected-access
  assert vis is None and "resizes to" in reason
  with pytest.raises(Exception, match="wide.mp4"):
    evaluate.load_video_spacer_eval(wide)


@pytest.mark.slow
def test_bad_media_skipped_and_counted(tiny_model, tmp_path):
  """A 1x2000 video, a truncated one and a 1 MB question are skipped and listed; the rest scored."""
  from spacer_jax import evaluate  # pylint: disable=g-import-not-at-top
  data = str(tmp_path / "vsi")
  testdata.write_vsibench(data, num_videos=5)
  wide, long = _bad_videos(str(tmp_path / "bad"))
  os.replace(wide, os.path.join(data, "scannet", "scene0000_00.mp4"))
  os.replace(long, os.path.join(data, "scannet", "scene0001_00.mp4"))
  long = os.path.join(data, "scannet", "scene0001_00.mp4")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = os.path.join(data, "test-00000-of-00001.parquet")
  rows = pq.read_table(path).to_pylist()
  rows[2]["question"] = "x " * 500_000  # 1 MB
  pq.write_table(pa.Table.from_pylist(rows), path)
  for protocol in ("spacer", "official"):
    c = _config("vsibench", tiny_model, data, protocol=protocol, prompt_buckets=(1024,))
    if protocol == "official":
      c.video.sampler = "pipeline"
    out = str(tmp_path / protocol)
    res = evaluate.evaluate(c, out)
    wide = os.path.join(data, "scannet", "scene0000_00.mp4")
    assert res["skipped"][long].startswith("unreadable (truncated")
    if protocol == "spacer":  # 2000 wide -> 448 wide, 0 high after SpaceR-Eval's resize
      assert res["skipped"][wide].startswith("unreadable") and "resizes to" in res["skipped"][wide]
    assert res["skipped"]["question 2"].startswith("prompt_too_long")
    n_wide = sum(r["scene_name"] == "scene0000_00" for r in rows)
    n_long = sum(r["scene_name"] == "scene0001_00" for r in rows)
    assert res["skipped_by_cause"]["truncated"] == n_long
    assert res["skipped_by_cause"]["prompt_too_long"] == 1
    assert res["num_skipped"] == sum(res["skipped_by_cause"].values())
    assert res["num_scored"] + res["num_skipped"] == len(rows)
    if protocol == "spacer":
      assert res["skipped_by_cause"]["unreadable"] == n_wide
    table = open(os.path.join(out, "table.md")).read()
    assert long in table and "question 2 (prompt_too_long" in table


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["stibench", "sparbench"])
def test_command_line_resumes_after_kill(benchmark, tiny_model, tmp_path):
  """`python -m spacer_jax.evaluate --config=configs/eval_<benchmark>.py` killed mid-run and rerun
  gives the metrics of an uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  data = testdata.write(benchmark, str(tmp_path / benchmark), per_task=2)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def cmd(workdir):
    return [sys.executable, "-m", "spacer_jax.evaluate", f"--config=configs/eval_{benchmark}.py",
            f"--config.model_dir={tiny_model}", f"--config.data_dir={data}",
            "--config.dtype=float32", "--config.max_new_tokens=6", "--config.batch_size=2",
            "--config.prompt_buckets=(512,)", "--config.video.max_frames=4",
            "--config.progress=False", f"--workdir={workdir}"]

  env = dict(os.environ, PYTHONPATH=repo)
  full = str(tmp_path / "full")
  proc = subprocess.run(cmd(full), capture_output=True, text=True, timeout=900, cwd=repo, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  killed = str(tmp_path / "killed")
  preds = os.path.join(killed, "predictions.jsonl")
  p = subprocess.Popen(cmd(killed), cwd=repo, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and p.poll() is None:
    if os.path.exists(preds) and sum(1 for _ in open(preds)) >= 2:
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  p.wait()
  n_before = sum(1 for _ in open(preds))
  total = json.load(open(os.path.join(full, "metrics.json")))["num_records"]
  assert 2 <= n_before < total, "the run was not killed mid-way"
  proc = subprocess.run(cmd(killed), capture_output=True, text=True, timeout=900, cwd=repo, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a = json.load(open(os.path.join(full, "metrics.json")))
  b = json.load(open(os.path.join(killed, "metrics.json")))
  for k in ("overall", "tasks", "columns", "details", "counts", "num_scored"):
    assert a[k] == b[k], k
  outputs = lambda d: {json.loads(l)["id"]: json.loads(l)["output"]  # noqa: E731
                       for l in open(os.path.join(d, "predictions.jsonl"))}
  assert outputs(full) == outputs(killed)


# ---------------------------------------------------------------------------------------------------
# Training-time metrics.


def test_infer_question_type_on_vsi_templates(tmp_path):
  """Every question the synthetic generator writes (VSI-Bench's templates) maps to its own type."""
  from spacer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  cfg = synthetic.SyntheticConfig(num_scenes=3, num_eval_scenes=1, questions_per_scene=40,
                                  eval_questions_per_scene=2, num_frames=4, height=32, width=32)
  paths = synthetic.generate_dataset(str(tmp_path / "syn"), cfg, progress=False)
  qtypes = {json.loads(l)["problem_id"]: json.loads(l)["question_type"]
            for l in open(paths.question_types)}
  rows = [json.loads(l) for l in open(paths.train_jsonl)]
  assert {qtypes[r["problem_id"]] for r in rows} == set(vsibench.QUESTION_TYPES) - {"route_planning"}
  for r in rows:
    assert vsibench.infer_question_type(r["problem"]) == qtypes[r["problem_id"]], r["problem"]
  route = ("You are a robot beginning at the bed facing the tv. You want to navigate to the sofa. You"
           " will perform the following actions (Note: for each [please fill in] step, choose either"
           " 'Turn back.' 'Turn left.' or 'Turn right.'.): 1. Go forward until the tv 2. [please fill"
           " in] 3. Go forward until the sofa. You have reached the final destination.")
  assert vsibench.infer_question_type(route) == "route_planning"
  assert vsibench.infer_question_type("What colour is the sky?") is None


def test_rollout_task_scores():
  import types  # pylint: disable=g-import-not-at-top
  recs = {"1": types.SimpleNamespace(problem="How many chair(s) are in this room?",
                                     question_type=None),
          "2": types.SimpleNamespace(problem="anything", question_type="route_planning"),
          "3": types.SimpleNamespace(problem="What colour is it?", question_type=None)}
  samples = [
      {"prompt_id": "1", "completion": "<think>x</think><answer>4</answer>",
       "solution": "<answer>4</answer>"},
      {"prompt_id": "1", "completion": "<answer>2</answer>", "solution": "<answer>4</answer>"},
      {"prompt_id": "2", "completion": "<answer>B</answer>", "solution": "<answer>B</answer>"},
      {"prompt_id": "3", "completion": "<answer>blue</answer>", "solution": "<answer>blue</answer>"},
      {"prompt_id": "9", "completion": "<answer>4</answer>", "solution": "<answer>4</answer>"},
      {"prompt_id": "1", "target": "<answer>4</answer>"},  # SFT sample: no completion
  ]
  assert vsibench.rollout_task_scores(samples, recs) == {
      "rollout_vsi/object_counting": 0.55, "rollout_vsi/route_planning": 1.0}  # MRA(2, 4) = 0.1


def test_metric_writer_text(tmp_path):
  from spacer_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  text = metrics_lib.samples_markdown([{"prompt_id": "7", "reward_total": 1.5,
                                        "completion": "<think>a```b</think>"}])
  assert text.startswith("**prompt_id=7, reward_total=1.5**") and "```\n<think>a" in text
  writer = metrics_lib.MetricWriter(str(tmp_path), use_tensorboard=True)
  writer.write_samples(3, [{"prompt_id": "7", "completion": "hello"}] * 6)
  writer.close()
  events = [f for root, _, fs in os.walk(tmp_path / "tb") for f in fs if "tfevents" in f]
  assert events and b"rollouts/samples" in open(
      os.path.join(tmp_path, "tb", events[0]), "rb").read()


@pytest.mark.slow
def test_trainer_in_loop_evaluation_of_another_benchmark(tmp_path):
  """train.py with config.eval.benchmark=stibench on a subset logs eval/<task> scalars, and the GRPO
  steps log rollout_vsi/<task> scores of the synthetic (VSI-template) questions."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = testdata.write("stibench", str(tmp_path / "sti"))
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "spacer_jax.train", "--config=configs/sgrlvr.py:smoke",
         f"--workdir={wd}", "--config.use_progress_bar=False", "--config.eval.every_steps=2",
         "--config.eval.benchmark=stibench", f"--config.eval.data_dir={data}",
         "--config.eval.max_items=3", "--config.eval.max_new_tokens=4"]
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-4000:]
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  evals = [r for r in rows if "eval/overall" in r]
  assert len(evals) == 1 and evals[0]["step"] == 2
  assert {k for k in evals[0] if k.startswith("eval/")} >= {
      "eval/overall", "eval/3D_Video_Grounding", "eval/num_skipped"}
  assert any(k.startswith("rollout_vsi/") for r in rows for k in r)
  metrics = json.load(open(wd / "eval" / "step_2" / "metrics.json"))
  assert metrics["benchmark"] == "stibench" and metrics["num_records"] == 3
