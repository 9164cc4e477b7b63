"""TempCompass (Video-R1's evaluation JSON) as SpaceR-Eval scores it.

Layout: `{data_dir}/eval_tempcompass.json` (or one *.jsonl there) and the videos at
`{data_dir}/videos/{video_id}.mp4`. Row fields: problem_id, video_id, problem,
problem_type, options (multiple choice), solution ("<answer>A</answer>").

Prompt: system message "You are a helpful assistant" (no full stop, unlike the chat template's
default); Video-R1's question (problem + "Options:\\n" + "{option}\\n" per option for multiple choice,
else problem) in QUESTION_TEMPLATE + the TYPE_TEMPLATE suffix ("spacer"; numerical uses "3.14" here), or
"Question: ...\\n" + a suffix without the tag instruction ("spacer_default"). Frames as for VSI-Bench.

Parsing: the ground truth is the solution's tag content (a solution without tags is a bad record;
the reference would compare with "None"); the prediction after
tag extraction ("spacer"). Score (`eval_mc`): 1 if equal; else if the prediction is one of A-D, 1 iff
it equals the ground truth's first character; else if it starts with "X." or "X)" (X in A-D), 1 iff X
is that character; else 0. Aggregation: accuracy over all questions; "code" and "readme" agree.
"""

import os

from spacer_jax import rewards
from spacer_jax.benchmarks import common
from spacer_jax.data import prompts

NAME = "TempCompass"
PROTOCOLS = common.PROTOCOLS
DEFAULT_MAX_NEW_TOKENS = common.DEFAULT_MAX_NEW_TOKENS
MEDIA = "video"
VIDEO_SUBDIR = "videos"
LAYOUT = "{data_dir}/eval_tempcompass.json and {data_dir}/videos/{video_id}.mp4"
SYSTEM_PROMPT = "You are a helpful assistant"

# The non-thinking suffixes of SpaceR-Eval's TempCompass code (the thinking ones are TYPE_TEMPLATE).
DEFAULT_TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.).",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14).",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer.",
    "free-form": " Please provide your text answer.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14).",
}
# TempCompass's numerical suffix says "3.14" (Video-R1's wording), not the training prompt's "3.1".
THINKING_TYPE_TEMPLATE = dict(
    prompts.TYPE_TEMPLATE,
    numerical=" Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer>"
              " tags.")
REQUIRED_FIELDS = ("problem_id", "video_id", "problem", "problem_type", "solution")


def _make_record(row, where, data_dir, allow_outside):
  common.check_text(row, where, REQUIRED_FIELDS)
  ptype = row["problem_type"]
  if ptype not in DEFAULT_TYPE_TEMPLATE:
    raise ValueError(f"{where}: field problem_type={ptype!r} is not one of"
                     f" {tuple(DEFAULT_TYPE_TEMPLATE)}")
  options = row.get("options") or []
  if ptype == "multiple choice" and not options:
    raise ValueError(f"{where}: field options is empty for a multiple-choice question")
  gt = rewards.find_tag(str(row["solution"]), "answer")
  if not gt:
    raise ValueError(f"{where}: field solution={row['solution']!r} has no non-empty"
                     " <answer>...</answer>")
  common.confined_path(os.path.join(data_dir, VIDEO_SUBDIR), f"{row['video_id']}.mp4",
                       allow_outside=allow_outside)
  return {"id": str(row["problem_id"]), "video_id": str(row["video_id"]),
          "problem": row["problem"], "problem_type": ptype, "options": [str(o) for o in options],
          "ground_truth": gt}


def read_records(data_dir, bad=None, allow_outside=False):
  paths = common.find_files(data_dir, (".json", ".jsonl"), NAME, example="eval_tempcompass.json")
  return common.read_records(
      paths, lambda row, where: _make_record(row, where, data_dir, allow_outside), bad)


def media(data_dir, record):
  return os.path.join(data_dir, VIDEO_SUBDIR, f"{record['video_id']}.mp4")


def build_prompt(record, protocol):
  if record["problem_type"] == "multiple choice":
    q = record["problem"] + "Options:\n" + "".join(o + "\n" for o in record["options"])
  else:
    q = record["problem"]
  if protocol == "spacer":
    text = prompts.QUESTION_TEMPLATE.format(Question=q) + THINKING_TYPE_TEMPLATE[
        record["problem_type"]]
  elif protocol == "spacer_default":
    text = prompts.EVAL_DEFAULT_PRE_PROMPT.format(Question=q) + DEFAULT_TYPE_TEMPLATE[
        record["problem_type"]]
  else:
    raise ValueError(f"{NAME}: unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
  return text, SYSTEM_PROMPT


def eval_mc(pred, ans):
  """The reference's `eval_mc` (module docstring)."""
  if pred == ans:
    return 1.0
  if pred in ("A", "B", "C", "D"):
    return float(pred == ans[0])
  if pred[:2] in ("A.", "B.", "C.", "D."):
    return float(pred.split(".")[0] == ans[0])
  if pred[:2] in ("A)", "B)", "C)", "D)"):
    return float(pred.split(")")[0] == ans[0])
  return 0.0


def score(record, output, protocol):
  pred = common.maybe_extract(output, protocol)
  return {"answer": pred, "score": eval_mc(pred, record["ground_truth"])}


def item_fields(record):
  return {"task": record["problem_type"], "ground_truth": record["ground_truth"]}


def aggregate(predictions, aggregation="code"):
  """{"overall", "tasks" (per problem type), "counts", "num_scored"} in [0, 1]."""
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  predictions = list(predictions)
  tasks, counts = common.group_means(predictions, "task")
  return {"overall": common.mean(p["score"] for p in predictions), "tasks": tasks,
          "counts": counts, "num_scored": len(predictions), "aggregation": aggregation}


def table_columns(metrics):
  return [("Overall", metrics["overall"])] + sorted(metrics["tasks"].items())


def table_notes(metrics):
  del metrics
  return "Accuracy over questions (micro)."
