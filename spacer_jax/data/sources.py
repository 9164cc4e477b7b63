"""Dataset records: SpaceR-151k JSONL + cognitive maps, and the VSI-Bench release (host only).

Formats (docs/spacer_recipe.md, "Data" and "VSI-Bench"):
  * SpaceR-151k: one JSON object per line with problem_id, problem, data_type ("video" | "image"),
    problem_type, options (MC only), solution ("<answer>B</answer>"), path (media, relative to a root
    directory) and data_source ("SR_dataset" marks SR-91k items, which get the cognitive-map prompt).
  * annotation/cognitive_map.jsonl: {"video_id", "cognitive_map": {category: [[x, y], ...]},
    "object_list"}, keyed by basename(path) without extension; the prompt's category list is
    list(cognitive_map) in file order (object_list is unused, as in SpaceR).
  * VSI-Bench: parquet, JSON list or JSONL rows with id, dataset, scene_name, question_type, question,
    options, ground_truth; the video is {video_root}/{dataset}/{scene_name}.mp4.

Every loader returns a list of `Record`s with the user prompt text already built (prompts.py), so the
pipeline only decodes media and tokenises. Bad input (a line that is not UTF-8 or not JSON, missing
field, unknown problem_type, MC without options, SR item without a cognitive map, a media path outside
the media root, ...) is skipped with one warning that names the record id (or line number) and file,
and counted in a `BadRecords` counter the trainer logs; with strict=True the same message is raised as
BadRecordError instead.

Media paths stay inside their root: a record whose path is absolute, or resolves (after `..` and
symlinks) outside the media root, is a bad record (`absolute_media_path` / `media_outside_root`), so a
hostile annotation file cannot make training, or a TFDS build, read an arbitrary file.
`allow_media_outside_root=True` (config.data.allow_media_outside_root) turns the check off for
datasets laid out that way on purpose.
"""

import collections
import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator

from spacer_jax.data import prompts

log = logging.getLogger(__name__)

SPACER_REQUIRED = ("problem_id", "problem", "data_type", "problem_type", "solution", "path")
VSI_REQUIRED = ("id", "dataset", "scene_name", "question_type", "question", "ground_truth")
DATA_TYPES = ("video", "image")


class BadRecordError(ValueError):
  """Raised in strict mode for a record that would otherwise be skipped; names the record and file."""


class BadRecords:
  """Counts skipped records by reason and warns once per record (raises instead when strict).

  A record met again on a later pass over the data (the pipeline repeats its source every epoch) is
  recognised by its `key` and neither warned about nor counted again, so the counts are numbers of
  distinct records. `metrics()` gives flat counters for the trainer's metric writer, e.g.
  {"data/bad_records": 3, "data/bad_records/missing_field": 1, ...}; `get_state`/`set_state` carry
  counts and keys through a checkpoint.
  """

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts = collections.Counter()
    self.seen = set()

  def report(self, reason: str, record_id, file, detail: str, key=None) -> None:
    """Warns about and counts one bad record (raises BadRecordError when strict).

    Args:
      reason: the cause, a short snake_case name (the metric suffix).
      record_id: the record's id, or "line N" where it has none.
      file: the file the record came from.
      detail: what is wrong, for the warning.
      key: hashable, JSON-serialisable identity of the record across passes (the pipeline uses its
        index in the source); None for records met only once (loaders).
    """
    if key is not None and key in self.seen:
      return
    msg = f"record {str(record_id)!r} in {file}: {reason}: {detail}"
    if self.strict:
      raise BadRecordError(msg)
    if key is not None:
      self.seen.add(key)
    self.counts[reason] += 1
    log.warning("skipping %s", msg)

  def get_state(self) -> dict:
    return {"counts": dict(self.counts), "seen": sorted(self.seen)}

  def set_state(self, state: dict) -> None:
    self.counts = collections.Counter(state.get("counts", {}))
    self.seen = set(state.get("seen", ()))

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def metrics(self, prefix: str = "data/bad_records") -> dict[str, int]:
    out = {prefix: self.total}
    out.update({f"{prefix}/{k}": v for k, v in sorted(self.counts.items())})
    return out


@dataclasses.dataclass(frozen=True)
class Record:
  """One training or evaluation example, media not yet decoded.

  Attributes:
    id: problem_id (SpaceR) or id (VSI-Bench), as a string.
    source_file: file the record came from (named in every error about it).
    data_type: "video" or "image".
    media: resolved path of the video/image (also the name used in media errors).
    prompt: user text (SpaceR template + suffix, or a VSI-Bench prompt), before the chat template.
    problem: question text as stored.
    problem_type: "multiple choice" | "numerical" | "OCR" | "free-form" | "regression" (VSI-Bench:
      MCA -> "multiple choice", NA -> "numerical").
    options: option strings ("A. sofa", ...); empty if none.
    solution: "<answer>...</answer>" (VSI-Bench ground_truth wrapped the same way, for the rewards).
    process: SpaceR-151k's chain of thought "<think>...</think>" (Video-R1 traces; may be empty);
      unused by SG-RLVR, the completion of SFT with `sft_target="process"` (process + solution).
    data_source: SpaceR data_source ("SR_dataset", ...) or "vsibench".
    cognitive_map: {category: [[x, y], ...]} for SR items with a map, else None.
    categories: category list shown in the prompt (map keys / VSI list), else empty.
    question_type: VSI-Bench task name (None for SpaceR records).
    ground_truth: VSI-Bench raw ground truth (None for SpaceR records).
    media_bytes: encoded media when read from TFDS (decoded from memory), else None.
  """

  id: str
  source_file: str
  data_type: str
  media: str
  prompt: str
  problem: str
  problem_type: str
  options: tuple = ()
  solution: str = ""
  process: str = ""
  data_source: str = ""
  cognitive_map: dict | None = None
  categories: tuple = ()
  question_type: str | None = None
  ground_truth: str | None = None
  media_bytes: bytes | None = None


def video_id(path: str) -> str:
  """The cognitive-map key of a media path: basename without extension."""
  return os.path.splitext(os.path.basename(path))[0]


def jsonl_lines(path) -> Iterator[tuple[int, dict | None, tuple[str, str] | None]]:
  """(line number, object, None) for each JSON-object line of a JSONL file, or (line number, None,
  (cause, detail)) for a line that is not UTF-8 (`not_utf8`), not JSON or not a JSON object
  (`malformed_json`). The one JSONL reader (training data here, the evaluator's benchmarks through
  benchmarks.common.read_rows). Blank lines are skipped; a UTF-8 byte-order mark is allowed."""
  with open(path, "rb") as f:  # Bytes: decoding line by line localises a bad byte to its line.
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
      except UnicodeDecodeError as e:
        yield n, None, ("not_utf8", f"byte {raw[e.start:e.start + 1]!r} at column {e.start + 1} is "
                        f"not UTF-8 ({e.reason})")
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        yield n, None, ("malformed_json", str(e))
        continue
      if not isinstance(obj, dict):
        yield n, None, ("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        continue
      yield n, obj, None


def iter_jsonl(path, bad: BadRecords) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each good line of `jsonl_lines`; a bad line is reported to `bad` as
  record "line N" of `path` and skipped, so one bad line never stops a run."""
  for n, obj, problem in jsonl_lines(path):
    if problem is not None:
      bad.report(problem[0], f"line {n}", path, problem[1])
      continue
    yield n, obj


def load_cognitive_maps(path, strict: bool = False, bad: BadRecords | None = None) -> dict[str, dict]:
  """annotation/cognitive_map.jsonl -> {video_id: {category: [[x, y], ...]}} (key order kept)."""
  bad = bad if bad is not None else BadRecords(strict)
  maps = {}
  for n, obj in iter_jsonl(path, bad):
    vid, cmap = obj.get("video_id"), obj.get("cognitive_map")
    if vid is None or cmap is None:
      field = "video_id" if vid is None else "cognitive_map"
      bad.report("missing_field", vid if vid is not None else f"line {n}", path, f"no {field!r}")
      continue
    if not isinstance(cmap, dict):
      bad.report("bad_field", vid, path, f"cognitive_map must be a dict, got {type(cmap).__name__}")
      continue
    maps[str(vid)] = cmap
  return maps


class MediaPathError(ValueError):
  """A media path that leaves its root; `reason` is the bad-record cause."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def confined_path(root, path: str, *, allow_outside_root: bool = False) -> str:
  """`root/path` as a media file name, refused when it leaves `root`.

  Args:
    root: the media root directory.
    path: a record's media path, relative to `root`.
    allow_outside_root: accept absolute paths and paths that resolve outside `root` (the check off).

  Returns:
    str(root / path) (an absolute `path` as is, when allowed).

  Raises:
    MediaPathError: reason `absolute_media_path` for an absolute path, `media_outside_root` for a
      path that resolves outside the root after `..` and symlinks (a symlink inside the root that
      points elsewhere counts as outside), `bad_field` for a NUL byte.
  """
  if "\x00" in path:
    raise MediaPathError("bad_field", f"media path {path!r} contains a NUL byte")
  p = pathlib.Path(path)
  hint = ("allow_media_outside_root, e.g. --config.data.allow_media_outside_root=True, accepts it if "
          "the dataset is laid out that way")
  if p.is_absolute():
    if allow_outside_root:
      return str(p)
    raise MediaPathError("absolute_media_path", f"media path {path!r} is absolute, not relative "
                         f"to the media root {root} ({hint})")
  full = pathlib.Path(root) / p
  if not allow_outside_root:
    real_root, real = os.path.realpath(root), os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
      raise MediaPathError("media_outside_root", f"media path {path!r} resolves to {real}, "
                           f"outside the media root {real_root} ({hint})")
  return str(full)


def spacer_record(obj: dict, *, source_file, media_root, cognitive_maps, line=None,
                  allow_media_outside_root: bool = False) -> Record:
  """One SpaceR-151k JSON object -> Record. Raises _Bad (reason, id, detail) on bad content."""
  rid = obj.get("problem_id", f"line {line}")
  missing = [k for k in SPACER_REQUIRED if obj.get(k) is None]
  if missing:
    raise _Bad("missing_field", rid, f"missing field(s) {missing}")
  ptype = obj["problem_type"]
  if ptype not in prompts.TYPE_TEMPLATE:
    raise _Bad("unknown_problem_type", rid, f"unknown problem_type {ptype!r}; expected one of {prompts.PROBLEM_TYPES}")
  if obj["data_type"] not in DATA_TYPES:
    raise _Bad("bad_field", rid, f"data_type must be one of {DATA_TYPES}, got {obj['data_type']!r}")
  options = obj.get("options") or ()
  if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
    raise _Bad("bad_field", rid, f"options must be a list of strings, got {options!r}")
  if ptype == "multiple choice" and not options:
    raise _Bad("bad_field", rid, "multiple-choice record without options")
  for k in ("problem", "solution", "path"):
    if not isinstance(obj[k], str):
      raise _Bad("bad_field", rid, f"{k} must be a string, got {type(obj[k]).__name__}")
  try:
    media = confined_path(media_root, obj["path"], allow_outside_root=allow_media_outside_root)
  except MediaPathError as e:
    raise _Bad(e.reason, rid, str(e)) from None
  process = obj.get("process") or ""
  if not isinstance(process, str):
    raise _Bad("bad_field", rid, f"process must be a string, got {type(process).__name__}")
  data_source = obj.get("data_source") or ""
  cmap, categories = None, ()
  if data_source == prompts.SR_DATA_SOURCE:
    vid = video_id(obj["path"])
    cmap = (cognitive_maps or {}).get(vid)
    if cmap is None:
      raise _Bad("missing_cognitive_map", rid, f"SR_dataset record but no cognitive map for video id {vid!r}")
    categories = tuple(cmap)
  prompt = prompts.spacer_prompt(obj["problem"], ptype, options, data_source, categories)
  return Record(
      id=str(rid), source_file=str(source_file), data_type=obj["data_type"],
      media=media, prompt=prompt, problem=obj["problem"],
      problem_type=ptype, options=tuple(options), solution=obj["solution"], process=process,
      data_source=data_source, cognitive_map=cmap, categories=categories,
  )


class _Bad(Exception):
  """Internal: a record-level problem (reason, record id, detail) turned into a report by the caller."""

  def __init__(self, reason, record_id, detail):
    super().__init__(detail)
    self.reason, self.record_id, self.detail = reason, record_id, detail


def load_spacer(
    jsonl_path,
    media_root=None,
    cognitive_map_path=None,
    strict: bool = False,
    bad: BadRecords | None = None,
    allow_media_outside_root: bool = False,
) -> list[Record]:
  """Reads a SpaceR-151k JSONL file.

  Args:
    jsonl_path: the annotation file (e.g. SpaceR-151k.jsonl).
    media_root: directory `path` fields are relative to (default: the JSONL's directory).
    cognitive_map_path: cognitive_map.jsonl (default: {media_root}/annotation/cognitive_map.jsonl if it
      exists; without maps every SR_dataset record is reported as missing_cognitive_map).
    strict: raise BadRecordError on the first bad record instead of skipping it.
    bad: counter to add skipped records to (a fresh one when None).
    allow_media_outside_root: accept absolute media paths and paths resolving outside media_root
      (by default such records are bad records; see `confined_path`).

  Returns:
    Records in file order.
  """
  bad = bad if bad is not None else BadRecords(strict)
  jsonl_path = pathlib.Path(jsonl_path)
  media_root = pathlib.Path(media_root) if media_root is not None else jsonl_path.parent
  if cognitive_map_path is None and (media_root / "annotation" / "cognitive_map.jsonl").exists():
    cognitive_map_path = media_root / "annotation" / "cognitive_map.jsonl"
  maps = load_cognitive_maps(cognitive_map_path, bad=bad) if cognitive_map_path else {}
  records = []
  for n, obj in iter_jsonl(jsonl_path, bad):
    try:
      records.append(spacer_record(obj, source_file=jsonl_path, media_root=media_root,
                                   cognitive_maps=maps, line=n,
                                   allow_media_outside_root=allow_media_outside_root))
    except _Bad as e:
      bad.report(e.reason, e.record_id, jsonl_path, e.detail)
  return records


def without_map_prompt(records: list[Record]) -> list[Record]:
  """The records with SpaceR's QUESTION_TEMPLATE prompt (no cognitive-map instructions): the prompt
  of plain GRPO (`config.data.use_cogmap_prompt = False`). Maps stay on the records."""
  return [dataclasses.replace(r, prompt=prompts.spacer_prompt(r.problem, r.problem_type, r.options,
                                                              "", ()))
          for r in records]


def _vsi_rows(path: pathlib.Path, bad: BadRecords) -> Iterable[tuple[int, dict]]:
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # Only the parquet release needs it.

    for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
      yield n, row
  elif path.suffix == ".jsonl":
    yield from iter_jsonl(path, bad)
  else:
    with open(path, encoding="utf-8") as f:
      try:
        rows = json.load(f)
      except json.JSONDecodeError as e:
        raise BadRecordError(f"{path}: not valid JSON ({e})") from e
    if isinstance(rows, dict):  # {"data": [...]} or column-oriented files are not the release format.
      raise BadRecordError(f"{path}: expected a JSON list of rows, got an object with keys {list(rows)[:5]}")
    for n, row in enumerate(rows, 1):
      if not isinstance(row, dict):
        bad.report("malformed_json", f"row {n}", path, f"expected an object, got {type(row).__name__}")
        continue
      yield n, row


def vsibench_record(row: dict, *, source_file, video_root, style="spacer",
                    allow_media_outside_root: bool = False) -> Record:
  """One VSI-Bench row -> Record. Raises _Bad on bad content."""
  rid = row.get("id", "?")
  missing = [k for k in VSI_REQUIRED if row.get(k) is None]
  if missing:
    raise _Bad("missing_field", rid, f"missing field(s) {missing}")
  qtype = row["question_type"]
  if qtype in prompts.VSI_MCA_TYPES:
    ptype = "multiple choice"
  elif qtype in prompts.VSI_NA_TYPES:
    ptype = "numerical"
  else:
    raise _Bad("unknown_problem_type", rid, f"unknown VSI-Bench question_type {qtype!r}")
  options = tuple(str(o) for o in (row.get("options") if row.get("options") is not None else ()))
  if ptype == "multiple choice" and not options:
    raise _Bad("bad_field", rid, "multiple-choice question without options")
  prompt = prompts.vsibench_prompt(row["question"], qtype, options, style=style)
  try:
    media = confined_path(video_root, f"{row['dataset']}/{row['scene_name']}.mp4",
                          allow_outside_root=allow_media_outside_root)
  except MediaPathError as e:
    raise _Bad(e.reason, rid, f"dataset/scene_name: {e}") from None
  gt = str(row["ground_truth"])
  return Record(
      id=str(rid), source_file=str(source_file), data_type="video", media=media, prompt=prompt,
      problem=row["question"], problem_type=ptype, options=options, solution=f"<answer>{gt}</answer>",
      data_source="vsibench", categories=tuple(prompts.VSI_CATEGORIES) if style == "spacer" else (),
      question_type=qtype, ground_truth=gt,
  )


def load_vsibench(
    path,
    video_root=None,
    style: str = "spacer",
    strict: bool = False,
    bad: BadRecords | None = None,
    allow_media_outside_root: bool = False,
) -> list[Record]:
  """Reads the VSI-Bench release (test-*.parquet, or a JSON list / JSONL of the same rows).

  Args:
    path: the annotation file.
    video_root: directory holding {dataset}/{scene_name}.mp4 (default: the file's directory).
    style: prompt style, "spacer" (SpaceR-Eval) or "official" (lmms-eval), see prompts.vsibench_prompt.
    strict, bad, allow_media_outside_root: as in load_spacer (`dataset`/`scene_name` must not lead
      out of video_root).
  """
  bad = bad if bad is not None else BadRecords(strict)
  path = pathlib.Path(path)
  video_root = pathlib.Path(video_root) if video_root is not None else path.parent
  records = []
  for _, row in _vsi_rows(path, bad):
    try:
      records.append(vsibench_record(row, source_file=path, video_root=video_root, style=style,
                                     allow_media_outside_root=allow_media_outside_root))
    except _Bad as e:
      bad.report(e.reason, e.record_id, path, e.detail)
  return records
