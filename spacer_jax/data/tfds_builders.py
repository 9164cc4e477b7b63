"""TFDS builders for SpaceR-151k and VSI-Bench (array_record, raw media bytes; no TensorFlow needed).

Each example holds the record's fields (sources.Record, prompt text included) and the *encoded* media
file as a bytes feature; decoding (PyAV / PIL) happens at read time in the grain workers through
spacer_jax.data.video, so the dataset is as small as the original mp4s and the preprocessing
settings stay free to change after preparation.

tensorflow-datasets 4.9.10 works without TensorFlow for this path: GeneratorBasedBuilder with
file_format="array_record" generates and shuffles locally (no Beam), and `tfds.data_source` reads the
array_record shards with random access for grain. Only tf.data reading (`as_dataset`) needs TF, and we
never call it.

Preparation (data in a manual directory, output in a TFDS data_dir):

  # SpaceR-151k: {manual_dir}/SpaceR-151k.jsonl, {manual_dir}/annotation/cognitive_map.jsonl and the
  # media at {manual_dir}/{path}
  python -m spacer_jax.data.tfds_builders --dataset=spacer151k \
      --manual_dir=/data/SpaceR-151k --data_dir=/data/tfds
  # VSI-Bench: {manual_dir}/test-*.parquet (or *.json / *.jsonl), videos at {manual_dir}/{dataset}/{scene_name}.mp4
  python -m spacer_jax.data.tfds_builders --dataset=vsibench --manual_dir=/data/VSI-Bench --data_dir=/data/tfds

Only media inside the manual directory are stored: a record whose media path is absolute or resolves
outside it (`..`, symlinks; VSI-Bench's `dataset`/`scene_name` likewise) is skipped and counted as a
bad record (sources.confined_path), unless `--allow_media_outside_root` is given.

Reading: `data_source("spacer151k", data_dir)` -> an ArrayRecordDataSource; `record_from_example` turns
an example back into a sources.Record (with media_bytes set) for the pipeline.
"""

import json
import pathlib

from etils import epath
import numpy as np

try:
  import tensorflow_datasets as tfds
except ImportError as e:  # an optional part: pip install 'spacer_jax[tfds]'
  raise ImportError("spacer_jax.data.tfds_builders (TFDS datasets) needs tensorflow-datasets and "
                    "array_record: pip install 'spacer_jax[tfds]'") from e

from spacer_jax.data import sources


def _features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(),
      "source_file": text(),
      "data_type": text(),
      "media": text(),  # original path, kept as the name in media errors
      "media_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded mp4 / image file
      "prompt": text(),
      "problem": text(),
      "problem_type": text(),
      "options": tfds.features.Sequence(text()),
      "solution": text(),
      "process": text(),  # SpaceR-151k chain of thought, "" when absent (added in 1.1.0)
      "data_source": text(),
      "cognitive_map": text(),  # JSON, "" when the record has none
      "categories": tfds.features.Sequence(text()),
      "question_type": text(),  # "" for SpaceR records
      "ground_truth": text(),  # "" for SpaceR records
  })


def example_from_record(rec: sources.Record, media_bytes: bytes) -> dict:
  """A sources.Record + its encoded media -> a TFDS example dict."""
  return {
      "id": rec.id, "source_file": rec.source_file, "data_type": rec.data_type, "media": rec.media,
      "media_bytes": media_bytes, "prompt": rec.prompt, "problem": rec.problem,
      "problem_type": rec.problem_type, "options": list(rec.options), "solution": rec.solution,
      "process": rec.process, "data_source": rec.data_source,
      "cognitive_map": json.dumps(rec.cognitive_map) if rec.cognitive_map is not None else "",
      "categories": list(rec.categories), "question_type": rec.question_type or "",
      "ground_truth": rec.ground_truth or "",
  }


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def record_from_example(ex: dict) -> sources.Record:
  """An example read through tfds.data_source (Text as bytes) -> sources.Record with media_bytes."""
  cmap = _str(ex["cognitive_map"])
  return sources.Record(
      id=_str(ex["id"]), source_file=_str(ex["source_file"]), data_type=_str(ex["data_type"]),
      media=_str(ex["media"]), prompt=_str(ex["prompt"]), problem=_str(ex["problem"]),
      problem_type=_str(ex["problem_type"]), options=tuple(_str(o) for o in ex["options"]),
      solution=_str(ex["solution"]), data_source=_str(ex["data_source"]),
      process=_str(ex["process"]) if "process" in ex else "",  # 1.0.0 datasets lack it
      cognitive_map=json.loads(cmap) if cmap else None,
      categories=tuple(_str(c) for c in ex["categories"]),
      question_type=_str(ex["question_type"]) or None, ground_truth=_str(ex["ground_truth"]) or None,
      media_bytes=bytes(ex["media_bytes"]),
  )


class _MediaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generation: records from a loader, media read as bytes; bad records skipped and counted."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Records + raw media bytes (array_record).",
                   "1.1.0": "SpaceR-151k's `process` (chain of thought) kept."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS derives this through importlib_resources (a backport package we do not install) for
    # builders defined in a package; the answer is simply this file.
    return epath.Path(__file__)

  def __init__(self, *, strict: bool = False, allow_media_outside_root: bool = False, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.bad = sources.BadRecords(strict)
    self.allow_media_outside_root = allow_media_outside_root

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features())

  def _load_records(self, manual_dir: pathlib.Path) -> list[sources.Record]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    return {self.SPLIT: self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir):
    for i, rec in enumerate(self._load_records(manual_dir)):
      try:
        media_bytes = pathlib.Path(rec.media).read_bytes()
      except OSError as e:
        self.bad.report("missing_media", rec.id, rec.source_file, f"cannot read {rec.media}: {e}")
        continue
      if not media_bytes:
        self.bad.report("missing_media", rec.id, rec.source_file, f"{rec.media} is empty")
        continue
      # Keys must be unique and the id alone may repeat across SpaceR's merged sources: prefix the
      # record's position (deterministic, so the shuffled shard order is reproducible).
      yield f"{i:09d}|{rec.id}", example_from_record(rec, media_bytes)


class Spacer151k(_MediaBuilder):
  """SpaceR-151k (SR-91k + Video-R1 subset): JSONL records + cognitive maps + media bytes."""

  name = "spacer151k"
  SPLIT = "train"
  ANNOTATION_FILE = "SpaceR-151k.jsonl"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put SpaceR-151k.jsonl, annotation/cognitive_map.jsonl and the media (paths as in the JSONL's "
      "`path` field, relative to this directory) in the manual directory."
  )

  def _load_records(self, manual_dir):
    return sources.load_spacer(manual_dir / self.ANNOTATION_FILE, media_root=manual_dir, bad=self.bad,
                               allow_media_outside_root=self.allow_media_outside_root)


class Vsibench(_MediaBuilder):
  """VSI-Bench (official release rows, SpaceR-Eval prompt) + video bytes."""

  name = "vsibench"
  SPLIT = "test"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the VSI-Bench annotation (test-*.parquet, or a .json/.jsonl with the same rows) and the "
      "videos as {dataset}/{scene_name}.mp4 in the manual directory."
  )

  def _load_records(self, manual_dir):
    files = sorted(manual_dir.glob("test*.parquet")) or sorted(manual_dir.glob("*.parquet"))
    files = files or sorted(manual_dir.glob("*.jsonl")) or sorted(manual_dir.glob("*.json"))
    if not files:
      raise FileNotFoundError(f"no VSI-Bench annotation (*.parquet/*.jsonl/*.json) in {manual_dir}")
    records = []
    for f in files:
      records += sources.load_vsibench(f, video_root=manual_dir, bad=self.bad,
                                       allow_media_outside_root=self.allow_media_outside_root)
    return records


BUILDERS = {"spacer151k": Spacer151k, "vsibench": Vsibench}


def prepare(dataset: str, manual_dir, data_dir, strict: bool = False,
            allow_media_outside_root: bool = False) -> sources.BadRecords:
  """Builds the array_record dataset; returns the counter of skipped records.

  Args:
    dataset: "spacer151k" or "vsibench".
    manual_dir: directory with the annotation files and media (see the builders' instructions).
    data_dir: TFDS data_dir the shards are written to ({data_dir}/{dataset}/1.0.0/).
    strict: raise on the first bad record instead of skipping it.
    allow_media_outside_root: also store media whose path is absolute or leads out of manual_dir.
  """
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(BUILDERS)}")
  builder = BUILDERS[dataset](data_dir=str(data_dir), strict=strict,
                              allow_media_outside_root=allow_media_outside_root)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder.bad


def data_source(dataset: str, data_dir, split: str | None = None):
  """Random-access source over a prepared dataset (tfds.data_source on the array_record shards)."""
  split = split or BUILDERS[dataset].SPLIT
  return tfds.data_source(dataset, data_dir=str(data_dir), split=split)


def define_flags(fv=None):
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if fv is None else fv
  flags.DEFINE_enum("dataset", None, list(BUILDERS), "Which dataset to prepare.", flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "Directory with the annotation files and media.",
                      flag_values=fv)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to.", flag_values=fv)
  flags.DEFINE_bool("strict", False, "Fail on the first bad record instead of skipping it.",
                    flag_values=fv)
  flags.DEFINE_bool("allow_media_outside_root", False,
                    "Also store media whose path is absolute or resolves outside --manual_dir.",
                    flag_values=fv)
  flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"], flag_values=fv)


def main(argv, fv=None):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if fv is None else fv
  bad = prepare(fv.dataset, fv.manual_dir, fv.data_dir, strict=fv.strict,
                allow_media_outside_root=fv.allow_media_outside_root)
  print(json.dumps(bad.metrics()))


if __name__ == "__main__":
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, define_flags, __doc__)
