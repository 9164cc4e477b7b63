"""Evaluation of a Qwen2.5-VL checkpoint on SpaceR's benchmarks (docs/spacer_recipe.md, "Evaluation").

Command line (each config's docstring has more):
  python -m spacer_jax.evaluate --config=configs/eval_vsibench.py \
      --config.model_dir=DIR --config.data_dir=DIR --workdir=OUT
  (configs/eval_{stibench,sparbench,videomme,tempcompass,longvideobench}.py, or `:benchmark=NAME`)
Multi-process (one process per host): the same command on every host, plus
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or a detected SLURM / TPU
environment, see spacer_jax/distributed.py); the questions are split over the processes and process
0 writes the outputs.

One runner for every benchmark in BENCHMARKS. Each benchmark module (spacer_jax.vsibench,
spacer_jax.benchmarks.*) reads its records, builds prompts, parses and scores outputs and aggregates
them (host code, the contract is in spacer_jax.benchmarks.common); this file loads the model, decodes
the media, feeds prompts to the batched greedy sampler and writes the outputs:

  {workdir}/predictions.jsonl   one line per scored question, appended as it goes; a rerun skips the
                                ids already there, so a killed evaluation resumes.
  {workdir}/metrics.json        overall, per-task and the benchmark's other aggregates (x100), counts,
                                skipped questions and bad records (named, counted by cause).
  {workdir}/table.md            the paper's table row + footer.

In the training loop, `train.py` calls `run(...)` every `config.eval.every_steps` (see its docstring).
A question whose media is missing, unreadable or truncated, or whose prompt does not fit the largest
bucket, is skipped, counted and listed; if no media exists at all the layout is wrong and the run stops
before loading the model.

Frames (`config.video.sampler`): "spacer_eval" reproduces SpaceR-Eval's frame selection and its
width/height swap (`load_video_spacer_eval`); "pipeline" uses this project's training video path.
Images (SPAR-Bench) take qwen-vl-utils' image path (`video.preprocess_image`). Decoding is greedy;
`repetition_penalty` (transformers' semantics) is 1.05 for SpaceR-Eval's protocols, which inherit it
from Qwen2.5-VL's generation_config.json, and 1.0 for VSI-Bench's official protocol and the demo.
"""

import collections
import concurrent.futures
import json
import os
import re
import time

import av
import jax
import numpy as np
import PIL.Image
import tqdm
from absl import flags
from absl import logging
from ml_collections import config_flags

from spacer_jax import cli
from spacer_jax import config_lib
from spacer_jax import distributed
from spacer_jax import modeling
from spacer_jax import sampling
from spacer_jax import sharding
from spacer_jax import vsibench
from spacer_jax.benchmarks import common
from spacer_jax.benchmarks import longvideobench
from spacer_jax.benchmarks import sparbench
from spacer_jax.benchmarks import stibench
from spacer_jax.benchmarks import tempcompass
from spacer_jax.benchmarks import videomme
from spacer_jax.data import prompts
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.data import video as video_lib

# The benchmarks (config.benchmark -> module with the parts listed in spacer_jax.benchmarks.common).
BENCHMARKS = {
    "vsibench": vsibench,
    "stibench": stibench,
    "sparbench": sparbench,
    "videomme": videomme,
    "tempcompass": tempcompass,
    "longvideobench": longvideobench,
}
assert tuple(BENCHMARKS) == config_lib.EVAL_BENCHMARKS


# ---------------------------------------------------------------------------------------------------
# Model and tokenizer.
# ---------------------------------------------------------------------------------------------------


def load_model(model_dir, *, dtype="bfloat16", mesh=None, rules=None):
  """A Qwen2.5-VL from an HF checkpoint directory or a train.py workdir (its latest step), with
  every tensor placed straight into its shard (modeling.load_model)."""
  return modeling.load_model(model_dir, dtype=dtype, mesh=mesh, rules=rules or ())


# ---------------------------------------------------------------------------------------------------
# Media.
# ---------------------------------------------------------------------------------------------------


def spacer_eval_frame_indices(total_frames, avg_fps, *, fps=1.0, max_frames=32):
  """SpaceR-Eval's frame indices: k = max(1, min(max_frames, int(int(T / avg_fps) * fps))) at
  np.linspace(0, T - 1, k, dtype=int) (truncation, not rounding)."""
  k = max(1, min(int(max_frames), int(int(total_frames / avg_fps) * fps)))
  return np.linspace(0, total_frames - 1, k).astype(np.int64)


def _check_complete(path, stream, present):
  """MediaError when the container declares more frames than it holds (a truncated file).

  Both protocols refuse such a file: sampling from the frames that are left would score the question
  on a clip other than the benchmark's. Containers that declare no count (0) are not checked.
  """
  declared = int(stream.frames or 0)
  if declared and present < declared:
    raise video_lib.MediaError(path, f"truncated: the container declares {declared} frames, only"
                               f" {present} are present")


def check_video_complete(path):
  """Opens `path` and applies _check_complete (the training video path does not check it)."""
  try:
    with av.open(path) as container:
      if container.streams.video:
        stream = container.streams.video[0]
        _check_complete(path, stream, sum(1 for p in container.demux(stream) if p.size > 0))
  except av.FFmpegError:
    pass  # the decoder reports unreadable files with its own reason


def load_video_spacer_eval(path, *, fps=1.0, max_frames=32, max_side=448, swap_hw=True,
                           min_pixels=video_lib.MIN_PIXELS, max_pixels=video_lib.MAX_PIXELS):
  """SpaceR-Eval's frames (`util.load_video_frames` + qwen-vl-utils; docs/spacer_recipe.md,
  "Evaluation") -> VisionInput.

  k = max(1, min(max_frames, int(int(T / avg_fps) * fps))) frames at int(linspace(0, T-1, k))
  (truncation); a frame whose long side exceeds `max_side` is LANCZOS-resized to long side
  `max_side` with width and height swapped as the reference does (640x480 W x H -> 336x448;
  swap_hw=False gives the intended aspect-preserving 448x336); then qwen-vl-utils' image
  smart_resize (28, min_pixels, max_pixels) per frame, an odd count padded with the last frame,
  second_per_grid_t 1.0. Frames are taken in presentation order (decord's indexing).
  Raises MediaError naming the file for a missing, truncated or undecodable video and for frames that
  cannot be resized (a 1-pixel side, an aspect ratio over 200).
  """
  container = None
  try:
    if not os.path.exists(path):
      raise video_lib.MediaError(path, "file not found")
    container = av.open(path)
    if not container.streams.video:
      raise video_lib.MediaError(path, "no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    total = sum(1 for p in container.demux(stream) if p.size > 0)
    if not rate or total == 0:
      raise video_lib.MediaError(path, "no frames or unknown frame rate")
    _check_complete(path, stream, total)
    wanted = spacer_eval_frame_indices(total, float(rate), fps=fps, max_frames=max_frames)
    container.seek(0)
    picked, index = {}, 0
    for frame in container.decode(stream):
      if index in wanted:
        picked[index] = frame.to_image()
      index += 1
      if index > wanted[-1]:
        break
  except av.FFmpegError as e:
    raise video_lib.MediaError(path, f"corrupt video ({type(e).__name__}: {e})") from e
  finally:
    if container is not None:
      container.close()
  missing = [int(i) for i in wanted if int(i) not in picked]
  if missing:
    raise video_lib.MediaError(path, f"frames {missing[:5]} could not be decoded")
  images = []
  for i in wanted:
    img = picked[int(i)]
    w, h = img.size
    if max(w, h) > max_side:
      scale = max_side / max(w, h)
      size = (int(h * scale), int(w * scale)) if swap_hw else (int(w * scale), int(h * scale))
      if min(size) <= 0:
        raise video_lib.MediaError(path, f"frame {w}x{h} (W x H) resizes to {size[0]}x{size[1]}")
      img = img.resize(size, PIL.Image.Resampling.LANCZOS)
    images.append(np.asarray(img.convert("RGB")))
  frames = np.stack(images)
  try:
    rh, rw = video_lib.smart_resize(frames.shape[1], frames.shape[2], video_lib.IMAGE_FACTOR,
                                    min_pixels, max_pixels)
  except ValueError as e:
    raise video_lib.MediaError(path, str(e)) from e
  if rh <= 0 or rw <= 0:
    raise video_lib.MediaError(path, f"frame {frames.shape[2]}x{frames.shape[1]} resizes to"
                               f" {rw}x{rh}")
  pixel_values, grid_thw = video_lib.patchify(video_lib.resize_frames(frames, rh, rw))
  return video_lib.VisionInput(pixel_values, grid_thw, video_lib.SPACER_SECOND_PER_GRID_T)


def _load_video(path, video_kwargs):
  """(VisionInput, None) or (None, reason) for one video file.

  video_kwargs["sampler"]: "pipeline" (this project's video path: video.load_video with fps,
  min_frames, max_frames, min_pixels, max_pixels) or "spacer_eval" (load_video_spacer_eval with fps,
  max_frames, max_side, swap_hw, min_pixels, max_pixels). Either way a truncated file is refused.
  """
  kw = dict(video_kwargs or {})
  sampler = kw.pop("sampler", "pipeline")
  try:
    if sampler == "spacer_eval":
      keys = ("fps", "max_frames", "max_side", "swap_hw", "min_pixels", "max_pixels")
      return load_video_spacer_eval(path, **{k: kw[k] for k in keys if k in kw}), None
    if sampler != "pipeline":
      raise ValueError(f"config.video.sampler={sampler!r}: use pipeline or spacer_eval")
    for k in ("max_side", "swap_hw"):
      kw.pop(k, None)
    read_kwargs = {k: kw.pop(k) for k in ("fps", "min_frames", "max_frames", "nframes") if k in kw}
    if os.path.exists(path):
      check_video_complete(path)
    return video_lib.load_video(path, read_kwargs=read_kwargs, **kw), None
  except video_lib.MediaError as e:
    return None, f"unreadable ({e.reason})"


def _load_images(record_id, images, image_kwargs):
  """([VisionInput] for a record's images, None) or (None, (name, reason))."""
  kw = {k: v for k, v in (image_kwargs or {}).items() if k in ("min_pixels", "max_pixels")}
  out = []
  for k, img in enumerate(images):
    name = img if isinstance(img, str) else f"record {record_id} image {k}"
    try:
      out.append(video_lib.preprocess_image(img, name=name, **kw))
    except video_lib.MediaError as e:
      return None, (name, f"unreadable ({e.reason})")
  return out, None


def _load_media(bench, data_dir, rec, video_kwargs, image_kwargs):
  """(vision inputs, None) or (None, (name, reason)); a list of VisionInputs for images."""
  if bench.MEDIA == "images":
    return _load_images(rec["id"], bench.media(data_dir, rec), image_kwargs)
  path = bench.media(data_dir, rec)
  vis, reason = _load_video(path, video_kwargs)
  return vis, (None if vis is not None else (path, reason))


def _media_key(bench, data_dir, rec):
  """Questions with the same key share one decode (VSI-Bench asks ~18 questions per scene)."""
  return bench.media(data_dir, rec) if bench.MEDIA == "video" else f"record {rec['id']}"


# ---------------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------------


def encode_item(bench, rec, vis, tokenizer, protocol):
  """Token ids of one question's prompt (chat template, vision placeholders expanded)."""
  text, system = bench.build_prompt(rec, protocol)
  system = prompts.DEFAULT_SYSTEM_PROMPT if system is None else system
  if bench.MEDIA == "images":
    return prompts.encode_prompt(tokenizer, text, ["image"] * len(vis), system_prompt=system,
                                 image_grid_thw=[v.grid_thw for v in vis], record_id=rec["id"])
  return prompts.encode_prompt(tokenizer, text, "video", system_prompt=system,
                               video_grid_thw=[vis.grid_thw], record_id=rec["id"])


def make_batch(items, pad_token_id, batch_size, buckets):
  """items: [(record, vision inputs, token ids)] -> sampler inputs, padded to `batch_size` rows by
  repeating the last item (static shapes: one compile for every batch of the run)."""
  items = list(items) + [items[-1]] * (batch_size - len(items))
  input_ids, mask = prompts.left_pad([ids for _, _, ids in items], pad_token_id, buckets=buckets,
                                     record_ids=[rec["id"] for rec, _, _ in items])
  batch = dict(input_ids=input_ids, attention_mask=mask)
  if isinstance(items[0][1], list):  # images: every image of every row, in order
    images = [v for _, vis, _ in items for v in vis]
    batch.update(pixel_values=np.concatenate([v.pixel_values for v in images]),
                 image_grid_thw=np.stack([v.grid_thw for v in images]).astype(np.int64))
  else:
    batch.update(
        pixel_values_videos=np.concatenate([vis.pixel_values for _, vis, _ in items]),
        video_grid_thw=np.stack([vis.grid_thw for _, vis, _ in items]).astype(np.int64),
        second_per_grid_ts=np.asarray([vis.second_per_grid_t for _, vis, _ in items], np.float32))
  return batch


def check_run_info(workdir, info):
  """Writes {workdir}/run_info.json, or checks that an earlier run there used the same settings."""
  path = os.path.join(workdir, "run_info.json")
  info = json.loads(json.dumps(info))  # tuples -> lists, as they come back from the file
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
    if diff:
      raise ValueError(
          f"{path}: the predictions in {workdir} were made with other settings ("
          + "; ".join(f"{k}: {old.get(k)!r} then, {info.get(k)!r} now" for k in diff)
          + "); use another --workdir, or delete it to start over")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(info, f, indent=2)


def find_videos(data_dir, records, allow_missing_videos=True, bench=vsibench):
  """Splits records by whether their media exist -> (present records, {missing path: "missing"}).

  Raises FileNotFoundError when no video exists at all (wrong layout or wrong data_dir), or on the
  first missing one when allow_missing_videos is False. Cheap (os.path.exists), so it runs before the
  model is loaded. Images given as bytes are always present.
  """
  def paths(rec):
    found = bench.media(data_dir, rec)
    return [found] if isinstance(found, str) else [p for p in found if isinstance(p, str)]

  present, skipped = [], {}
  for rec in records:
    missing = [p for p in paths(rec) if not os.path.exists(p)]
    if not missing:
      present.append(rec)
    elif not allow_missing_videos:
      raise FileNotFoundError(f"record id={rec['id']}: {'video' if bench.MEDIA == 'video' else 'image'}"
                              f" {missing[0]} is missing")
    else:
      skipped.update({p: "missing" for p in missing})
  if records and not present:
    example = (paths(records[0]) or ["?"])[0]
    raise FileNotFoundError(
        f"none of the {len(records)} {'videos' if bench.MEDIA == 'video' else 'image sets'} exist"
        f" under data_dir={data_dir!r} (expected the"
        f" layout {bench.LAYOUT}, e.g. {example})")
  if skipped:
    logging.warning("%s: %d of %d questions skipped: %d file(s) missing (e.g. %s)", bench.NAME,
                    len(records) - len(present), len(records), len(skipped), next(iter(skipped)))
  return present, skipped


def _cause(reason):
  """The counter name of a skip reason ("unreadable (truncated: ...)" -> "truncated")."""
  if reason.startswith("unreadable (truncated"):
    return "truncated"
  return reason.split(" ")[0].split("(")[0]


def _percent(tree):
  """Scores in [0, 1] -> x100, recursively (None stays None)."""
  if isinstance(tree, dict):
    return {k: _percent(v) for k, v in tree.items()}
  return None if tree is None else 100.0 * tree


# ---------------------------------------------------------------------------------------------------
# The evaluation loop.
# ---------------------------------------------------------------------------------------------------


def run(model, tokenizer, *, data_dir, benchmark="vsibench", records=None, protocol=None,
        aggregation="code", max_new_tokens=None, batch_size=8, workdir=None, video_kwargs=None,
        image_kwargs=None, prompt_buckets=prompts.DEFAULT_BUCKETS, mesh=None, params=None,
        cache_dtype=None, vision_budget=None, name="model", allow_missing_videos=True,
        allow_outside_data_dir=False, max_items=0, num_workers=2, progress=True, run_info=None,
        repetition_penalty=1.0, bad_records=None):
  """Evaluates `model` on one benchmark (BENCHMARKS); returns the scores (x100).

  The trainer calls this every `config.eval.every_steps` with its current weights:
    scores = evaluate.run(model, tokenizer, data_dir=heldout_dir, benchmark="vsibench",
                          protocol="spacer", max_new_tokens=256, batch_size=8, mesh=mesh,
                          params=tree_utils.to_state(state["params"], paths),
                          workdir=f"{workdir}/eval/step_{step}", progress=False)
    writer.write_scalars(step, evaluate.scalars(scores, prefix="eval/"))
  (`workdir=None` keeps nothing on disk.) Rows are sharded over the data/fsdp axes of `mesh`. In a
  multi-process job every process calls `run` with the same arguments: each batch of `batch_size`
  questions is split over the processes (each decodes only its own videos), the sampler runs the
  global batch, every process scores its rows, and the scored items are gathered to all processes;
  process 0 alone writes the files, and every process returns the same result.

  Every question is either scored or accounted for: bad records (bad fields, lines that are not UTF-8
  or JSON, media paths outside data_dir) are dropped while reading; questions whose media are missing,
  unreadable, truncated, or whose prompt does not fit the largest bucket are skipped. Each is named in
  metrics.json and the table's footer and counted by cause.

  Args:
    model: a `qwen2_5_vl.Qwen2_5_VL` (its graph; weights from `params` if given).
    tokenizer: `spacer_jax.data.tokenizer.Tokenizer` matching the model's special ids.
    data_dir: the benchmark's directory (layout: the benchmark module's docstring).
    benchmark: a key of BENCHMARKS.
    records: validated records (`module.read_records(data_dir)`); read from data_dir when None.
    protocol: one of the benchmark's PROTOCOLS ("spacer" = SpaceR-Eval thinking mode, the default;
      "spacer_default" = its non-thinking mode; VSI-Bench's "official").
    aggregation: "code" (as the original evaluation code computes it) or "readme" (as the README
      tables print it, where they differ).
    max_new_tokens: generation budget; None = the protocol's default (1024 / 128 / 16).
    batch_size: prompts per sampler call (make it a multiple of the device count to shard rows).
    workdir: when given, predictions.jsonl / metrics.json / table.md are written there and finished
      items of an earlier run are skipped; None keeps everything in memory (nothing is resumed).
    video_kwargs: frame/pixel settings for videos (see _load_video).
    image_kwargs: min_pixels / max_pixels for images (SPAR-Bench).
    prompt_buckets: left-padding length buckets (a compile per bucket used).
    mesh: device mesh; rows are sharded over its data/fsdp axes (params keep their sharding).
    params: optional nnx.State to sample with instead of the model's own weights.
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    vision_budget: static vision patch budgets forwarded to the sampler (no recompile across grids).
    name: row label of the table.
    allow_missing_videos: False raises on the first missing media file instead of skipping it.
    allow_outside_data_dir: accept media paths that resolve outside data_dir.
    max_items: evaluate only the first N records (0 = all); for smoke runs and in-loop subsets.
    num_workers: threads decoding the next batch's media while the model runs.
    progress: show a tqdm progress bar.
    repetition_penalty: greedy decoding with transformers' repetition penalty (1.0 = off).
    run_info: extra settings identifying the run (evaluate() passes model_dir, dtype, ...). With
      `workdir`, they are written to run_info.json together with benchmark, protocol,
      max_new_tokens, data_dir, video and image settings; resuming with any of them changed raises
      instead of mixing two runs. (`aggregation` is not among them: rerunning a finished workdir
      with the other aggregation rewrites metrics.json and table.md without generating anything.)
    bad_records: the common.BadItems of the read that produced `records`, if any (reported).

  Returns:
    dict with "benchmark", "overall" (x100 or None), "tasks" {task: x100}, "columns" {table column:
    x100}, "details" (the benchmark's other aggregates, x100), "counts" {task: n}, "num_scored",
    "num_records", "skipped" {media or question: reason}, "num_skipped" (questions skipped at run
    time), "skipped_by_cause", "bad_records" {file:line: reason}, "num_bad_records",
    "bad_records_by_cause", "protocol", "aggregation", "max_new_tokens", "seconds"; VSI-Bench adds
    "per_type".
  """
  if benchmark not in BENCHMARKS:
    raise ValueError(f"benchmark={benchmark!r}; choose one of {tuple(BENCHMARKS)}")
  bench = BENCHMARKS[benchmark]
  protocol = protocol or bench.PROTOCOLS[0]
  if protocol not in bench.PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}; {bench.NAME} has {bench.PROTOCOLS}")
  if aggregation not in common.AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; choose one of {common.AGGREGATIONS}")
  t0 = time.time()
  max_new_tokens = int(max_new_tokens or bench.DEFAULT_MAX_NEW_TOKENS[protocol])
  bad = bad_records if bad_records is not None else common.BadItems()
  if records is None:
    records = bench.read_records(data_dir, bad=bad, allow_outside=allow_outside_data_dir)
  if max_items:
    records = records[:max_items]

  present, skipped = find_videos(data_dir, records, allow_missing_videos, bench)
  by_cause = collections.Counter({"missing": len(records) - len(present)})
  num_skipped = len(records) - len(present)  # questions not scored at run time

  modeling.check_tokenizer(tokenizer, model.config, where="config.tokenizer_dir")
  # Multi-process (spacer_jax/distributed.py): process 0 owns the files; each batch of batch_size
  # questions is split over the processes, process i decoding and scoring rows
  # [i*batch_size/N, (i+1)*batch_size/N) of it, and the scored and skipped questions are gathered to
  # all, so every process ends with the same result.
  primary, nproc = distributed.is_primary(), jax.process_count()
  if batch_size % nproc:
    raise ValueError(f"batch_size={batch_size} does not split over {nproc} processes")
  per_process = batch_size // nproc
  error = None
  if workdir and primary:
    try:
      check_run_info(workdir, dict(
          run_info or {}, benchmark=benchmark, protocol=protocol, max_new_tokens=max_new_tokens,
          repetition_penalty=float(repetition_penalty), data_dir=os.path.abspath(data_dir),
          video_kwargs=video_kwargs or {},
          **({"image_kwargs": image_kwargs or {}} if bench.MEDIA == "images" else {})))
    except ValueError as e:
      error = str(e)
  error = distributed.broadcast_object(error)
  if error:
    raise ValueError(error)
  preds = (common.PredictionsFile(os.path.join(workdir, "predictions.jsonl"), protocol)
           if workdir and primary else None)
  done = distributed.broadcast_object(dict(preds.done) if preds else {})
  todo = [rec for rec in present if rec["id"] not in done]
  sampler = sampling.Sampler(model, temperature=0.0, mesh=mesh, cache_dtype=cache_dtype,
                             vision_budget=vision_budget, repetition_penalty=repetition_penalty)

  # Questions are grouped by media, so each video is decoded once per batch that uses it and the
  # decoded clip is shared by its questions.
  key = lambda rec: _media_key(bench, data_dir, rec)  # noqa: E731
  todo.sort(key=key)
  bar = tqdm.tqdm(total=len(present), initial=len(present) - len(todo),
                  desc=f"{bench.NAME} {name}", unit="q", disable=not (progress and primary),
                  dynamic_ncols=True)
  chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  # This process's rows of each chunk (none for some processes in a short final chunk).
  mine = [chunk[distributed.process_rows(batch_size)] for chunk in chunks]

  def submit(pool, chunk, previous):
    """{media key: future} for a chunk, reusing the previous chunk's futures."""
    futures = {}
    for rec in chunk:
      k = key(rec)
      if k not in futures:
        futures[k] = previous.get(k) or pool.submit(_load_media, bench, data_dir, rec,
                                                    video_kwargs, image_kwargs)
    return futures

  def skip(what, reason):
    nonlocal num_skipped
    skipped[what] = reason
    by_cause[_cause(reason)] += 1
    num_skipped += 1
    bar.update(1)

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      pending = submit(pool, mine[0], {}) if chunks else {}
      for i in range(len(chunks)):
        current = pending
        # Decode the next batch's media while this one runs on the device.
        pending = submit(pool, mine[i + 1], current) if i + 1 < len(chunks) else {}
        items, failed = [], []
        for rec in mine[i]:
          vis, failure = current[key(rec)].result()
          if vis is None:
            failed.append(failure)
            continue
          try:
            ids = encode_item(bench, rec, vis, tokenizer, protocol)
            prompts.choose_bucket(len(ids), prompt_buckets, rec["id"])
          except prompts.PromptTooLongError as e:
            failed.append((f"question {rec['id']}", f"prompt_too_long ({e.length} tokens > "
                                                    f"largest bucket {e.max_length})"))
            continue
          items.append((rec, vis, ids))
        if nproc > 1 and any(distributed.allgather_objects(bool(items))) and not items:
          # Other processes have rows to run: take part with a one-token placeholder.
          items = [_placeholder_item(bench, model.config, tokenizer)]
        scored = []
        if items:
          batch = make_batch(items, tokenizer.pad_token_id, per_process, prompt_buckets)
          out = sampler(batch.pop("input_ids"), batch.pop("attention_mask"),
                        max_new_tokens=max_new_tokens, params=params, **batch)
          rows = distributed.process_rows(batch_size)
          tokens = distributed.to_host(out.tokens)[rows]
          lengths = distributed.to_host(out.lengths)[rows]
          for b, (rec, _, _) in enumerate(items):
            if rec.get("_filler"):
              continue
            output = tokenizer.decode(tokens[b, :lengths[b]], skip_special_tokens=True)
            scored.append({"id": rec["id"], **bench.item_fields(rec), "output": output,
                           **bench.score(rec, output, protocol), "num_tokens": int(lengths[b])})
        for part_scored, part_failed in distributed.allgather_objects((scored, failed)):
          for what, reason in part_failed:
            skip(what, reason)
          for item in part_scored:
            if preds:
              preds.add(item)
            else:
              item["protocol"] = protocol
            done[item["id"]] = item
          bar.update(len(part_scored))
  finally:
    bar.close()
    if preds:
      preds.close()

  ids = {rec["id"] for rec in records}
  scored = [done[rec["id"]] for rec in present if rec["id"] in done]
  extra = len(set(done) - ids)
  if extra:
    logging.warning("%s: %d predictions in %s belong to no record of %s; ignored", bench.NAME,
                    extra, workdir, data_dir)
  agg = bench.aggregate(scored, aggregation)
  plain = ("overall", "tasks", "counts", "num_scored", "aggregation", "per_type")
  result = {
      "benchmark": benchmark,
      "overall": _percent(agg["overall"]),
      "tasks": _percent(agg["tasks"]),
      "columns": {title: _percent(v) for title, v in bench.table_columns(agg)},
      "details": _percent({k: v for k, v in agg.items() if k not in plain}),
      "counts": agg["counts"],
      "num_scored": agg["num_scored"],
      "num_records": len(records),
      "skipped": dict(sorted(skipped.items())),
      "num_skipped": num_skipped,
      "skipped_by_cause": {k: v for k, v in sorted(by_cause.items()) if v},
      "bad_records": dict(bad.records),
      "num_bad_records": len(bad),
      "bad_records_by_cause": dict(sorted(bad.by_cause.items())),
      "protocol": protocol,
      "aggregation": aggregation,
      "max_new_tokens": max_new_tokens,
      "seconds": time.time() - t0,
  }
  if "per_type" in agg:
    result["per_type"] = _percent(agg["per_type"])
  if workdir and primary:
    table = common.benchmark_table(
        bench, agg, name=name, num_records=len(records), protocol=protocol,
        skipped=[f"{p} ({r})" for p, r in sorted(skipped.items())], num_skipped=num_skipped,
        bad_records=bad.records)
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(table)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(dict(result, data_dir=data_dir, name=name), f, indent=2)
  return result


def _placeholder_item(bench, cfg, tokenizer):
  """(record, vision input, token ids) of a black one-token video or image under an empty prompt:
  the row a process runs when none of its questions of a batch could run while other processes'
  could (its output is dropped)."""
  m = cfg.spatial_merge_size
  dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  grid = np.asarray([1, m, m], np.int64)
  pixels = np.zeros((m * m, dim), np.float32)
  if bench.MEDIA == "images":
    vis = [video_lib.VisionInput(pixels, grid, None)]
    ids = prompts.encode_prompt(tokenizer, "", ["image"], image_grid_thw=[grid])
  else:
    vis = video_lib.VisionInput(pixels, grid, video_lib.SPACER_SECOND_PER_GRID_T)
    ids = prompts.encode_prompt(tokenizer, "", "video", video_grid_thw=[grid])
  return {"id": "placeholder", "_filler": True}, vis, ids


def scalars(result, prefix="vsibench/"):
  """Flat {name: float} of a `run` result for metric writers / TensorBoard: per-task scores and
  overall (x100), skip counts. Task names are made tag-safe ("Speed & Acceleration" ->
  "Speed_Acceleration")."""
  safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("_")  # noqa: E731
  out = {f"{prefix}{safe(k)}": v for k, v in result["tasks"].items() if v is not None}
  if result["overall"] is not None:
    out[f"{prefix}overall"] = result["overall"]
  out[f"{prefix}num_skipped"] = float(result["num_skipped"])
  out[f"{prefix}num_bad_records"] = float(result.get("num_bad_records", 0))
  return out


# ---------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------


def evaluate(config, workdir):
  """Runs the evaluation described by a configs/eval_*.py config; returns `run`'s result."""
  benchmark = config.get("benchmark", "vsibench")
  if benchmark not in BENCHMARKS:
    raise ValueError(f"config.benchmark={benchmark!r}; choose one of {tuple(BENCHMARKS)}")
  bench = BENCHMARKS[benchmark]
  if not config.data_dir:
    raise ValueError(f"set --config.data_dir ({bench.NAME} directory)")
  if not config.model_dir:
    raise ValueError("set --config.model_dir (HF or trainer checkpoint directory)")
  # Records and media are checked before the (slow) model load.
  bad = common.BadItems()
  allow_outside = config.get("allow_outside_data_dir", False)
  records = bench.read_records(config.data_dir, bad=bad, allow_outside=allow_outside)
  if config.max_items:
    records = records[:config.max_items]
  find_videos(config.data_dir, records, config.allow_missing_videos, bench)
  mesh = sharding.make_mesh(config_lib.MESH_PRESETS[config.mesh])
  rules = config_lib.SHARDING_PRESETS[config.mesh]
  # Generation runs under the mesh; the sampler shards rows over data/fsdp and XLA gathers the
  # FSDP-sharded weights.
  model = load_model(config.model_dir, dtype=config.dtype, mesh=mesh, rules=rules)
  tokenizer = tokenizer_lib.load_tokenizer(
      modeling.tokenizer_dir(config.model_dir, config.tokenizer_dir))
  image = config.get("image")
  with jax.set_mesh(mesh):
    result = run(model, tokenizer, data_dir=config.data_dir, benchmark=benchmark, records=records,
                 protocol=config.protocol, aggregation=config.get("aggregation", "code"),
                 max_new_tokens=config.max_new_tokens,
                 batch_size=config.batch_size, workdir=workdir,
                 video_kwargs=config.video.to_dict(),
                 image_kwargs=image.to_dict() if image is not None else None,
                 prompt_buckets=tuple(config.prompt_buckets),
                 mesh=mesh, cache_dtype=config.cache_dtype or None,
                 name=config.name or os.path.basename(os.path.normpath(config.model_dir)),
                 allow_missing_videos=config.allow_missing_videos,
                 allow_outside_data_dir=allow_outside, max_items=config.max_items,
                 num_workers=config.num_workers, progress=config.progress,
                 repetition_penalty=config.repetition_penalty, bad_records=bad,
                 run_info=dict(model_dir=os.path.abspath(config.model_dir),
                               tokenizer_dir=config.tokenizer_dir, dtype=config.dtype,
                               max_items=config.max_items))
  return result


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  distributed.initialize_from_flags()
  os.makedirs(workdir, exist_ok=True)
  evaluate(flags.FLAGS.config, workdir)
  if distributed.is_primary():
    with open(os.path.join(workdir, "table.md")) as f:
      print(f.read())


def define_flags(fv=flags.FLAGS):
  """--config and --workdir; defined only when run as a program (train.py imports this module for
  `run` and defines its own)."""
  config_flags.DEFINE_config_file("config", None, "Evaluation config: configs/eval_<benchmark>.py"
                                  "[:args] (packaged configs are found from any directory) or a short "
                                  "name (eval_vsibench:protocol=official).", lock_config=True,
                                  flag_values=fv)
  flags.DEFINE_string("workdir", None, "Output directory (predictions, metrics, table).",
                      flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  distributed.define_flags(fv)


if __name__ == "__main__":
  cli.run(main, define_flags, __doc__)
