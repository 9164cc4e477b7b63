"""Video-MME (without subtitles) as SpaceR-Eval scores it.

Layout (the release): `{data_dir}/videomme/test-00000-of-00001.parquet` (or one *.jsonl / *.json there)
and the videos at `{data_dir}/data/{videoID}.mp4`. Row fields: question_id, videoID, duration
(short / medium / long), task_type, question, options (["A. ...", ...]), answer (a letter).

Prompt: question + "\\nOptions:\\n" + the options joined by "\\n"; QUESTION_TEMPLATE + "\\n" + the
option-letter instruction ("spacer"), or "Question: ...\\n" + "\\n" + "Answer with the option's letter
from the given choices directly." ("spacer_default"). Frames as for VSI-Bench.

Parsing: after tag extraction ("spacer"), the answer prefixes ("The best answer is", "Answer:", ...)
are deleted and the first capital A-D anywhere in the text is the choice (common.first_option_letter);
exact match with the answer. Aggregation: accuracy over all questions (micro), per task type and per
duration; "code" and "readme" agree.
"""

import os

from spacer_jax.benchmarks import common

NAME = "Video-MME"
PROTOCOLS = common.PROTOCOLS
DEFAULT_MAX_NEW_TOKENS = common.DEFAULT_MAX_NEW_TOKENS
MEDIA = "video"
ANNOTATION_SUBDIR = "videomme"
VIDEO_SUBDIR = "data"
LAYOUT = "{data_dir}/videomme/test-00000-of-00001.parquet and {data_dir}/data/{videoID}.mp4"

DURATIONS = ("short", "medium", "long")
TASK_TYPES = ("Temporal Perception", "Spatial Perception", "Attribute Perception",
              "Action Recognition", "Object Recognition", "OCR Problems", "Counting Problem",
              "Temporal Reasoning", "Spatial Reasoning", "Action Reasoning", "Object Reasoning",
              "Information Synopsis")
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:",
                   "Answer:", "Option:", "The correct answer", "The correct option")
LETTERS = "ABCD"
REQUIRED_FIELDS = ("question_id", "videoID", "duration", "task_type", "question", "options", "answer")


def _make_record(row, where, data_dir, allow_outside):
  common.check_text(row, where, REQUIRED_FIELDS)
  options = row["options"]
  if not isinstance(options, (list, tuple)) or not options:
    raise ValueError(f"{where}: field options must be a non-empty list")
  if not isinstance(row["answer"], str) or not row["answer"]:
    raise ValueError(f"{where}: field answer must be a non-empty string, got {row['answer']!r}")
  common.confined_path(os.path.join(data_dir, VIDEO_SUBDIR), f"{row['videoID']}.mp4",
                       allow_outside=allow_outside)
  return {"id": str(row["question_id"]), "video_id": str(row["videoID"]),
          "duration": str(row["duration"]), "task": str(row["task_type"]),
          "question": row["question"], "options": [str(o) for o in options],
          "ground_truth": row["answer"]}


def read_records(data_dir, bad=None, allow_outside=False):
  paths = common.find_files(os.path.join(data_dir, ANNOTATION_SUBDIR),
                            (".parquet", ".jsonl", ".json"), NAME,
                            example="test-00000-of-00001.parquet")
  return common.read_records(
      paths, lambda row, where: _make_record(row, where, data_dir, allow_outside), bad)


def media(data_dir, record):
  return os.path.join(data_dir, VIDEO_SUBDIR, f"{record['video_id']}.mp4")


def build_prompt(record, protocol):
  q = record["question"] + "\nOptions:\n" + "\n".join(record["options"])
  return common.multiple_choice_prompt(q, protocol, NAME, sep="\n")


def score(record, output, protocol):
  answer = common.first_option_letter(common.maybe_extract(output, protocol), ANSWER_PREFIXES,
                                      LETTERS)
  return {"answer": answer, "score": float(answer == record["ground_truth"])}


def item_fields(record):
  return {"task": record["task"], "duration": record["duration"],
          "ground_truth": record["ground_truth"]}


def aggregate(predictions, aggregation="code"):
  """{"overall", "tasks", "counts", "by_duration": {d: {"overall", "tasks"}}, "num_scored"}."""
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  predictions = list(predictions)
  tasks, counts = common.group_means(predictions, "task")
  by_duration = {}
  for d in sorted({p["duration"] for p in predictions}):
    group = [p for p in predictions if p["duration"] == d]
    by_duration[d] = {"overall": common.mean(p["score"] for p in group),
                      "tasks": common.group_means(group, "task")[0]}
  return {"overall": common.mean(p["score"] for p in predictions), "tasks": tasks,
          "counts": counts, "by_duration": by_duration, "num_scored": len(predictions),
          "aggregation": aggregation}


def table_columns(metrics):
  """Overall, Short, Medium, Long, then the task types."""
  durations = [d for d in DURATIONS if d in metrics["by_duration"]] + sorted(
      d for d in metrics["by_duration"] if d not in DURATIONS)
  extra = sorted(t for t in metrics["tasks"] if t not in TASK_TYPES)
  return ([("Overall", metrics["overall"])]
          + [(d.capitalize(), metrics["by_duration"][d]["overall"]) for d in durations]
          + [(t, metrics["tasks"].get(t)) for t in TASK_TYPES + tuple(extra)])


def table_notes(metrics):
  del metrics
  return "Accuracy over questions (micro), per duration and task type."
