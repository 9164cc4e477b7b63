"""LongVideoBench (validation set) as SpaceR-Eval scores it.

Layout: `{data_dir}/lvb_val.json` (or one *.jsonl there) and the videos at
`{data_dir}/videos/{video_id}.mp4`. Row fields: id, video_id, question, candidates (list of texts),
correct_choice (index), question_category, topic_category, duration.

Prompt: question + "\\nOptions:\\n" + "A. {candidate}\\n" per candidate; QUESTION_TEMPLATE + the
option-letter instruction concatenated WITHOUT a separator ("...tags.Please provide only ...", as the
reference does) under "spacer"; "Question: ...\\n" + "Answer with the option's letter from the given
choices directly." under "spacer_default". Frames as for VSI-Bench.

Parsing: after tag extraction ("spacer"), answer prefixes deleted, then the first capital A-E anywhere
(common.first_option_letter); ground truth chr(65 + correct_choice); exact match. Aggregation: accuracy
over all questions (micro), per question category, and over the perception and relation categories;
"code" and "readme" agree.
"""

import os

from spacer_jax.benchmarks import common

NAME = "LongVideoBench"
PROTOCOLS = common.PROTOCOLS
DEFAULT_MAX_NEW_TOKENS = common.DEFAULT_MAX_NEW_TOKENS
MEDIA = "video"
VIDEO_SUBDIR = "videos"
LAYOUT = "{data_dir}/lvb_val.json and {data_dir}/videos/{video_id}.mp4"

PERCEPTION = ("S2E", "S2O", "S2A", "E2O", "O2E", "T2E", "T2O", "T2A")
RELATION = ("E3E", "O3O", "SSS", "SOS", "SAA", "T3E", "T3O", "TOS", "TAA")
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:",
                   "Answer:", "Option:")
LETTERS = "ABCDE"
REQUIRED_FIELDS = ("id", "video_id", "question", "candidates", "correct_choice",
                   "question_category")


def _make_record(row, where, data_dir, allow_outside):
  common.check_text(row, where, REQUIRED_FIELDS)
  cands = row["candidates"]
  if not isinstance(cands, (list, tuple)) or not cands:
    raise ValueError(f"{where}: field candidates must be a non-empty list")
  try:
    choice = int(row["correct_choice"])
  except (TypeError, ValueError):
    raise ValueError(f"{where}: field correct_choice={row['correct_choice']!r} is not an index")
  if not 0 <= choice < len(cands):
    raise ValueError(f"{where}: correct_choice {choice} is not an index of {len(cands)} candidates")
  common.confined_path(os.path.join(data_dir, VIDEO_SUBDIR), f"{row['video_id']}.mp4",
                       allow_outside=allow_outside)
  return {"id": str(row["id"]), "video_id": str(row["video_id"]), "question": row["question"],
          "candidates": [str(c) for c in cands], "ground_truth": chr(ord("A") + choice),
          "task": str(row["question_category"]),
          "topic_category": str(row.get("topic_category", "")), "duration": row.get("duration")}


def read_records(data_dir, bad=None, allow_outside=False):
  paths = common.find_files(data_dir, (".json", ".jsonl"), NAME, example="lvb_val.json")
  return common.read_records(
      paths, lambda row, where: _make_record(row, where, data_dir, allow_outside), bad)


def media(data_dir, record):
  return os.path.join(data_dir, VIDEO_SUBDIR, f"{record['video_id']}.mp4")


def build_prompt(record, protocol):
  q = record["question"] + "\nOptions:\n" + "".join(
      f"{chr(ord('A') + i)}. {c}\n" for i, c in enumerate(record["candidates"]))
  return common.multiple_choice_prompt(q, protocol, NAME)


def score(record, output, protocol):
  answer = common.first_option_letter(common.maybe_extract(output, protocol), ANSWER_PREFIXES,
                                      LETTERS)
  return {"answer": answer, "score": float(answer == record["ground_truth"])}


def item_fields(record):
  return {"task": record["task"], "topic_category": record["topic_category"],
          "ground_truth": record["ground_truth"]}


def aggregate(predictions, aggregation="code"):
  """{"overall", "tasks" (per question category), "counts", "perception", "relation", ...}."""
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  predictions = list(predictions)
  tasks, counts = common.group_means(predictions, "task")
  return {"overall": common.mean(p["score"] for p in predictions), "tasks": tasks,
          "counts": counts,
          "perception": common.mean(p["score"] for p in predictions if p["task"] in PERCEPTION),
          "relation": common.mean(p["score"] for p in predictions if p["task"] in RELATION),
          "num_scored": len(predictions), "aggregation": aggregation}


def table_columns(metrics):
  """Overall, Perception, Relation, then the question categories."""
  cats = [c for c in PERCEPTION + RELATION if c in metrics["tasks"]] + sorted(
      c for c in metrics["tasks"] if c not in PERCEPTION + RELATION)
  return ([("Overall", metrics["overall"]), ("Perception", metrics["perception"]),
           ("Relation", metrics["relation"])] + [(c, metrics["tasks"][c]) for c in cats])


def table_notes(metrics):
  del metrics
  return "Accuracy over questions (micro); Perception / Relation over their categories' questions."
