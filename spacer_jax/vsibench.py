"""VSI-Bench scoring on the host: records, answer parsing, metrics, tables, resumable predictions.

Everything here is pure Python/NumPy (no model, no JAX), so the evaluator's arithmetic is testable on
its own; `spacer_jax.evaluate` runs the model and calls into this file.

Three protocols (docs/spacer_recipe.md, "VSI-Bench"):
* "official": the VSI-Bench release (thinking-in-space/lmms_eval). Direct-answer prompt, greedy,
  max_new_tokens 16. Both MCA and NA parse the first space-separated word with trailing dots removed:
  `pred.split(' ')[0].rstrip('.').strip()`; MCA = case-insensitive equality with the option letter,
  NA = MRA(float(word), float(gt)), 0 when the word is not a number.
* "spacer": SpaceR-Eval (the numbers SpaceR reports). Think/answer COGMAP prompt; the answer is the
  first `<answer>(.*?)</answer>` (stripped), "None" when `<answer>` opens but never closes, the raw
  output when there is no `<answer>`. MCA: drop "Answer:", take the first space-separated token; if it is
  an uppercase letter A-D with an optional dot use the letter, else the whole stripped text; compare
  case-insensitively. NA: MRA(float(fuzzy_number(answer)), float(gt)), 0 when unparseable.
* "spacer_default": SpaceR-Eval's non-thinking "default" mode. Prompt "Question: {question + options}\n",
  "\n", then "Answer with the option's letter from the given choices directly." (MCA) or "Please answer
  the question using a numerical value (e.g., 42 or 3.1)." (NA); 128 new tokens; the raw output is
  parsed as under "spacer" (no tag extraction).

This module follows the benchmark contract of `spacer_jax.benchmarks.common` (read_records,
build_prompt, score, item_fields, aggregate, table_columns), so `spacer_jax.evaluate` runs it like the
other benchmarks. Records whose video path would leave data_dir (`..`, absolute, symlinks) are bad
records.

Aggregation (identical in both, and to the official repo): mean per question_type; the three
object_rel_direction levels are averaged without weights into one task; overall = unweighted mean of
the task scores; reported x100.
"""

import collections
import math
import os
import re
import sys

from spacer_jax import rewards
from spacer_jax.benchmarks import common
from spacer_jax.data import prompts

NAME = "VSI-Bench"
PROTOCOLS = ("spacer", "official", "spacer_default")
DEFAULT_MAX_NEW_TOKENS = {"spacer": 1024, "official": 16, "spacer_default": 128}
MEDIA = "video"
LAYOUT = "{data_dir}/{dataset}/{scene_name}.mp4"

MCA_TYPES = prompts.VSI_MCA_TYPES  # the three object_rel_direction levels come first
NA_TYPES = prompts.VSI_NA_TYPES
QUESTION_TYPES = MCA_TYPES + NA_TYPES
REL_DIRECTION_LEVELS = MCA_TYPES[:3]
REL_DIRECTION = "object_rel_direction"

# The 8 tasks in the column order of the paper's table (docs/spacer_recipe.md,
# "VSI-Bench", reported numbers), with their column titles.
TASKS = (
    ("object_counting", "Obj.Count"),
    ("object_abs_distance", "Abs.Dist"),
    ("object_size_estimation", "Obj.Size"),
    ("room_size_estimation", "Room Size"),
    ("object_rel_distance", "Rel.Dist"),
    (REL_DIRECTION, "Rel.Dir"),
    ("route_planning", "Route Plan"),
    ("obj_appearance_order", "Appr.Order"),
)
TASK_NAMES = tuple(name for name, _ in TASKS)

REQUIRED_FIELDS = ("id", "dataset", "scene_name", "question_type", "question", "ground_truth")

_MCA_LETTER = re.compile(r"^[A-D]\.?$")


def task_of(question_type):
  """Task name of a question_type: the rel-direction levels map to "object_rel_direction"."""
  return REL_DIRECTION if question_type in REL_DIRECTION_LEVELS else question_type


def is_mca(question_type):
  if question_type in MCA_TYPES:
    return True
  if question_type in NA_TYPES:
    return False
  raise ValueError(f"unknown VSI-Bench question_type {question_type!r}; known: {QUESTION_TYPES}")


# ---------------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------------


def find_annotation_file(data_dir):
  """The annotation file of a VSI-Bench directory: one *.parquet, *.jsonl or *.json at its top level.

  The official release is `test-00000-of-00001.parquet` next to `{dataset}/{scene_name}.mp4`.
  """
  return common.find_files(data_dir, (".parquet", ".jsonl", ".json"), "VSI-Bench",
                           example="test-00000-of-00001.parquet next to the video folders"
                           " {dataset}/{scene_name}.mp4")[0]


def validate_record(row, where):
  """Checks one VSI-Bench record and returns it normalised (id as str, options as list or None)."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: a VSI-Bench record must be an object, got {type(row).__name__}")
  missing = [k for k in REQUIRED_FIELDS if row.get(k) is None]
  if missing:
    raise ValueError(f"{where} (id={row.get('id')!r}): missing field(s) {missing}; a VSI-Bench record"
                     f" has {REQUIRED_FIELDS + ('options',)}")
  rec = dict(row)
  rec["id"] = str(row["id"])
  where = f"{where} (id={rec['id']})"
  qtype = rec["question_type"]
  if qtype not in QUESTION_TYPES:
    raise ValueError(f"{where}: field question_type={qtype!r} is not a VSI-Bench type {QUESTION_TYPES}")
  gt = str(rec["ground_truth"]).strip()
  rec["ground_truth"] = gt
  options = rec.get("options")
  if is_mca(qtype):
    if options is None or len(options) == 0:
      raise ValueError(f"{where}: field options is empty for multiple-choice type {qtype}")
    rec["options"] = [str(o) for o in options]
    if not gt:
      raise ValueError(f"{where}: field ground_truth is empty")
  else:
    rec["options"] = None
    try:
      g = float(gt)
    except ValueError:
      raise ValueError(f"{where}: field ground_truth={gt!r} is not a number for numerical type"
                       f" {qtype}") from None
    if g == 0 or not math.isfinite(g):
      # MRA divides by the ground truth; the reference code raises here too.
      raise ValueError(f"{where}: field ground_truth={gt!r} must be finite and non-zero (MRA divides"
                       " by it)")
  return rec


def load_records(data_dir, bad=None, allow_outside=False):
  """Reads and validates the VSI-Bench records under `data_dir` -> list of dicts in file order.

  With `bad` (common.BadItems) a bad record (missing or invalid field, duplicate id, a line that is
  not UTF-8 or JSON, a video path that resolves outside data_dir) is skipped and counted; with
  bad=None it raises ValueError naming the file and record.
  """
  path = find_annotation_file(data_dir)

  def make(row, where):
    rec = validate_record(row, where)
    common.confined_path(data_dir, os.path.join(str(rec["dataset"]), f"{rec['scene_name']}.mp4"),
                         allow_outside=allow_outside)
    return rec

  records = common.read_records([path], make, bad)
  if not records and not bad:
    raise ValueError(f"{path}: no records")
  return records


read_records = load_records


def video_path(data_dir, record):
  """{data_dir}/{dataset}/{scene_name}.mp4, the VSI-Bench layout."""
  return os.path.join(data_dir, record["dataset"], f"{record['scene_name']}.mp4")


media = video_path


# ---------------------------------------------------------------------------------------------------
# Parsing and scoring.
# ---------------------------------------------------------------------------------------------------


extract_answer = common.extract_answer  # tag content, "None" if unclosed, raw text if no tag


def first_word(text):
  """Official VSI-Bench `fuzzy_matching`: first space-separated word, trailing dots removed."""
  return text.split(" ")[0].rstrip(".").strip()


def mca_choice_spacer(answer):
  """SpaceR-Eval's multiple-choice normalisation of an extracted answer.

  "Answer:" is removed; a first word of the form A-D with an optional dot is the letter, otherwise
  the whole stripped text is (docs/spacer_recipe.md, "VSI-Bench").
  """
  p = answer.replace("Answer:", "")
  tok = p.split(" ")[0].strip()
  if _MCA_LETTER.match(tok):
    return tok.rstrip(".")
  return p.strip()


def _to_float(text):
  """float(text) or None; non-finite values count as unparseable (their MRA would be 0 anyway)."""
  try:
    x = float(text)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _mra(pred, gt):
  return 0.0 if pred is None else float(rewards.mra(pred, float(gt)))


def parse_and_score(protocol, question_type, output, ground_truth):
  """Scores one model output -> (answer: str, score: float in [0, 1]).

  `output` is the decoded completion (special tokens skipped); `answer` is what was compared with the
  ground truth (the option letter / text for MCA, the number as text or "None" for NA).
  """
  if protocol == "official":
    word = first_word(output)
    if is_mca(question_type):
      return word, float(word.lower() == ground_truth.lower())
    value = _to_float(word)
    return (word if value is not None else "None"), _mra(value, ground_truth)
  if protocol in ("spacer", "spacer_default"):
    text = common.maybe_extract(output, protocol)
    if is_mca(question_type):
      choice = mca_choice_spacer(text)
      return choice, float(choice.lower() == ground_truth.lower())
    number = rewards.fuzzy_number(text)  # quirk-exact string, "None" when nothing is found
    return number, _mra(_to_float(number), ground_truth)
  raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {PROTOCOLS}")


def build_prompt(record, protocol):
  """(user text, None = the chat template's default system prompt) of one record."""
  style = protocol if protocol in PROTOCOLS else "unknown"
  return prompts.vsibench_prompt(record["question"], record["question_type"], record["options"],
                                 style=style), None


def score(record, output, protocol):
  answer, value = parse_and_score(protocol, record["question_type"], output, record["ground_truth"])
  return {"answer": answer, "score": value}


def item_fields(record):
  return {k: record[k] for k in ("question_type", "dataset", "scene_name", "ground_truth")}


# ---------------------------------------------------------------------------------------------------
# Aggregation and the table.
# ---------------------------------------------------------------------------------------------------


def aggregate(predictions, aggregation="code"):
  """Per-question_type means, per-task scores and the macro overall, all in [0, 1].

  predictions: iterable of dicts with "question_type" and "score".
  Returns {"per_type": {qtype: mean}, "counts": {qtype: n}, "tasks": {task: score}, "overall": float
  or None, "num_scored": n}. Tasks with no scored item are left out of "tasks" and of the overall
  mean (the official code averages the tasks it has); object_rel_direction averages the levels that
  are present. The code and the README tables agree, so `aggregation` changes nothing.
  """
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  sums, counts = collections.defaultdict(float), collections.Counter()
  for p in predictions:
    sums[p["question_type"]] += float(p["score"])
    counts[p["question_type"]] += 1
  per_type = {q: sums[q] / counts[q] for q in QUESTION_TYPES if counts[q]}
  unknown = set(counts) - set(QUESTION_TYPES)
  if unknown:
    raise ValueError(f"predictions hold unknown question_type(s) {sorted(unknown)}")
  tasks = {}
  for task in TASK_NAMES:
    if task == REL_DIRECTION:
      levels = [per_type[q] for q in REL_DIRECTION_LEVELS if q in per_type]
      if levels:
        tasks[task] = sum(levels) / len(levels)
    elif task in per_type:
      tasks[task] = per_type[task]
  overall = sum(tasks.values()) / len(tasks) if tasks else None
  counts = {q: counts[q] for q in QUESTION_TYPES if counts[q]}
  return {"per_type": per_type, "counts": counts, "tasks": tasks, "overall": overall,
          "num_scored": sum(counts.values())}


def table_columns(metrics):
  """[(title, value)]: Avg then the 8 tasks in the paper's order."""
  return [("Avg", metrics["overall"])] + [(title, metrics["tasks"].get(t)) for t, title in TASKS]


def table_notes(metrics):
  del metrics
  return "Avg = mean of the task columns shown; Rel.Dir = mean of its easy/medium/hard levels."


def render_table(metrics, *, name="model", skipped_videos=(), num_skipped=0, num_records=None,
                 protocol=None, bad_records=None):
  """Markdown table in the paper's column order (x100, one decimal), with a footer.

  metrics: the output of aggregate(). skipped_videos: the videos that were missing or unreadable
  (shown in the footer, first five); num_skipped: how many questions they held.
  """
  return common.benchmark_table(sys.modules[__name__], metrics, name=name, num_records=num_records,
                                protocol=protocol, skipped=skipped_videos, num_skipped=num_skipped,
                                bad_records=bad_records)


# ---------------------------------------------------------------------------------------------------
# Resumable predictions file.
# ---------------------------------------------------------------------------------------------------


PredictionsFile = common.PredictionsFile


# ---------------------------------------------------------------------------------------------------
# Training-time metrics: VSI-Bench task accuracy of GRPO rollouts.
# ---------------------------------------------------------------------------------------------------

# VSI-Bench's question templates (which SR-91k and the synthetic data reuse), most specific first.
_TASK_PATTERNS = (
    ("object_rel_direction_hard", re.compile(r"standing by the .* facing the .*front-left", re.S)),
    ("object_rel_direction_medium", re.compile(r"standing by the .* facing the .*left, right,? or"
                                               r" back", re.S)),
    ("object_rel_direction_easy", re.compile(r"standing by the .* facing the .*left or the right",
                                             re.S)),
    ("object_abs_distance", re.compile(r"direct distance between", re.I)),
    ("object_rel_distance", re.compile(r"(closest|farthest|nearest) to the", re.I)),
    ("object_size_estimation", re.compile(r"longest dimension", re.I)),
    ("room_size_estimation", re.compile(r"size of (this|the) room|square meters", re.I)),
    ("obj_appearance_order", re.compile(r"appearance order", re.I)),
    ("route_planning", re.compile(r"\broute\b|\bnavigate\b", re.I)),
    ("object_counting", re.compile(r"^\s*(question:\s*)?how many\b", re.I)),
)


def infer_question_type(question):
  """The VSI-Bench question_type of a question written with VSI-Bench's templates, or None.

  For training metrics only: SpaceR-151k records carry no task name, but SR-91k questions follow
  VSI-Bench's wording ("How many chair(s) are in this room?", "... direct distance between ...").
  """
  for qtype, pattern in _TASK_PATTERNS:
    if pattern.search(question):
      return qtype
  return None


def rollout_task_scores(samples, records_by_id, prefix="rollout_vsi/"):
  """{prefix + task: mean VSI-Bench score} of GRPO rollout samples on VSI-style questions.

  samples: rollout.run's sample dicts ("prompt_id", "completion", "solution"); records_by_id:
  {id: sources.Record}. The task is the record's question_type, else inferred from its problem
  text; each completion is scored as SpaceR-Eval scores VSI-Bench (tag extraction, MCA letter /
  fuzzy-number MRA) against the solution's answer. Samples of other questions are left out.
  """
  sums, counts = collections.defaultdict(float), collections.Counter()
  for s in samples:
    rec = records_by_id.get(str(s.get("prompt_id")))
    if rec is None or "completion" not in s:
      continue
    qtype = getattr(rec, "question_type", None) or infer_question_type(rec.problem)
    if qtype not in QUESTION_TYPES:
      continue
    gt = rewards.find_tag(s["solution"], "answer")
    if gt is None or (not is_mca(qtype) and _to_float(gt) in (None, 0.0)):
      continue
    _, value = parse_and_score("spacer", qtype, s["completion"], gt)
    sums[task_of(qtype)] += value
    counts[task_of(qtype)] += 1
  return {f"{prefix}{t}": sums[t] / counts[t] for t in TASK_NAMES if counts[t]}
