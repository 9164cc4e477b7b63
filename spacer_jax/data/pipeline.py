"""The grain input pipeline: records -> decoded, tokenised, statically shaped batches (host side).

Graph (one process of a multi-host run):

  MapDataset.source(records)          sources.Record list, or a TFDS data source + record_from_example
    .map_with_index(_WithKey)         (source index, record): the record's identity for bad-record
                                      counting across epochs and processes
    .shuffle(seed).repeat(num_epochs) seeded global shuffle (the same on every process), reshuffled
                                      each epoch
    .map_with_index(Preprocess)       decode + sample + resize + patchify + tokenise (lazy: only the
                                      elements this process reads), in grain worker processes; a bad
                                      record becomes a marker, never an exception
    _ProcessBlocks                    this process's block of every global batch: with N processes
                                      and b = batch_size rows each, global batch k is elements
                                      [k*N*b, (k+1)*N*b) of the stream and process i reads
                                      [k*N*b + i*b, k*N*b + (i+1)*b), so N processes together see
                                      the batches one process would, row for row
    [start:]                          where a resumed run with another process count starts
    .to_iter_dataset().mp_prefetch()  N worker processes, elements interleaved in index order
  _BatchIterDataset                   main process: count bad markers (one warning per distinct
                                      record, whatever the epoch or worker; with several processes,
                                      per process: a record met again in a later epoch on another
                                      process is counted there too; strict mode raises),
                                      collect batch_size good elements, left-pad tokens to a length
                                      bucket and vision rows to static patch budgets
  ThreadPrefetchIterDataset           a few batches ahead

Batching runs after mp_prefetch (grain's advice for many-to-one steps): worker k processes elements
k, k+N, ... and mp_prefetch returns them in index order, so 0 and N workers give identical batches,
and the iterator state (grain's get_state/set_state: the mp_prefetch state; the batcher buffers
nothing between batches) restores to the exact next batch. `make_iterator` wraps it in a
`ProcessIterator`, whose state also records the process layout, so a checkpoint written by N
processes resumes with M (see `ProcessIterator.set_process_states`). A bad record is replaced by the
next element of the same process's stream, so with bad records N processes and one process no
longer read exactly the same batches (each still reads every element at most once). The sampler
turns the processes' batches into global device arrays (sampling.Sampler.prepare).

Batch (numpy; B = per-process batch size, L = length bucket, Pv/Pi = per-row video/image patch
budgets, nv/ni = videos/images in the batch, in row order):
  input_ids int32[B, L], attention_mask int32[B, L]    left padded, vision spans expanded
  pixel_values_videos float32[B*Pv, 1176]              videos' patch rows concatenated in row
                                                       order, then zero rows up to B*Pv
  pixel_values_videos_shuffled float32[B*Pv, 1176]     (temporal=True) the same clips re-processed
                                                       with their frames in a seeded random order
  video_grid_thw int64[nv, 3], second_per_grid_ts float32[nv]
  pixel_values float32[B*Pi, 1176], image_grid_thw int64[ni, 3]
  valid bool[B]                                        False on padding rows of a final partial batch
  host metadata lists (len B): id, problem_type, solution, process, cognitive_map, categories,
  data_source, question_type, ground_truth, data_type, media
  bad_records dict: distinct records skipped so far, by reason (sources.BadRecords.metrics format;
                    a record that fails again in a later epoch is not counted again)
Grids stay host arrays with only the real rows: they feed host index code (positions.get_rope_index,
qwen2_5_vl.prepare_vision_inputs with the patch budgets as pad-to sizes), never a jitted function.
"""

import dataclasses
import logging
import math
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from spacer_jax.data import prompts
from spacer_jax.data import sources
from spacer_jax.data import video

log = logging.getLogger(__name__)

PATCH_DIM = video.PATCH_DIM  # 3 * 2 * 14 * 14 = 1176
META_KEYS = ("id", "problem_type", "solution", "process", "cognitive_map", "categories",
             "data_source", "question_type", "ground_truth", "data_type", "media")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Pipeline settings; defaults are SpaceR's (docs/spacer_recipe.md, "Video preprocessing") unless
  noted.

  Attributes:
    batch_size: examples per batch *per process*.
    buckets: allowed prompt lengths (left padding); a longer prompt is skipped as prompt_too_long.
    system_prompt: chat system message (the Qwen template default).
    fps, min_frames, max_frames, frame_factor: frame sampling (video.read_video).
    video_min_pixels, video_max_pixels, video_total_pixels: per-frame budget (video.preprocess_video).
    image_min_pixels, image_max_pixels: image budget.
    second_per_grid_t: fixed seconds per temporal patch (SpaceR's effective 1.0); None = real fps.
    video_patch_budget, image_patch_budget: pixel rows reserved per batch row (static shapes);
      None derives the largest a clip can need from the settings above.
    temporal: also emit pixel_values_videos_shuffled (T-GRPO temporal contrast, docs/spacer_recipe.md,
      "Rewards").
    num_workers: grain worker processes for decode/preprocess (0 = in the main process).
    worker_buffer_size: elements each worker process prefetches.
    read_threads, read_buffer_size: grain ReadOptions of the map stage (in the main process with 0
      workers, else in each worker). grain's defaults (16 threads, 500 elements) would hold ~10 GB of
      SpaceR-sized pixel arrays per process, so they are kept small; decode and resize release the
      GIL, so read_threads > 1 is a cheap alternative to worker processes.
    prefetch_batches: batches prefetched by a thread after batching (0 = none).
    shuffle, num_epochs: seeded shuffle; None epochs = repeat forever (training).
    drop_remainder: drop a final partial batch (else it is padded and `valid` marks real rows).
    strict: raise on the first bad record instead of skipping and counting it.
    seek: video.read_video seek mode.
  """

  batch_size: int = 1
  buckets: tuple = prompts.DEFAULT_BUCKETS
  system_prompt: str | None = prompts.DEFAULT_SYSTEM_PROMPT
  fps: float = video.FPS
  min_frames: int = video.FPS_MIN_FRAMES
  max_frames: int = video.FPS_MAX_FRAMES
  frame_factor: int = video.FRAME_FACTOR
  video_min_pixels: int = video.VIDEO_MIN_PIXELS
  video_max_pixels: int = video.VIDEO_MAX_PIXELS
  video_total_pixels: float = video.VIDEO_TOTAL_PIXELS
  image_min_pixels: int = video.MIN_PIXELS
  image_max_pixels: int = video.MAX_PIXELS
  second_per_grid_t: float | None = video.SPACER_SECOND_PER_GRID_T
  video_patch_budget: int | None = None
  image_patch_budget: int | None = None
  temporal: bool = False
  num_workers: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  read_buffer_size: int = 2
  prefetch_batches: int = 2
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  strict: bool = False
  seek: str = "auto"


def _round_down(x: int, m: int) -> int:
  return x // m * m


def patch_budgets(cfg: DataConfig) -> tuple[int, int]:
  """(video, image) pixel rows per batch row: the most one clip/image can produce under cfg.

  smart_resize keeps h*w <= its max_pixels argument; for videos that argument is
  video.video_max_pixels(n), largest at the fewest frames, and a clip has at most max_frames frames
  (grid_t = max_frames / 2 temporal patches).
  """
  patch_area = video.PATCH_SIZE ** 2
  merge2 = video.MERGE_SIZE ** 2
  if cfg.video_patch_budget is not None:
    v = cfg.video_patch_budget
  else:
    cap = max(video.video_max_pixels(n, cfg.video_min_pixels, cfg.video_max_pixels, cfg.video_total_pixels)
              for n in range(max(cfg.frame_factor, cfg.min_frames), cfg.max_frames + 1))
    v = _round_down(math.ceil(cfg.max_frames / video.TEMPORAL_PATCH_SIZE) * (int(cap) // patch_area), merge2)
  i = cfg.image_patch_budget if cfg.image_patch_budget is not None else _round_down(
      cfg.image_max_pixels // patch_area, merge2)
  return int(v), int(i)


class _WithKey:
  """(index in the source, record): the key that identifies a record in every epoch.

  grain hands a map below shuffle/repeat the element's index in the repeated stream (epoch * n +
  position), so the position in the source is that index modulo the source length.
  """

  def __init__(self, num_records: int):
    self.num_records = num_records

  def __call__(self, index: int, rec):
    return index % self.num_records, rec


class Preprocess:
  """(key, Record) -> model-ready element (runs in grain workers; picklable).

  Input: (the record's index in the source, sources.Record with a media path or media_bytes).
  Output dict: input_ids int32[T] (vision span expanded), pixels float32[P, 1176], grid_thw
  int64[3], second_per_grid_t float (videos), pixels_shuffled float32[P, 1176] (videos,
  temporal=True), plus the record's metadata fields. A bad record gives
  {"bad": (reason, id, file, detail), "key": key} instead.
  """

  def __init__(self, tokenizer, cfg: DataConfig, seed: int):
    self.tokenizer, self.cfg, self.seed = tokenizer, cfg, seed
    self.video_budget, self.image_budget = patch_budgets(cfg)

  def __call__(self, index: int, item: tuple) -> dict:
    key, rec = item
    try:
      return self._process(index, rec)
    except video.MediaError as e:
      return {"bad": ("media", rec.id, rec.source_file, str(e)), "key": key}
    except prompts.PromptTooLongError as e:
      return {"bad": ("prompt_too_long", rec.id, rec.source_file, str(e)), "key": key}
    except _OverBudget as e:
      return {"bad": ("over_budget", rec.id, rec.source_file, str(e)), "key": key}

  def _process(self, index, rec):
    cfg = self.cfg
    src = rec.media_bytes if rec.media_bytes is not None else rec.media
    out = {k: getattr(rec, k) for k in META_KEYS}
    if rec.data_type == "video":
      clip = video.read_video(src, name=rec.media, fps=cfg.fps, min_frames=cfg.min_frames,
                              max_frames=cfg.max_frames, frame_factor=cfg.frame_factor, seek=cfg.seek)
      kw = dict(sample_fps=clip.sample_fps, name=rec.media, min_pixels=cfg.video_min_pixels,
                max_pixels=cfg.video_max_pixels, total_pixels=cfg.video_total_pixels,
                second_per_grid_t=cfg.second_per_grid_t)
      vis = video.preprocess_video(clip.frames, **kw)
      budget = self.video_budget
      if cfg.temporal:
        # Seeded by (pipeline seed, element index): the same permutation whatever the worker count.
        rng = np.random.default_rng([self.seed, index])
        shuffled, _ = video.shuffle_frames(clip.frames, rng)
        out["pixels_shuffled"] = video.preprocess_video(shuffled, **kw).pixel_values
      ids = prompts.encode_prompt(self.tokenizer, rec.prompt, "video", video_grid_thw=[vis.grid_thw],
                                  system_prompt=cfg.system_prompt, max_length=max(cfg.buckets),
                                  record_id=rec.id)
    elif rec.data_type == "image":
      vis = video.preprocess_image(src, name=rec.media, min_pixels=cfg.image_min_pixels,
                                   max_pixels=cfg.image_max_pixels)
      budget = self.image_budget
      ids = prompts.encode_prompt(self.tokenizer, rec.prompt, "image", image_grid_thw=[vis.grid_thw],
                                  system_prompt=cfg.system_prompt, max_length=max(cfg.buckets),
                                  record_id=rec.id)
    else:
      raise ValueError(f"record {rec.id!r} in {rec.source_file}: data_type {rec.data_type!r}")
    if vis.pixel_values.shape[0] > budget:
      raise _OverBudget(f"{rec.media}: {vis.pixel_values.shape[0]} patch rows > budget {budget} "
                        f"(grid_thw {vis.grid_thw.tolist()})")
    out.update(input_ids=ids, pixels=vis.pixel_values.astype(np.float32, copy=False),
               grid_thw=np.asarray(vis.grid_thw, np.int64), second_per_grid_t=vis.second_per_grid_t)
    return out


class _OverBudget(Exception):
  """A clip/image needs more pixel rows than its static budget."""


def collate(elements: Sequence[dict], cfg: DataConfig, pad_token_id: int, batch_size: int | None = None,
            budgets: tuple[int, int] | None = None) -> dict:
  """Good elements (Preprocess outputs) -> one statically shaped batch (see the module docstring).

  Fewer than batch_size elements (final partial batch) get padding rows with valid=False.
  """
  b = batch_size or cfg.batch_size
  pv, pi = budgets or patch_budgets(cfg)
  n = len(elements)
  ids, mask = prompts.left_pad([e["input_ids"] for e in elements] + [[]] * (b - n), pad_token_id,
                               buckets=cfg.buckets, record_ids=[e["id"] for e in elements] + [None] * (b - n))
  batch = {"input_ids": ids, "attention_mask": mask, "valid": np.arange(b) < n}
  vids = [e for e in elements if e["data_type"] == "video"]
  imgs = [e for e in elements if e["data_type"] == "image"]
  batch["pixel_values_videos"] = _stack_rows([e["pixels"] for e in vids], b * pv)
  if cfg.temporal:
    batch["pixel_values_videos_shuffled"] = _stack_rows([e["pixels_shuffled"] for e in vids], b * pv)
  batch["video_grid_thw"] = np.asarray([e["grid_thw"] for e in vids], np.int64).reshape(-1, 3)
  batch["second_per_grid_ts"] = np.asarray([e["second_per_grid_t"] for e in vids], np.float32)
  batch["pixel_values"] = _stack_rows([e["pixels"] for e in imgs], b * pi)
  batch["image_grid_thw"] = np.asarray([e["grid_thw"] for e in imgs], np.int64).reshape(-1, 3)
  for k in META_KEYS:
    batch[k] = [e[k] for e in elements] + [None] * (b - n)
  return batch


def _stack_rows(arrays, rows):
  out = np.zeros((rows, PATCH_DIM), np.float32)
  offset = 0
  for a in arrays:
    out[offset:offset + a.shape[0]] = a
    offset += a.shape[0]
  return out


class _BatchIterator(grain.DatasetIterator):
  """Counts bad markers and batches good elements (main process, so the keys of every worker's bad
  records meet in one place). State = parent state + bad-record counts and keys."""

  def __init__(self, parent, cfg: DataConfig, pad_token_id: int):
    super().__init__(parent)
    self._cfg, self._pad = cfg, pad_token_id
    self._budgets = patch_budgets(cfg)
    self.bad = sources.BadRecords(cfg.strict)
    self._elements = 0  # elements read from the parent (good and bad): the stream position

  def __next__(self):
    good = []
    while len(good) < self._cfg.batch_size:
      try:
        e = next(self._parent)
      except StopIteration:
        break
      self._elements += 1
      if "bad" in e:
        self.bad.report(*e["bad"], key=e["key"])
      else:
        good.append(e)
    if not good or (len(good) < self._cfg.batch_size and self._cfg.drop_remainder):
      raise StopIteration
    batch = collate(good, self._cfg, self._pad, budgets=self._budgets)
    batch["bad_records"] = self.bad.metrics()
    return batch

  def get_state(self):
    return {"parent": self._parent.get_state(), "bad_records": self.bad.get_state(),
            "elements": self._elements}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    bad = state["bad_records"]
    # Checkpoints written before the keys were kept hold the bare counts.
    self.bad.set_state(bad if "counts" in bad else {"counts": bad})
    self._elements = int(state.get("elements", 0))


class _BatchIterDataset(grain.IterDataset):

  def __init__(self, parent, cfg: DataConfig, pad_token_id: int):
    super().__init__(parent)
    self._cfg, self._pad = cfg, pad_token_id

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), self._cfg, self._pad)


class _ProcessBlocks(grain.MapDataset):
  """Process `index`'s blocks of `block` consecutive elements out of every `count` blocks."""

  def __init__(self, parent, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count

  def __len__(self):
    n, group = len(self._parent), self._block * self._count
    full, rest = divmod(n, group)
    return full * self._block + min(max(rest - self._index * self._block, 0), self._block)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, r = divmod(index, self._block)
    return self._parent[(k * self._count + self._index) * self._block + r]

  def __str__(self):
    return f"ProcessBlocks(block={self._block}, index={self._index}, count={self._count})"


def make_dataset(records, tokenizer, cfg: DataConfig, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, start: int = 0) -> grain.IterDataset:
  """The pipeline as a grain IterDataset of batches (iterate it for a checkpointable iterator).

  Args:
    records: sequence of sources.Record, or a random-access source (e.g. tfds_builders.data_source)
      whose elements are TFDS example dicts (converted with tfds_builders.record_from_example).
    tokenizer: spacer_jax.data.tokenizer.Tokenizer.
    cfg: DataConfig (batch_size = this process's rows of a global batch).
    seed: shuffle seed, also seeds the temporal frame permutations.
    process_index, process_count: this process's blocks (default jax.process_index()/process_count()).
    start: first element of this process's stream (a resumed run with another process count).
  """
  if process_index is None or process_count is None:
    import jax  # Only for the default shard.

    process_index, process_count = jax.process_index(), jax.process_count()
  ds = grain.MapDataset.source(records)
  if not isinstance(records, (list, tuple)):
    from spacer_jax.data import tfds_builders  # TFDS is only needed for this kind of source.

    ds = ds.map(tfds_builders.record_from_example)
  ds = ds.map_with_index(_WithKey(len(ds)))
  if cfg.shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(cfg.num_epochs)
  # Indexed by the global stream position: the temporal frame permutation of an element is the same
  # whatever the process layout.
  ds = ds.map_with_index(Preprocess(tokenizer, cfg, seed))
  if process_count > 1:
    ds = _ProcessBlocks(ds, cfg.batch_size, process_index, process_count)
  if start:
    ds = ds[start:]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                            prefetch_buffer_size=cfg.read_buffer_size))
  if cfg.num_workers > 0:
    # grain 0.2.18 reads absl flags in its worker setup (google/grain#1355).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
  it = _BatchIterDataset(it, cfg, tokenizer.pad_token_id)
  if cfg.prefetch_batches > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch_batches)
  return it


class ProcessIterator(grain.DatasetIterator):
  """One process's batch iterator (its blocks of the global batch stream, `make_dataset`).

  get_state() = grain's state plus the layout (process index and count, rows per process, where
  this process's stream started). `set_state` restores a state of the same layout;
  `set_process_states` (what checkpoint.py calls with every process's saved state) also resumes
  a run saved with another process count: the global batch stream restarts at the first global
  batch that no saved process had begun, which without bad records is exactly the next batch.
  """

  def __init__(self, records, tokenizer, cfg: DataConfig, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None):
    if process_index is None or process_count is None:
      import jax  # Only for the default shard.

      process_index, process_count = jax.process_index(), jax.process_count()
    super().__init__()
    self._args = (records, tokenizer, cfg, seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.batch_size = cfg.batch_size
    self._start = 0
    self._it = iter(make_dataset(records, tokenizer, cfg, seed, self.process_index,
                                 self.process_count))

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def close(self):
    """Stops grain's worker processes and prefetch threads."""
    self._it.close()
    super().close()

  def _restart(self, start):
    if start != self._start:
      self._it.close()
      self._it = iter(make_dataset(*self._args, self.process_index, self.process_count, start=start))
      self._start = start

  def get_state(self):
    return {"grain": self._it.get_state(), "start": self._start,
            "process_index": self.process_index, "process_count": self.process_count,
            "batch_size": self.batch_size}

  def set_state(self, state):
    """Restores a state of this iterator's layout (or a bare grain state, pre-layout checkpoints)."""
    if "grain" not in state:
      self._restart(0)
      self._it.set_state(state)
      return
    if (state["process_count"], state["process_index"], state["batch_size"]) != (
        self.process_count, self.process_index, self.batch_size):
      raise ValueError(
          f"data iterator state of process {state['process_index']} of {state['process_count']} "
          f"({state['batch_size']} rows) cannot restore process {self.process_index} of "
          f"{self.process_count} ({self.batch_size} rows); use set_process_states")
    self._restart(int(state["start"]))
    self._it.set_state(state["grain"])

  def set_process_states(self, states):
    """Restores from every process's saved state (a list in process order), whatever their layout."""
    states = [s if "grain" in s else {"grain": s, "start": 0, "process_index": 0, "process_count": 1,
                                      "batch_size": self.batch_size} for s in states]
    same = (len(states) == self.process_count and all(
        (s["process_index"], s["process_count"], s["batch_size"]) == (i, self.process_count,
                                                                      self.batch_size)
        for i, s in enumerate(states)))
    if same:
      self.set_state(states[self.process_index])
      return
    # Another layout: the global stream position past every element any saved process has read.
    end = 0
    for s in states:
      n, b, i = s["process_count"], s["batch_size"], s["process_index"]
      read = int(s["start"]) + int(s["grain"].get("elements", 0))  # this process's elements read
      if read:
        k, r = divmod(read - 1, b)
        end = max(end, (k * n + i) * b + r + 1)
    global_batch = self.batch_size * self.process_count
    first = -(-end // global_batch)  # the next global batch no saved process had begun
    self._restart(first * self.batch_size)
    # The run's bad-record counts and keys continue on process 0 (keys are source indices, the same
    # whatever the layout, so a record already counted by any saved process is not counted again).
    counts, seen = {}, set()
    for s in states:
      bad = s["grain"].get("bad_records", {})
      bad = bad if "counts" in bad else {"counts": bad}  # pre-key checkpoints: bare counts
      for k, v in bad["counts"].items():
        counts[k] = counts.get(k, 0) + v
      seen.update(bad.get("seen", ()))
    if self.process_index == 0 and (counts or seen):
      fresh = self._it.get_state()
      fresh["bad_records"] = {"counts": counts, "seen": sorted(seen)}
      self._it.set_state(fresh)
    log.info("data iterator: %d-process state resumed by %d processes at global batch %d",
             len(states), self.process_count, first)


def make_iterator(records, tokenizer, cfg: DataConfig, seed: int = 0, **shard) -> ProcessIterator:
  """A ProcessIterator over make_dataset(...): yields batch dicts; get_state()/set_state() (and
  set_process_states) for checkpoints."""
  return ProcessIterator(records, tokenizer, cfg, seed, **shard)
