"""STI-Bench (spatial-temporal intelligence of videos) as SpaceR-Eval scores it.

Layout (the release): `{data_dir}/qa.parquet` (or one *.jsonl / *.json with the same rows) and the
videos at `{data_dir}/video/{Video}`. Row fields: ID, Video, Task, time_start, time_end, Question,
Candidates ({letter: text}), Answer (a letter).

Prompt: "From {time_start} seconds to {time_end} seconds. " + Question + "\\n" + one "{letter} {text}"
line per candidate; under "spacer" QUESTION_TEMPLATE + "\\n" + the multiple-choice instruction (no
leading space), under "spacer_default" "Question: ...\\n" + "\\n" + "Answer with the option's letter from
the given choices directly.". Frames as for VSI-Bench (up to 32 at 1 fps, long side 448).

Parsing: after tag extraction ("spacer"), the first of these case-insensitive (multi-line) patterns
that matches gives the letter, upper-cased: `\\(([A-E])\\)`, `Ans\\s*=\\s*['"]?([A-E])['"]?`,
`Answer\\s*[:=]\\s*([A-E])`, `Option\\s+([A-E])`, `\\b([A-E])\\s*(?:is|was)\\s*correct`,
`\\b([A-E])[\\.\\)]\\s*$`; otherwise the stripped text. Score 1 iff it equals Answer exactly.

Aggregation:
* "code" (SpaceR-Eval, the default): mean per Task; sr_sub = unweighted mean of the six SR tasks
  present (0.0 when none); overall = the mean of the task means AND sr_sub, i.e. sr_sub enters the
  overall as a ninth term.
* "readme" (SpaceR's README tables): overall = unweighted mean of the task means; SR_sub = accuracy
  over all questions of the six SR tasks (a micro mean). On the README's own per-task numbers for
  Qwen2.5-VL-7B the two give 36.07 / SR_sub 30.21 (readme) and 35.84 / 34.00 (code).
"""

import json
import os
import re

from spacer_jax.benchmarks import common

NAME = "STI-Bench"
PROTOCOLS = common.PROTOCOLS
DEFAULT_MAX_NEW_TOKENS = common.DEFAULT_MAX_NEW_TOKENS
MEDIA = "video"
VIDEO_SUBDIR = "video"
LAYOUT = "{data_dir}/qa.parquet and {data_dir}/video/{Video}"

# The README's column order, with the question counts of the release (2,064 in all).
TASKS = ("3D Video Grounding", "Dimensional Measurement", "Displacement & Path Length",
         "Ego-Centric Orientation", "Pose Estimation", "Spatial Relation", "Speed & Acceleration",
         "Trajectory Description")
SR_SUB_TASKS = ("Dimensional Measurement", "Displacement & Path Length", "Ego-Centric Orientation",
                "Spatial Relation", "Speed & Acceleration", "Trajectory Description")

REQUIRED_FIELDS = ("ID", "Video", "Task", "time_start", "time_end", "Question", "Candidates", "Answer")

_FLAGS = re.IGNORECASE | re.MULTILINE
ANSWER_PATTERNS = tuple(re.compile(p, _FLAGS) for p in (
    r"\(([A-E])\)",
    r"Ans\s*=\s*['\"]?([A-E])['\"]?",
    r"Answer\s*[:=]\s*([A-E])",
    r"Option\s+([A-E])",
    r"\b([A-E])\s*(?:is|was)\s*correct",
    r"\b([A-E])[\.\)]\s*$",
))


def _make_record(row, where, data_dir, allow_outside):
  common.check_text(row, where, REQUIRED_FIELDS)
  cands = row["Candidates"]
  if isinstance(cands, str):  # some exports store the mapping as a JSON string
    try:
      cands = json.loads(cands)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: field Candidates is not a mapping ({e})") from None
  if not isinstance(cands, dict) or not cands:
    raise ValueError(f"{where}: field Candidates must be a non-empty mapping letter -> text")
  answer = row["Answer"]
  if not isinstance(answer, str) or not answer:
    raise ValueError(f"{where}: field Answer must be a non-empty string, got {answer!r}")
  if not isinstance(row["Task"], str) or not row["Task"]:
    raise ValueError(f"{where}: field Task must be a non-empty string")
  common.confined_path(os.path.join(data_dir, VIDEO_SUBDIR), str(row["Video"]),
                       allow_outside=allow_outside)
  return {"id": str(row["ID"]), "video": str(row["Video"]), "task": row["Task"],
          "time_start": row["time_start"], "time_end": row["time_end"], "question": row["Question"],
          "candidates": cands, "ground_truth": answer}


def read_records(data_dir, bad=None, allow_outside=False):
  """Validated records of `{data_dir}/qa.parquet` (or the one *.jsonl / *.json there)."""
  paths = common.find_files(data_dir, (".parquet", ".jsonl", ".json"), NAME, example="qa.parquet")
  return common.read_records(
      paths, lambda row, where: _make_record(row, where, data_dir, allow_outside), bad)


def media(data_dir, record):
  return os.path.join(data_dir, VIDEO_SUBDIR, record["video"])


def question_text(record):
  """SpaceR-Eval's question: time window, question, then "{letter} {text}" per candidate."""
  lines = [f"{k} {v}" for k, v in record["candidates"].items()]
  return (f"From {record['time_start']} seconds to {record['time_end']} seconds. "
          + record["question"] + "\n" + "\n".join(lines))


def build_prompt(record, protocol):
  q = question_text(record)
  return common.multiple_choice_prompt(q, protocol, NAME, sep="\n")


def normalize_answer(text):
  """The letter of the first answer pattern that matches (upper-cased), else None."""
  for pattern in ANSWER_PATTERNS:
    m = pattern.search(text)
    if m:
      return m.group(1).upper()
  return None


def parse_answer(output, protocol):
  text = common.maybe_extract(output, protocol)
  return normalize_answer(text) or text.strip()


def score(record, output, protocol):
  answer = parse_answer(output, protocol)
  return {"answer": answer, "score": float(answer == record["ground_truth"])}


def item_fields(record):
  return {"task": record["task"], "video": record["video"], "ground_truth": record["ground_truth"]}


def aggregate(predictions, aggregation="code"):
  """{"overall", "sr_sub", "tasks", "counts", "num_scored", "aggregation"} in [0, 1] (module doc)."""
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  predictions = list(predictions)
  tasks, counts = common.group_means(predictions, "task")
  if aggregation == "code":
    present = [tasks[t] for t in SR_SUB_TASKS if t in tasks]
    sr_sub = common.mean(present) if present else 0.0
    overall = common.mean(list(tasks.values()) + [sr_sub]) if tasks else None
  else:
    overall = common.mean(tasks.values())
    sr_sub = common.mean(p["score"] for p in predictions if p["task"] in SR_SUB_TASKS)
  return {"overall": overall, "sr_sub": sr_sub, "tasks": tasks, "counts": counts,
          "num_scored": len(predictions), "aggregation": aggregation}


def table_columns(metrics):
  """The README's columns: the 8 tasks, Overall, SR_sub (tasks outside the release come last)."""
  extra = [t for t in metrics["tasks"] if t not in TASKS]
  return ([(t, metrics["tasks"].get(t)) for t in TASKS + tuple(extra)]
          + [("Overall", metrics["overall"]), ("SR_sub", metrics["sr_sub"])])


def table_notes(metrics):
  if metrics["aggregation"] == "code":
    return ("Aggregation code (SpaceR-Eval): Overall = mean of the task means and SR_sub (a ninth"
            " term); SR_sub = mean of the six SR task means.")
  return ("Aggregation readme: Overall = mean of the task means; SR_sub = accuracy over all"
          " questions of the six SR tasks.")
