"""What every benchmark module shares: bad-input bookkeeping, safe media paths, row reading, SpaceR-Eval's
answer extraction, the resumable predictions file and the Markdown table (host only, no JAX).

A benchmark module (spacer_jax.vsibench, spacer_jax.benchmarks.stibench, ...) has the same parts, which
`spacer_jax.evaluate.run` calls in this order:

  NAME, PROTOCOLS (the first is the default), DEFAULT_MAX_NEW_TOKENS {protocol: n}, MEDIA ("video" or
  "images"), LAYOUT (the expected data_dir layout, shown when nothing is found).
  read_records(data_dir, bad=None, allow_outside=False) -> [record dict] with record["id"] (str,
      unique). With `bad` (a BadItems) a bad record is skipped, named and counted; with bad=None it
      raises ValueError naming the file and record. Media paths are checked here (confined_path).
  media(data_dir, record) -> a video path (MEDIA "video") or a list of images, each encoded bytes
      or a path (MEDIA "images").
  build_prompt(record, protocol) -> (user text, system prompt or None for the chat template's default)
  score(record, output, protocol) -> {"answer": str, "score": float, ...} for one decoded completion
  item_fields(record) -> the record fields kept in predictions.jsonl (what `aggregate` reads)
  aggregate(predictions, aggregation="code") -> {"overall", "tasks", "counts", "num_scored", ...} in
      [0, 1]; aggregation="readme" gives the version printed in the benchmark's README tables where
      the original code differs from it.
  table_columns(metrics) -> [(column title, value in [0, 1] or None)] in the paper's order.

Protocols: "spacer" is SpaceR-Eval's "thinking" mode (think/answer prompt, `<answer>` extraction, 1024
new tokens), "spacer_default" its "default" mode (direct-answer prompt, raw output, 128 new tokens);
VSI-Bench also has "official". See docs/spacer_recipe.md, "Other benchmarks".
"""

import collections
import json
import logging
import math
import os

from spacer_jax import rewards
from spacer_jax.data import prompts

log = logging.getLogger(__name__)

PROTOCOLS = ("spacer", "spacer_default")
DEFAULT_MAX_NEW_TOKENS = {"spacer": 1024, "spacer_default": 128}
AGGREGATIONS = ("code", "readme")


# ---------------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------------


class BadItems:
  """Records dropped while reading a benchmark: each named once (file and line or record number) with
  its cause, counted by cause, and warned about once."""

  def __init__(self):
    self.records = {}  # where -> "cause: detail"
    self.by_cause = collections.Counter()

  def add(self, where, cause, detail):
    if where in self.records:
      return
    self.records[where] = f"{cause}: {detail}"
    self.by_cause[cause] += 1
    log.warning("skipping %s: %s: %s", where, cause, detail)

  def __len__(self):
    return len(self.records)


class OutsideDataDir(ValueError):
  """A media path from a record that resolves outside the benchmark's data_dir."""


def confined_path(data_dir, relative, *, allow_outside=False):
  """os.path.join(data_dir, relative), refused when it resolves outside data_dir.

  The check follows symlinks and `..` and catches absolute paths (which os.path.join would take as
  they are), so a record cannot make the evaluator read /etc/passwd or another user's files.
  allow_outside=True turns the check off (for layouts that link videos from elsewhere).
  """
  path = os.path.join(data_dir, relative)
  if allow_outside:
    return path
  root = os.path.realpath(data_dir)
  real = os.path.realpath(path)
  if os.path.commonpath([root, real]) != root:
    raise OutsideDataDir(f"media path {relative!r} resolves to {real}, outside data_dir {root}")
  return path


def check_text(row, where, fields):
  """Raises ValueError unless every field is present (not None) in the row; returns the row."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: a record must be an object, got {type(row).__name__}")
  missing = [k for k in fields if row.get(k) is None]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  return row


# ---------------------------------------------------------------------------------------------------
# Rows.
# ---------------------------------------------------------------------------------------------------


def find_files(data_dir, suffixes, what, *, single=True, example=""):
  """The annotation file(s) of a benchmark directory: top-level files ending in one of `suffixes`."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"{what} data_dir {data_dir!r} is not a directory")
  names = sorted(os.listdir(data_dir))
  found = [n for n in names if n.endswith(tuple(suffixes)) and os.path.isfile(
      os.path.join(data_dir, n))]
  if not found or (single and len(found) != 1):
    want = "exactly one annotation file" if single else "annotation files"
    raise FileNotFoundError(
        f"{what} data_dir {data_dir!r} must hold {want} ({', '.join('*' + s for s in suffixes)}"
        f"{', e.g. ' + example if example else ''}); found {found or 'none'} among {names[:20]}")
  return [os.path.join(data_dir, n) for n in found]


def read_rows(path, bad=None):
  """[(where, row)] of one annotation file: *.parquet, *.jsonl (one object a line) or *.json (a list).

  A JSONL line that is not UTF-8 or not JSON is a bad record named by file and line: skipped and
  counted in `bad`, or a ValueError when bad is None. `where` is "file:line" for JSONL and
  "file record n" (0-based) for the other formats.
  """
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to"
                        " JSONL") from e
    return [(f"{path} record {n}", row) for n, row in enumerate(pq.read_table(path).to_pylist())]
  if path.endswith(".jsonl"):
    from spacer_jax.data import sources  # pylint: disable=g-import-not-at-top
    rows = []
    for n, row, problem in sources.jsonl_lines(path):
      where = f"{path}:{n}"
      if problem is None:
        rows.append((where, row))
      elif bad is None:
        raise ValueError(f"{where}: {problem[0]} ({problem[1]})")
      else:
        bad.add(where, *problem)
    return rows
  try:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a UTF-8 JSON file ({e}); a JSONL file (one record a line) lets"
                     " the evaluator skip bad lines instead") from e
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
  return [(f"{path} record {n}", row) for n, row in enumerate(rows)]


def read_records(paths, make_record, bad=None, id_key="id"):
  """Reads rows from `paths`, validates each with make_record(row, where) -> record dict; a ValueError
  from it is a bad record (skipped and counted in `bad`, raised when bad is None), as is a repeated
  id. Returns the records in file order."""
  records, seen = [], set()
  for path in paths:
    for where, row in read_rows(path, bad):
      try:
        rec = make_record(row, where)
        if rec["id"] in seen:
          raise ValueError(f"{where}: duplicate {id_key} {rec['id']!r}")
      except ValueError as e:
        if bad is None:
          raise
        bad.add(where, "outside_data_dir" if isinstance(e, OutsideDataDir) else "bad_record",
                str(e))
        continue
      seen.add(rec["id"])
      records.append(rec)
  return records


# ---------------------------------------------------------------------------------------------------
# Parsing helpers.
# ---------------------------------------------------------------------------------------------------


def extract_answer(text):
  """SpaceR-Eval's thinking-mode extraction: when "<answer>" occurs, the first
  `<answer>(.*?)</answer>` (DOTALL) stripped, or "None" without a closing tag; else the text as is.

  Linear time (the training rewards' tag search): the regex backtracks quadratically on many
  unclosed tags.
  """
  if "<answer>" not in text:
    return text
  content = rewards.find_tag(text, "answer")
  return "None" if content is None else content


def multiple_choice_prompt(question, protocol, name, sep=""):
  """SpaceR-Eval's multiple-choice prompt -> (text, None): the thinking template and the
  multiple-choice instruction ("spacer"), or the non-thinking pre-prompt and its post-prompt
  ("spacer_default"). `sep` is what the benchmark's original script puts between the question and the
  instruction ("\n" for STI-Bench and Video-MME, nothing for LongVideoBench)."""
  if protocol == "spacer":
    return (prompts.QUESTION_TEMPLATE.format(Question=question) + sep
            + prompts.TYPE_TEMPLATE["multiple choice"].lstrip()), None
  if protocol == "spacer_default":
    return (prompts.EVAL_DEFAULT_PRE_PROMPT.format(Question=question) + sep
            + prompts.EVAL_DEFAULT_MCA_POST_PROMPT), None
  raise ValueError(f"{name}: unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def maybe_extract(text, protocol):
  """The text SpaceR-Eval scores: tag extraction under the thinking protocol, the raw output else."""
  return extract_answer(text) if protocol == "spacer" else text


def first_option_letter(text, prefixes, letters):
  """The option-letter extraction of SpaceR-Eval's Video-MME / LongVideoBench code: strip the text,
  delete every occurrence of each answer prefix (in order), then the first character that is one of
  `letters`, "" if none (the reference's extra "more than 10 words and no letter -> ''" rule gives
  the same). It is the first such capital anywhere: "Based on the video, A" gives "B"."""
  s = text.strip()
  for prefix in prefixes:
    s = s.replace(prefix, "")
  for ch in s:
    if ch in letters:
      return ch
  return ""


def to_float(text):
  """float(text) or None (SpaceR-Eval's `to_float`, which catches everything)."""
  try:
    return float(text)
  except (TypeError, ValueError, OverflowError):
    return None


def mean(values):
  """Arithmetic mean, None for no values (where the original code would produce NaN)."""
  values = list(values)
  return math.fsum(values) / len(values) if values else None


def group_means(predictions, key, value="score"):
  """({group: mean of `value`}, {group: count}) in first-seen order."""
  sums, counts = {}, collections.Counter()
  for p in predictions:
    g = p[key]
    sums.setdefault(g, []).append(float(p[value]))
    counts[g] += 1
  return {g: mean(v) for g, v in sums.items()}, dict(counts)


# ---------------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------------


def cell(x):
  return "-" if x is None else f"{100.0 * x:.1f}"


def render_table(columns, *, name="model", scored_line="", notes="", skipped=(), num_skipped=0,
                 media_noun="video(s)", bad_records=None):
  """Markdown: header, one row (x100, one decimal), then a footer with what was scored and skipped.

  columns: [(title, value in [0, 1] or None)]; skipped: ["name (reason)"] of media or questions that
  were skipped at run time (first five shown); bad_records: {where: reason} dropped while reading.
  """
  titles = [t for t, _ in columns]
  lines = [
      "| Model | " + " | ".join(titles) + " |",
      "|---|" + "---|" * len(titles),
      f"| {name} | " + " | ".join(cell(v) for _, v in columns) + " |",
      "",
      scored_line + (" " + notes if notes else ""),
  ]
  skipped = list(skipped)
  lines.append("")
  if skipped or num_skipped:
    shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    lines.append(f"Skipped {num_skipped} question(s) on {len(skipped)} missing or unreadable"
                 f" {media_noun}: {shown}")
  else:
    lines.append(f"Missing {media_noun.replace('(s)', 's')}: 0.")
  if bad_records:
    shown = ", ".join(f"{w} ({r.split(':')[0]})" for w, r in list(bad_records.items())[:5])
    lines.append(f"Bad records skipped: {len(bad_records)}: {shown}"
                 + (", ..." if len(bad_records) > 5 else ""))
  return "\n".join(lines) + "\n"


def benchmark_table(bench, metrics, *, name="model", num_records=None, protocol=None, skipped=(),
                    num_skipped=0, bad_records=None):
  """The table.md of a benchmark module's aggregate: its columns, then what was scored (per task
  counts, protocol, the module's notes) and skipped."""
  counts = metrics["counts"]
  scored = ", ".join(f"{k} {v}" for k, v in counts.items())
  total = f" of {num_records}" if num_records is not None else ""
  proto = f" Protocol: {protocol}." if protocol else ""
  return render_table(
      bench.table_columns(metrics), name=name,
      scored_line=f"Scored {metrics['num_scored']}{total} questions ({scored or 'none'}).{proto}",
      notes=bench.table_notes(metrics), skipped=skipped, num_skipped=num_skipped,
      media_noun="video(s)" if bench.MEDIA == "video" else "image(s)", bad_records=bad_records)


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
    self._f = open(path, "a", encoding="utf-8")

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
      except (json.JSONDecodeError, UnicodeDecodeError):
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
