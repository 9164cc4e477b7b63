"""SPAR-Bench (multi-image spatial perception and reasoning) as SpaceR-Eval scores it.

Layout (the release): the parquet shards `{data_dir}/data/test-0000k-of-00004.parquet` (or *.jsonl),
images inline. Row fields: id, task, img_type, question, answer, image (a list of {"bytes", "path"};
a row of a JSONL file may give "path" only, relative to data_dir).

Images: each goes through qwen-vl-utils' image path (smart_resize to multiples of 28 within 3,136 ..
200,704 pixels, PIL bicubic, then the HF processor's normalisation and patches), one vision span per
image in the user turn, before the text.

Prompt (QUESTION_TEMPLATE under "spacer", "Question: ...\\n" under "spacer_default"), then by task:
* numerical tasks (NA_TASKS): "\\n" + the numerical instruction;
* multiple-choice tasks (MCA_TASKS): "\\n" + (for position_matching and camera_motion_infer: "The values
  represent the bounding box coordinates normalized to a 0-1000 scale, with the top-left corner as the
  origin of the image.") + "\\n" + the option-letter instruction;
* view_change_infer: "\\n" + "First output the thinking process in <think> </think> tags and then
  output the answer in <answer> </answer> tags." ("Please output the answer directly." by default).

Scoring, after tag extraction under "spacer" (reference quirks kept):
* MC, lenient: with p, g lower-cased, 1 if p == g, or p is a substring of g (so an EMPTY prediction
  counts as correct), or p[0] == g; else 0.
* NA: the numbers `(?<!\\^)\\d+\\.\\d+|(?<!\\^)\\d+` of the prediction; the first one (the last one for the
  four *_mv depth/distance tasks, -1 when there is none); MRA over thresholds 0.50..0.95 with error
  |p - g| / |g|, or |p - g| when g == 0; 0 when nothing parses.
* view_change_infer: prediction and answer are "action:value,..." lists; per axis (move right-left,
  up-down, forward-backward, rotate right-left, up-down) the signed difference of the pair; MRA per
  axis with the arguments SWAPPED (the error is normalised by the prediction, |g - p| / |p|, or
  |g - p| when p == 0); mean of the five; 0 when either side does not parse.

Aggregation: per task the mean; overall = mean over the tasks (20 in the release); Low / Middle / High
= means of the task groups; the same per img_type. "code" (default) reproduces the reference, whose
key parsing drops view_change_infer from Middle; "readme" puts it back (the grouping the SPAR-Bench
README's Medium column uses). On SpaceR's README per-task numbers for Spatial-R1-exp-1500: Middle 39.34
(code) vs 31.97 (readme; the SPAR README prints 31.93 for it); overall 37.55 and Low 30.91 either way.
"""

import math
import os
import re

import numpy as np

from spacer_jax import rewards
from spacer_jax.benchmarks import common
from spacer_jax.data import prompts

NAME = "SPAR-Bench"
PROTOCOLS = common.PROTOCOLS
DEFAULT_MAX_NEW_TOKENS = common.DEFAULT_MAX_NEW_TOKENS
MEDIA = "images"
ANNOTATION_SUBDIR = "data"
LAYOUT = "{data_dir}/data/test-*.parquet (images inline)"

MCA_TASKS = (
    "obj_spatial_relation_oo", "obj_spatial_relation_oc_mv", "obj_spatial_relation_oo_mv",
    "spatial_imagination_oc", "spatial_imagination_oo", "spatial_imagination_oc_mv",
    "spatial_imagination_oo_mv", "position_matching", "camera_motion_infer",
    "distance_infer_center_oo", "distance_infer_center_oo_mv",
)
NA_TASKS = (
    "depth_prediction_oc", "depth_prediction_oo", "distance_prediction_oc", "distance_prediction_oo",
    "depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oo_mv",
    "distance_prediction_oc_mv",
)
VCI = "view_change_infer"
TASKS = MCA_TASKS + NA_TASKS + (VCI,)
# NA tasks that read the LAST number of the prediction (-1 when there is none).
LAST_NUMBER_TASKS = ("depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oc_mv",
                     "distance_prediction_oo_mv")
BBOX_TASKS = ("position_matching", "camera_motion_infer")
BBOX_NOTE = ("The values represent the bounding box coordinates normalized to a 0-1000 scale, with the"
             " top-left corner as the origin of the image.")
VCI_POST_PROMPT = {
    "spacer": ("First output the thinking process in <think> </think> tags and then output the answer"
               " in <answer> </answer> tags."),
    "spacer_default": "Please output the answer directly.",
}
GROUPS = {
    "Low": NA_TASKS,
    "Middle": (VCI, "position_matching", "camera_motion_infer"),
    "High": ("obj_spatial_relation_oo", "obj_spatial_relation_oc_mv", "obj_spatial_relation_oo_mv",
             "spatial_imagination_oc", "spatial_imagination_oo", "spatial_imagination_oc_mv",
             "spatial_imagination_oo_mv", "distance_infer_center_oo", "distance_infer_center_oo_mv"),
}
VCI_AXES = (("move_right", "move_left"), ("move_up", "move_down"), ("move_forward", "move_backward"),
            ("rotate_right", "rotate_left"), ("rotate_up", "rotate_down"))

REQUIRED_FIELDS = ("id", "task", "img_type", "question", "answer", "image")
_NUMBER = re.compile(r"(?<!\^)\d+\.\d+|(?<!\^)\d+")


# ---------------------------------------------------------------------------------------------------
# Records and prompts.
# ---------------------------------------------------------------------------------------------------


def _make_record(row, where, data_dir, allow_outside):
  common.check_text(row, where, REQUIRED_FIELDS)
  if row["task"] not in TASKS:
    raise ValueError(f"{where}: field task={row['task']!r} is not a SPAR-Bench task {TASKS}")
  if not isinstance(row["answer"], str) or not row["answer"]:
    raise ValueError(f"{where}: field answer must be a non-empty string, got {row['answer']!r}")
  images = row["image"]
  if not isinstance(images, (list, tuple)) or not images:
    raise ValueError(f"{where}: field image must be a non-empty list of images")
  refs = []
  for k, img in enumerate(images):
    img = img if isinstance(img, dict) else {"path": img}
    if img.get("bytes"):
      refs.append(bytes(img["bytes"]))
    elif img.get("path"):
      common.confined_path(data_dir, str(img["path"]), allow_outside=allow_outside)
      refs.append(str(img["path"]))
    else:
      raise ValueError(f"{where}: image {k} has neither bytes nor a path")
  return {"id": str(row["id"]), "task": row["task"], "img_type": str(row["img_type"]),
          "question": row["question"], "ground_truth": row["answer"], "images": refs}


def read_records(data_dir, bad=None, allow_outside=False):
  """Validated records of every shard in `{data_dir}/data/` (*.parquet or *.jsonl), in name order."""
  paths = common.find_files(os.path.join(data_dir, ANNOTATION_SUBDIR), (".parquet", ".jsonl"), NAME,
                            single=False, example="test-00000-of-00004.parquet")
  return common.read_records(
      paths, lambda row, where: _make_record(row, where, data_dir, allow_outside), bad)


def media(data_dir, record):
  """[encoded bytes or path] of the record's images."""
  return [img if isinstance(img, bytes) else os.path.join(data_dir, img) for img in record["images"]]


def build_prompt(record, protocol):
  if protocol == "spacer":
    text = prompts.QUESTION_TEMPLATE.format(Question=record["question"])
    na_post = prompts.TYPE_TEMPLATE["numerical"].lstrip()
    mca_post = prompts.TYPE_TEMPLATE["multiple choice"].lstrip()
  elif protocol == "spacer_default":
    text = prompts.EVAL_DEFAULT_PRE_PROMPT.format(Question=record["question"])
    na_post = prompts.EVAL_DEFAULT_NA_POST_PROMPT
    mca_post = prompts.EVAL_DEFAULT_MCA_POST_PROMPT
  else:
    raise ValueError(f"{NAME}: unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
  task = record["task"]
  if task in NA_TASKS:
    return text + "\n" + na_post, None
  if task in MCA_TASKS:
    return text + "\n" + (BBOX_NOTE if task in BBOX_TASKS else "") + "\n" + mca_post, None
  return text + "\n" + VCI_POST_PROMPT[protocol], None


# ---------------------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------------------


def lenient_match(pred, target):
  """The reference's multiple-choice match (module docstring); an empty prediction scores 1."""
  p, t = pred.lower(), target.lower()
  return float(p == t or p in t or p[0] == t)


def mra(pred, target):
  """MRA over thresholds 0.50 .. 0.95 with the reference's error: |p - t| / |t|, |p - t| if t == 0."""
  err = abs(pred - target) if target == 0.0 else abs((pred - target) / target)
  return float(np.mean(err <= 1 - rewards.MRA_THRESHOLDS))


def na_number(pred, task):
  """The number the reference reads (first, or last for LAST_NUMBER_TASKS with -1 for none), as a
  float; None where it fails (no number, or one too large for a float)."""
  found = _NUMBER.findall(pred)
  if task in LAST_NUMBER_TASKS:
    found = found[-1:] or ["-1"]
  if not found:
    return None
  num = found[0]
  try:
    value = float(num) if "." in num else float(int(num))
  except (ValueError, OverflowError):  # > 4300 digits, or an int beyond the float range
    return None
  return value


def parse_actions(text):
  """"k:v,k:v" -> {k: float(v)} (keys as written); ValueError when an item is not "k:v"."""
  out = {}
  for item in text.split(","):
    parts = item.split(":")
    if len(parts) != 2:
      raise ValueError(f"not an action 'name:value': {item!r}")
    out[parts[0]] = float(parts[1])
  return out


def vci_metric(pred, target):
  """view_change_infer score (module docstring): per-axis MRA normalised by the PREDICTION."""
  try:
    p, g = parse_actions(pred), parse_actions(target)
  except ValueError:
    return 0.0
  scores = []
  for pos, neg in VCI_AXES:
    pv = p.get(pos, 0) - p.get(neg, 0)
    gv = g.get(pos, 0) - g.get(neg, 0)
    scores.append(mra(gv, pv))  # arguments swapped, as in the reference
  return float(np.mean(scores))


def score(record, output, protocol):
  pred = common.maybe_extract(output, protocol)
  task, gt = record["task"], record["ground_truth"]
  if task in MCA_TASKS:
    return {"answer": pred, "score": lenient_match(pred, gt), "metric": "accuracy"}
  if task in NA_TASKS:
    value, target = na_number(pred, task), common.to_float(gt)
    ok = value is not None and target is not None and math.isfinite(target)
    return {"answer": "None" if value is None else repr(value),
            "score": mra(value, target) if ok else 0.0, "metric": "MRA:.5:.95:.05"}
  return {"answer": pred, "score": vci_metric(pred, gt), "metric": "vci_metric"}


def item_fields(record):
  return {"task": record["task"], "img_type": record["img_type"],
          "ground_truth": record["ground_truth"]}


# ---------------------------------------------------------------------------------------------------
# Aggregation.
# ---------------------------------------------------------------------------------------------------


def _summary(predictions, aggregation):
  tasks, counts = common.group_means(predictions, "task")
  tasks = {t: tasks[t] for t in TASKS if t in tasks}
  groups = {}
  for group, members in GROUPS.items():
    if group == "Middle" and aggregation == "code":
      members = tuple(t for t in members if t != VCI)  # the reference's key parsing loses it
    groups[group] = common.mean(tasks[t] for t in members if t in tasks)
  return {"overall": common.mean(tasks.values()), "tasks": tasks, "counts": counts, **groups}


def aggregate(predictions, aggregation="code"):
  """{"overall", "tasks", "counts", "Low", "Middle", "High", "by_img_type": {img_type: same},
  "num_scored", "aggregation"} in [0, 1]; None where a group is empty (the reference: NaN)."""
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  predictions = list(predictions)
  out = _summary(predictions, aggregation)
  img_types = sorted({p["img_type"] for p in predictions})
  out["by_img_type"] = {k: _summary([p for p in predictions if p["img_type"] == k], aggregation)
                        for k in img_types}
  out.update(num_scored=len(predictions), aggregation=aggregation)
  return out


def table_columns(metrics):
  """Avg, Low, Middle, High, the overall of each img_type, then the 20 tasks (README order)."""
  cols = [("Avg", metrics["overall"])] + [(g, metrics[g]) for g in GROUPS]
  cols += [(k, v["overall"]) for k, v in metrics["by_img_type"].items()]
  return cols + [(t, metrics["tasks"].get(t)) for t in sorted(TASKS)]


def table_notes(metrics):
  if metrics["aggregation"] == "code":
    return "Aggregation code (SpaceR-Eval): Middle leaves out view_change_infer."
  return "Aggregation readme: Middle = mean of view_change_infer, position_matching, camera_motion_infer."
