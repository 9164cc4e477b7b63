"""VSI-Bench scoring on the host: records, answer parsing, metrics, tables, resumable predictions.

Everything here is pure Python/NumPy (no model, no JAX), so the evaluator's arithmetic is testable on
its own; `spacer_jax.evaluate` runs the model and calls into this file. Spec: spacer.md section 7.

Two protocols (spec 7.2):
* "official": the VSI-Bench release (thinking-in-space/lmms_eval). Direct-answer prompt, greedy,
  max_new_tokens 16. Both MCA and NA parse the first space-separated word with trailing dots removed:
  `pred.split(' ')[0].rstrip('.').strip()`; MCA = case-insensitive equality with the option letter,
  NA = MRA(float(word), float(gt)), 0 when the word is not a number.
* "spacer": SpaceR-Eval (the numbers SpaceR reports). Think/answer COGMAP prompt; the answer is the
  first `<answer>(.*?)</answer>` (stripped), "None" when `<answer>` opens but never closes, the raw
  output when there is no `<answer>`. MCA: drop "Answer:", take the first space-separated token; if it is
  an uppercase letter A-D with an optional dot use the letter, else the whole stripped text; compare
  case-insensitively. NA: MRA(float(fuzzy_number(answer)), float(gt)), 0 when unparseable.

Aggregation (identical in both, and to the official repo): mean per question_type; the three
object_rel_direction levels are averaged without weights into one task; overall = unweighted mean of
the task scores; reported x100.
"""

import collections
import json
import math
import os
import re

from spacer_jax import rewards
from spacer_jax.data import prompts

PROTOCOLS = ("official", "spacer")

MCA_TYPES = prompts.VSI_MCA_TYPES  # the three object_rel_direction levels come first
NA_TYPES = prompts.VSI_NA_TYPES
QUESTION_TYPES = MCA_TYPES + NA_TYPES
REL_DIRECTION_LEVELS = MCA_TYPES[:3]
REL_DIRECTION = "object_rel_direction"

# The 8 tasks in the column order of the paper's table (spec 7.4), with their column titles.
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
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"VSI-Bench data_dir {data_dir!r} is not a directory")
  names = sorted(os.listdir(data_dir))
  found = [n for n in names if n.endswith((".parquet", ".jsonl", ".json"))]
  if len(found) != 1:
    raise FileNotFoundError(
        f"VSI-Bench data_dir {data_dir!r} must hold exactly one annotation file (*.parquet, *.jsonl or"
        f" *.json, e.g. test-00000-of-00001.parquet) next to the video folders {{dataset}}/"
        f"{{scene_name}}.mp4; found {found or 'none'} among {names[:20]}")
  return os.path.join(data_dir, found[0])


def _read_rows(path):
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to"
                        " JSONL") from e
    return pq.read_table(path).to_pylist()
  with open(path) as f:
    if path.endswith(".jsonl"):
      rows = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      return rows
    rows = json.load(f)
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of VSI-Bench records, got {type(rows).__name__}")
  return rows


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


def load_records(data_dir):
  """Reads and validates the VSI-Bench records under `data_dir` -> list of dicts in file order."""
  path = find_annotation_file(data_dir)
  rows = _read_rows(path)
  if not rows:
    raise ValueError(f"{path}: no records")
  records, seen = [], set()
  for n, row in enumerate(rows):
    rec = validate_record(row, f"{path} record {n}")
    if rec["id"] in seen:
      raise ValueError(f"{path} record {n}: duplicate id {rec['id']!r}")
    seen.add(rec["id"])
    records.append(rec)
  return records


def video_path(data_dir, record):
  """{data_dir}/{dataset}/{scene_name}.mp4, the VSI-Bench layout."""
  return os.path.join(data_dir, record["dataset"], f"{record['scene_name']}.mp4")


# ---------------------------------------------------------------------------------------------------
# Parsing and scoring.
# ---------------------------------------------------------------------------------------------------


def extract_answer(text):
  """SpaceR-Eval answer extraction (spec 7.1): tag content, "None" if unclosed, raw text if no tag."""
  if "<answer>" not in text:
    return text
  m = _ANSWER_TAG.search(text)
  return m.group(1).strip() if m else "None"


def first_word(text):
  """Official VSI-Bench `fuzzy_matching`: first space-separated word, trailing dots removed."""
  return text.split(" ")[0].rstrip(".").strip()


def mca_choice_spacer(answer):
  """SpaceR-Eval's multiple-choice normalisation of an extracted answer (spec 7.2)."""
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
  if protocol == "spacer":
    text = extract_answer(output)
    if is_mca(question_type):
      choice = mca_choice_spacer(text)
      return choice, float(choice.lower() == ground_truth.lower())
    number = rewards.fuzzy_number(text)  # quirk-exact string, "None" when nothing is found
    return number, _mra(_to_float(number), ground_truth)
  raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {PROTOCOLS}")


# ---------------------------------------------------------------------------------------------------
# Aggregation and the table.
# ---------------------------------------------------------------------------------------------------


def aggregate(predictions):
  """Per-question_type means, per-task scores and the macro overall, all in [0, 1].

  predictions: iterable of dicts with "question_type" and "score".
  Returns {"per_type": {qtype: mean}, "counts": {qtype: n}, "tasks": {task: score}, "overall": float
  or None, "num_scored": n}. Tasks with no scored item are left out of "tasks" and of the overall
  mean (the official code averages the tasks it has); object_rel_direction averages the levels that
  are present.
  """
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
  return {"per_type": per_type, "counts": dict(counts), "tasks": tasks, "overall": overall,
          "num_scored": sum(counts.values())}


def _cell(x):
  return "-" if x is None else f"{100.0 * x:.1f}"


def render_table(metrics, *, name="model", skipped_videos=(), num_skipped=0, num_records=None,
                 protocol=None):
  """Markdown table in the paper's column order (x100, one decimal), with a footer.

  metrics: the output of aggregate(). skipped_videos: the videos that were missing or unreadable
  (shown in the footer, first five); num_skipped: how many questions they held.
  """
  titles = ["Avg"] + [title for _, title in TASKS]
  values = [metrics["overall"]] + [metrics["tasks"].get(t) for t in TASK_NAMES]
  lines = [
      "| Model | " + " | ".join(titles) + " |",
      "|---|" + "---|" * len(titles),
      f"| {name} | " + " | ".join(_cell(v) for v in values) + " |",
      "",
  ]
  counts = metrics["counts"]
  scored = ", ".join(f"{q} {counts[q]}" for q in QUESTION_TYPES if q in counts)
  total = f" of {num_records}" if num_records is not None else ""
  proto = f" Protocol: {protocol}." if protocol else ""
  lines.append(f"Scored {metrics['num_scored']}{total} questions ({scored or 'none'}).{proto}"
               " Avg = mean of the task columns shown; Rel.Dir = mean of its easy/medium/hard levels.")
  skipped_videos = list(skipped_videos)
  if skipped_videos or num_skipped:
    shown = ", ".join(skipped_videos[:5]) + (", ..." if len(skipped_videos) > 5 else "")
    lines.append("")
    lines.append(f"Skipped {num_skipped} question(s) on {len(skipped_videos)} missing or unreadable"
                 f" video(s): {shown}")
  else:
    lines.append("")
    lines.append("Missing videos: 0.")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Resumable predictions file.
# ---------------------------------------------------------------------------------------------------


class PredictionsFile:
  """predictions.jsonl, one JSON object per scored question, appended and flushed as it goes.

  Opening an existing file loads its finished items (so a rerun skips them) and cuts off a torn last
  line left by a killed run. Every line records the protocol; resuming with another protocol raises.
  """

  def __init__(self, path, protocol):
    self.path = path
    self.protocol = protocol
    self.done = {}
    if os.path.exists(path):
      self._load()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._f = open(path, "a")

  def _load(self):
    with open(self.path, "rb") as f:
      data = f.read()
    # Only newline-terminated lines are finished; a killed run can leave a torn tail: cut it off.
    complete = data[:data.rfind(b"\n") + 1]
    for n, line in enumerate(complete.split(b"\n")[:-1], 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{self.path}:{n}: not valid JSON; delete the file to start over") from None
      if item.get("protocol") != self.protocol:
        raise ValueError(
            f"{self.path}:{n}: written with protocol {item.get('protocol')!r}, this run uses"
            f" {self.protocol!r}; use another workdir or delete the file")
      self.done[str(item["id"])] = item
    if len(complete) < len(data):
      with open(self.path, "r+b") as f:
        f.truncate(len(complete))

  def __contains__(self, item_id):
    return str(item_id) in self.done

  def add(self, item):
    item = dict(item, protocol=self.protocol)
    item["id"] = str(item["id"])
    self._f.write(json.dumps(item, ensure_ascii=False) + "\n")
    self._f.flush()
    self.done[item["id"]] = item

  def close(self):
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
