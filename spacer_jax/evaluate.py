"""VSI-Bench evaluation of a Qwen2.5-VL checkpoint (spec spacer.md section 7).

Command line (the config docstring has more):
  python -m spacer_jax.evaluate --config=configs/eval_vsibench.py \
      --config.model_dir=DIR --config.data_dir=DIR --workdir=OUT
Multi-process (one process per host): the same command on every host, plus
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or a detected SLURM / TPU
environment, see spacer_jax/distributed.py); the questions are split over the processes and process
0 writes the outputs.

In the training loop, `train.py` calls `run(...)` every `eval_every_steps` on a held-out split (see
its docstring). Scoring, aggregation, the table and the resumable predictions file are host code in
`spacer_jax.vsibench`; this file loads the model, feeds videos and prompts to the batched greedy
sampler and writes the outputs:

  {workdir}/predictions.jsonl   one line per scored question, appended as it goes; a rerun skips the
                                ids already there, so a killed evaluation resumes.
  {workdir}/metrics.json        per-type, per-task and overall scores (x100), counts, skipped videos.
  {workdir}/table.md            the paper's table row (Avg, Obj.Count, ..., Appr.Order) + footer.

Data layout (VSI-Bench release): `{data_dir}/<one annotation file: *.parquet | *.jsonl | *.json>` and
videos at `{data_dir}/{dataset}/{scene_name}.mp4`. A question whose video is missing (or cannot be
decoded) is skipped, counted and listed in the table's footer; if no video exists at all the layout is
wrong and the run stops before loading the model.

Frames (`config.video.sampler`): "spacer_eval" reproduces SpaceR-Eval's frame selection and its
width/height swap (spec 7.1, `load_video_spacer_eval`); "pipeline" uses this project's training video
path. Decoding is greedy; `repetition_penalty` (transformers' semantics) is 1.05 for the spacer
protocol in configs/eval_vsibench.py, as SpaceR-Eval inherits it from Qwen2.5-VL's
generation_config.json (spec 7.1), and 1.0 for the official protocol and the demo.
"""

import concurrent.futures
import json
import os
import time

import av
import jax
import numpy as np
import PIL.Image
import tqdm
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spacer_jax import config_lib
from spacer_jax import distributed
from spacer_jax import modeling
from spacer_jax import sampling
from spacer_jax import sharding
from spacer_jax import vsibench
from spacer_jax.data import prompts
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.data import video as video_lib

# Defaults of the two protocols (spec 7.1-7.2): official greedy 16 tokens; SpaceR-Eval "thinking" 1024.
DEFAULT_MAX_NEW_TOKENS = {"official": 16, "spacer": 1024}


# ---------------------------------------------------------------------------------------------------
# Model and tokenizer.
# ---------------------------------------------------------------------------------------------------


def load_model(model_dir, *, dtype="bfloat16", mesh=None, rules=None):
  """A Qwen2.5-VL from an HF checkpoint directory or a train.py workdir (its latest step), with
  every tensor placed straight into its shard (modeling.load_model)."""
  return modeling.load_model(model_dir, dtype=dtype, mesh=mesh, rules=rules or ())


# ---------------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------------


def spacer_eval_frame_indices(total_frames, avg_fps, *, fps=1.0, max_frames=32):
  """SpaceR-Eval's frame indices: k = max(1, min(max_frames, int(int(T / avg_fps) * fps))) at
  np.linspace(0, T - 1, k, dtype=int) (truncation, not rounding)."""
  k = max(1, min(int(max_frames), int(int(total_frames / avg_fps) * fps)))
  return np.linspace(0, total_frames - 1, k).astype(np.int64)


def load_video_spacer_eval(path, *, fps=1.0, max_frames=32, max_side=448, swap_hw=True,
                           min_pixels=video_lib.MIN_PIXELS, max_pixels=video_lib.MAX_PIXELS):
  """SpaceR-Eval's frames (spec 7.1, `util.load_video_frames` + qwen-vl-utils) -> VisionInput.

  k = max(1, min(max_frames, int(int(T / avg_fps) * fps))) frames at int(linspace(0, T-1, k))
  (truncation); a frame whose long side exceeds `max_side` is LANCZOS-resized to long side
  `max_side` with width and height swapped as the reference does (640x480 W x H -> 336x448;
  swap_hw=False gives the intended aspect-preserving 448x336); then qwen-vl-utils' image
  smart_resize (28, min_pixels, max_pixels) per frame, an odd count padded with the last frame,
  second_per_grid_t 1.0. Frames are taken in presentation order (decord's indexing).
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
      img = img.resize(size, PIL.Image.Resampling.LANCZOS)
    images.append(np.asarray(img.convert("RGB")))
  frames = np.stack(images)
  rh, rw = video_lib.smart_resize(frames.shape[1], frames.shape[2], video_lib.IMAGE_FACTOR,
                                  min_pixels, max_pixels)
  pixel_values, grid_thw = video_lib.patchify(video_lib.resize_frames(frames, rh, rw))
  return video_lib.VisionInput(pixel_values, grid_thw, video_lib.SPACER_SECOND_PER_GRID_T)


def _load_video(path, video_kwargs):
  """(VisionInput, None) or (None, reason) for one video file.

  video_kwargs["sampler"]: "pipeline" (this project's video path: video.load_video with fps,
  min_frames, max_frames, min_pixels, max_pixels) or "spacer_eval" (load_video_spacer_eval with fps,
  max_frames, max_side, swap_hw, min_pixels, max_pixels).
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
    return video_lib.load_video(path, read_kwargs=read_kwargs, **kw), None
  except video_lib.MediaError as e:
    return None, f"unreadable ({e.reason})"


def _encode(rec, vis, tokenizer, protocol):
  style = "spacer" if protocol == "spacer" else "official"
  text = prompts.vsibench_prompt(rec["question"], rec["question_type"], rec["options"], style=style)
  return prompts.encode_prompt(tokenizer, text, "video", video_grid_thw=[vis.grid_thw],
                               record_id=rec["id"])


def make_batch(items, tokenizer, protocol, batch_size, buckets):
  """items: [(record, VisionInput)] -> sampler inputs, padded to `batch_size` rows by repeating the
  last item (static shapes: one compile for every batch of the run)."""
  items = list(items) + [items[-1]] * (batch_size - len(items))
  seqs = [_encode(rec, vis, tokenizer, protocol) for rec, vis in items]
  input_ids, mask = prompts.left_pad(seqs, tokenizer.pad_token_id, buckets=buckets,
                                     record_ids=[rec["id"] for rec, _ in items])
  return dict(
      input_ids=input_ids, attention_mask=mask,
      pixel_values_videos=np.concatenate([vis.pixel_values for _, vis in items]),
      video_grid_thw=np.stack([vis.grid_thw for _, vis in items]).astype(np.int64),
      second_per_grid_ts=np.asarray([vis.second_per_grid_t for _, vis in items], np.float32))


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


def find_videos(data_dir, records, allow_missing_videos=True):
  """Splits records by whether their video exists -> (present records, {missing path: "missing"}).

  Raises FileNotFoundError when no video exists at all (wrong layout or wrong data_dir), or on the
  first missing one when allow_missing_videos is False. Cheap (os.path.exists), so it runs before the
  model is loaded.
  """
  present, skipped = [], {}
  for rec in records:
    path = vsibench.video_path(data_dir, rec)
    if os.path.exists(path):
      present.append(rec)
    elif not allow_missing_videos:
      raise FileNotFoundError(f"record id={rec['id']}: video {path} is missing")
    else:
      skipped[path] = "missing"
  if records and not present:
    example = vsibench.video_path(data_dir, records[0])
    raise FileNotFoundError(
        f"none of the {len(records)} videos exist under data_dir={data_dir!r} (expected the layout"
        f" {{data_dir}}/{{dataset}}/{{scene_name}}.mp4, e.g. {example})")
  if skipped:
    logging.warning("VSI-Bench: %d of %d questions skipped: %d video(s) missing (e.g. %s)",
                    len(records) - len(present), len(records), len(skipped), next(iter(skipped)))
  return present, skipped


# ---------------------------------------------------------------------------------------------------
# The evaluation loop.
# ---------------------------------------------------------------------------------------------------


def run(model, tokenizer, *, data_dir, records=None, protocol="spacer", max_new_tokens=None,
        batch_size=8, workdir=None, video_kwargs=None, prompt_buckets=prompts.DEFAULT_BUCKETS,
        mesh=None, params=None, cache_dtype=None, vision_budget=None, name="model",
        allow_missing_videos=True, max_items=0, num_workers=2, progress=True, run_info=None,
        repetition_penalty=1.0):
  """Evaluates `model` on a VSI-Bench-format split; returns the scores (x100).

  The trainer calls this every `eval_every_steps` with its current weights:
    scores = evaluate.run(model, tokenizer, data_dir=heldout_dir, protocol="spacer",
                          max_new_tokens=256, batch_size=8, mesh=mesh,
                          params=tree_utils.to_state(state["params"], paths),
                          workdir=f"{workdir}/eval/step_{step}", progress=False)
    writer.write_scalars(step, evaluate.scalars(scores, prefix="eval/"))
  (`workdir=None` keeps nothing on disk.) Rows are sharded over the data/fsdp axes of `mesh`. In a
  multi-process job every process calls `run` with the same arguments: each batch of `batch_size`
  questions is split over the processes (each decodes only its own videos), the sampler runs the
  global batch, every process scores its rows, and the scored items are gathered to all processes;
  process 0 alone writes the files, and every process returns the same result.

  Args:
    model: a `qwen2_5_vl.Qwen2_5_VL` (its graph; weights from `params` if given).
    tokenizer: `spacer_jax.data.tokenizer.Tokenizer` matching the model's special ids.
    data_dir: VSI-Bench directory (annotation file + `{dataset}/{scene_name}.mp4`).
    records: validated records (`vsibench.load_records(data_dir)`); loaded from data_dir when None.
    protocol: "spacer" (SpaceR-Eval) or "official" (VSI-Bench release), see `spacer_jax.vsibench`.
    max_new_tokens: generation budget; None = the protocol's default (1024 / 16).
    batch_size: prompts per sampler call (make it a multiple of the device count to shard rows).
    workdir: when given, predictions.jsonl / metrics.json / table.md are written there and finished
      items of an earlier run are skipped; None keeps everything in memory (nothing is resumed).
    video_kwargs: frame/pixel settings for `video.load_video` (fps, min_frames, max_frames, nframes,
      min_pixels, max_pixels, total_pixels, second_per_grid_t).
    prompt_buckets: left-padding length buckets (a compile per bucket used).
    mesh: device mesh; rows are sharded over its data/fsdp axes (params keep their sharding).
    params: optional nnx.State to sample with instead of the model's own weights.
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    vision_budget: static vision patch budgets forwarded to the sampler (no recompile across grids).
    name: row label of the table.
    allow_missing_videos: False raises on the first missing video instead of skipping it.
    max_items: evaluate only the first N records (0 = all); for smoke runs.
    num_workers: threads decoding the next batch's videos while the model runs.
    progress: show a tqdm progress bar.
    repetition_penalty: greedy decoding with transformers' repetition penalty (1.0 = off).
    run_info: extra settings identifying the run (evaluate() passes model_dir, dtype, ...). With
      `workdir`, they are written to run_info.json together with protocol, max_new_tokens, data_dir
      and video_kwargs; resuming with any of them changed raises instead of mixing two runs.

  Returns:
    dict with "overall" (float x100 or None), "tasks" {task: x100}, "per_type" {question_type: x100},
    "counts" {question_type: n}, "num_scored", "num_records", "skipped" {video path: reason},
    "num_skipped" (questions on skipped videos),
    "protocol", "max_new_tokens", "seconds".
  """
  if protocol not in vsibench.PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}; choose one of {vsibench.PROTOCOLS}")
  t0 = time.time()
  max_new_tokens = int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS[protocol])
  if records is None:
    records = vsibench.load_records(data_dir)
  if max_items:
    records = records[:max_items]

  present, skipped = find_videos(data_dir, records, allow_missing_videos)
  num_skipped = len(records) - len(present)  # questions on skipped videos

  modeling.check_tokenizer(tokenizer, model.config, where="config.tokenizer_dir")
  # Multi-process (spacer_jax/distributed.py): process 0 owns the files; each batch of batch_size
  # questions is split over the processes, process i decoding and scoring rows
  # [i*batch_size/N, (i+1)*batch_size/N) of it, and the scored items are gathered to all.
  primary, nproc = distributed.is_primary(), jax.process_count()
  if batch_size % nproc:
    raise ValueError(f"batch_size={batch_size} does not split over {nproc} processes")
  per_process = batch_size // nproc
  error = None
  if workdir and primary:
    try:
      check_run_info(workdir, dict(run_info or {}, protocol=protocol, max_new_tokens=max_new_tokens,
                                   repetition_penalty=float(repetition_penalty),
                                   data_dir=os.path.abspath(data_dir),
                                   video_kwargs=video_kwargs or {}))
    except ValueError as e:
      error = str(e)
  error = distributed.broadcast_object(error)
  if error:
    raise ValueError(error)
  preds = (vsibench.PredictionsFile(os.path.join(workdir, "predictions.jsonl"), protocol)
           if workdir and primary else None)
  done = distributed.broadcast_object(dict(preds.done) if preds else {})
  todo = [rec for rec in present if rec["id"] not in done]
  sampler = sampling.Sampler(model, temperature=0.0, mesh=mesh, cache_dtype=cache_dtype,
                             vision_budget=vision_budget, repetition_penalty=repetition_penalty)

  # Questions are grouped by video (VSI-Bench asks ~18 questions per scene), so each video is
  # decoded once per batch that uses it and the decoded clip is shared by its questions.
  todo.sort(key=lambda rec: vsibench.video_path(data_dir, rec))
  bar = tqdm.tqdm(total=len(present), initial=len(present) - len(todo), desc=f"VSI-Bench {name}",
                  unit="q", disable=not (progress and primary), dynamic_ncols=True)
  chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  # This process's rows of each chunk; a process left without any repeats the chunk's last item
  # (what make_batch pads with), its output unused.
  me = jax.process_index()
  mine = [chunk[me * per_process:(me + 1) * per_process] or [dict(chunk[-1], _filler=True)]
          for chunk in chunks]

  def submit(pool, chunk, previous):
    """{video path: future} for a chunk, reusing the previous chunk's futures."""
    futures = {}
    for rec in chunk:
      path = vsibench.video_path(data_dir, rec)
      if path not in futures:
        futures[path] = previous.get(path) or pool.submit(_load_video, path, video_kwargs)
    return futures

  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      pending = submit(pool, mine[0], {}) if chunks else {}
      for i in range(len(chunks)):
        current = pending
        # Decode the next batch's videos while this one runs on the device.
        pending = submit(pool, mine[i + 1], current) if i + 1 < len(chunks) else {}
        loaded = [(rec, path, *current[path].result())
                  for rec in mine[i] for path in [vsibench.video_path(data_dir, rec)]]
        items, failed = [], {}
        for rec, path, vis, reason in loaded:
          if vis is None:
            if not rec.get("_filler"):
              failed[rec["id"]] = (path, reason)
          else:
            items.append((rec, vis))
        if nproc > 1 and any(distributed.allgather_objects(bool(items))) and not items:
          # Other processes have rows to run: take part with a one-token placeholder video.
          items = [(dict(mine[i][0], _filler=True), _placeholder_video(model.config))]
        scored = []
        if items:
          batch = make_batch(items, tokenizer, protocol, per_process, prompt_buckets)
          out = sampler(batch.pop("input_ids"), batch.pop("attention_mask"),
                        max_new_tokens=max_new_tokens, params=params, **batch)
          rows = distributed.process_rows(batch_size)
          tokens = distributed.to_host(out.tokens)[rows]
          lengths = distributed.to_host(out.lengths)[rows]
          for b, (rec, _) in enumerate(items):
            if rec.get("_filler"):
              continue
            output = tokenizer.decode(tokens[b, :lengths[b]], skip_special_tokens=True)
            answer, score = vsibench.parse_and_score(protocol, rec["question_type"], output,
                                                     rec["ground_truth"])
            scored.append({"id": rec["id"], "question_type": rec["question_type"],
                           "dataset": rec["dataset"], "scene_name": rec["scene_name"],
                           "ground_truth": rec["ground_truth"], "output": output,
                           "answer": answer, "score": score, "num_tokens": int(lengths[b])})
        for part_scored, part_failed in distributed.allgather_objects((scored, failed)):
          for path, reason in part_failed.values():
            skipped[path] = reason
            num_skipped += 1
          for item in part_scored:
            if preds:
              preds.add(item)
            else:
              item["protocol"] = protocol
            done[item["id"]] = item
          bar.update(len(part_scored) + len(part_failed))
  finally:
    bar.close()
    if preds:
      preds.close()

  ids = {rec["id"] for rec in records}
  scored = [done[rec["id"]] for rec in present if rec["id"] in done]
  extra = len(set(done) - ids)
  if extra:
    logging.warning("VSI-Bench: %d predictions in %s belong to no record of %s; ignored", extra,
                    workdir, data_dir)
  agg = vsibench.aggregate(scored)
  result = {
      "overall": None if agg["overall"] is None else 100.0 * agg["overall"],
      "tasks": {k: 100.0 * v for k, v in agg["tasks"].items()},
      "per_type": {k: 100.0 * v for k, v in agg["per_type"].items()},
      "counts": agg["counts"],
      "num_scored": agg["num_scored"],
      "num_records": len(records),
      "skipped": dict(sorted(skipped.items())),
      "num_skipped": num_skipped,
      "protocol": protocol,
      "max_new_tokens": max_new_tokens,
      "seconds": time.time() - t0,
  }
  if workdir and primary:
    table = vsibench.render_table(agg, name=name, num_records=len(records), protocol=protocol,
                                  skipped_videos=[f"{p} ({r})" for p, r in sorted(skipped.items())],
                                  num_skipped=num_skipped)
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(table)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(dict(result, data_dir=data_dir, name=name), f, indent=2)
  return result


def _placeholder_video(cfg):
  """A black 2-frame video of one merged token: the rows a process runs when all its videos of a
  batch failed to load while other processes' did not (its output is dropped)."""
  m = cfg.spatial_merge_size
  dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
  return video_lib.VisionInput(np.zeros((m * m, dim), np.float32), np.asarray([1, m, m], np.int64),
                               video_lib.SPACER_SECOND_PER_GRID_T)


def scalars(result, prefix="vsibench/"):
  """Flat {name: float} of a `run` result for metric writers / TensorBoard (tasks and overall, x100)."""
  out = {f"{prefix}{k}": v for k, v in result["tasks"].items()}
  if result["overall"] is not None:
    out[f"{prefix}overall"] = result["overall"]
  out[f"{prefix}num_skipped"] = float(result["num_skipped"])
  return out


# ---------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------


def evaluate(config, workdir):
  """Runs the evaluation described by an eval_vsibench config; returns `run`'s result."""
  if not config.data_dir:
    raise ValueError("set --config.data_dir (VSI-Bench directory)")
  if not config.model_dir:
    raise ValueError("set --config.model_dir (HF or trainer checkpoint directory)")
  # Records and videos are checked before the (slow) model load.
  records = vsibench.load_records(config.data_dir)
  if config.max_items:
    records = records[:config.max_items]
  find_videos(config.data_dir, records, config.allow_missing_videos)
  mesh = sharding.make_mesh(config_lib.MESH_PRESETS[config.mesh])
  rules = config_lib.SHARDING_PRESETS[config.mesh]
  # Generation runs under the mesh; the sampler shards rows over data/fsdp and XLA gathers the
  # FSDP-sharded weights.
  model = load_model(config.model_dir, dtype=config.dtype, mesh=mesh, rules=rules)
  tokenizer = tokenizer_lib.load_tokenizer(
      modeling.tokenizer_dir(config.model_dir, config.tokenizer_dir))
  with jax.set_mesh(mesh):
    result = run(model, tokenizer, data_dir=config.data_dir, records=records,
                 protocol=config.protocol, max_new_tokens=config.max_new_tokens,
                 batch_size=config.batch_size, workdir=workdir,
                 video_kwargs=config.video.to_dict(), prompt_buckets=tuple(config.prompt_buckets),
                 mesh=mesh, cache_dtype=config.cache_dtype or None,
                 name=config.name or os.path.basename(os.path.normpath(config.model_dir)),
                 allow_missing_videos=config.allow_missing_videos, max_items=config.max_items,
                 num_workers=config.num_workers, progress=config.progress,
                 repetition_penalty=config.repetition_penalty,
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


if __name__ == "__main__":
  # Flags are defined only when run as a program: train.py imports this module for `run` and defines
  # its own --config/--workdir.
  config_flags.DEFINE_config_file("config", None, "configs/eval_vsibench.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (predictions, metrics, table).")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()
  app.run(main)
