"""grain pipeline: batch shapes/dtypes, determinism, checkpoint/restore, bad input counting, workers."""

import json

import jax
import numpy as np
import PIL.Image
import pytest

from spacer_jax.data import pipeline
from spacer_jax.data import prompts
from spacer_jax.data import sources
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.data import video
from tests.media import make_mp4

# Tiny budgets: 56x84 clips resize to 56x84 (4x6 patches), images to <= 8 patches per side.
CFG = pipeline.DataConfig(
    batch_size=2, buckets=(128, 256, 512), video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 8,
    image_min_pixels=28 * 28, image_max_pixels=28 * 28 * 16, max_frames=8, prefetch_batches=0)


def _row(pid, path, **kw):
  return {"problem_id": pid, "problem": f"How many chair(s) are in room {pid}?", "data_type": "video",
          "problem_type": "numerical", "options": [], "solution": "<answer>2</answer>", "path": path,
          "data_source": "LLaVA-Video", **kw}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("pipe")
  good = []
  for i in range(6):
    make_mp4(d / "v" / f"clip{i}.mp4", frames=6 + 2 * i, seed=i)
    good.append(_row(i, f"v/clip{i}.mp4", process=f"<think>room {i}</think>" if i == 1 else ""))
  PIL.Image.fromarray(np.random.default_rng(9).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(d / "img.png")
  good.append(_row(6, "img.png", data_type="image", problem_type="multiple choice", options=["A. 1", "B. 2"],
                   solution="<answer>B</answer>"))
  blob = (d / "v" / "clip5.mp4").read_bytes()
  (d / "v" / "truncated.mp4").write_bytes(blob[: len(blob) // 3])
  (d / "v" / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  (d / "bad.png").write_bytes(b"not an image at all")
  PIL.Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(d / "thin.png")
  bad = [
      _row(100, "v/missing.mp4"),
      _row(101, "v/truncated.mp4"),
      _row(102, "v/garbage.mp4"),
      _row(103, "bad.png", data_type="image"),
      _row(104, "thin.png", data_type="image"),  # aspect ratio 250 > 200
      _row(105, "v/clip0.mp4", problem="word " * 600),  # > largest bucket (512)
  ]
  lines = [json.dumps(r) for r in good[:3] + bad[:3]] + ["{broken json"] + [json.dumps(r) for r in good[3:] + bad[3:]]
  (d / "d.jsonl").write_text("\n".join(lines) + "\n")
  return d


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.build_offline_tokenizer()


def _records(data, bad=None):
  return sources.load_spacer(data / "d.jsonl", bad=bad)


def _take(it, n):
  out = [next(it) for _ in range(n)]
  return out


def _same_batch(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      assert a[k] == b[k], k


def _iter(records, tok, seed=0, **kw):
  cfg = pipeline.DataConfig(**{**CFG.__dict__, **kw})
  return pipeline.make_iterator(records, tok, cfg, seed=seed, process_index=0, process_count=1)


def test_batch_shapes_dtypes_and_content(data, tok):
  recs = [r for r in _records(data) if int(r.id) < 7]
  it = _iter(recs, tok, num_epochs=1, shuffle=False, drop_remainder=False)
  batches = list(it)
  assert len(batches) == 4  # 7 records, batch 2, last one padded
  pv, pi = pipeline.patch_budgets(pipeline.DataConfig(**{**CFG.__dict__}))
  # Video: 8 frames -> 4 temporal patches x (6272 px / 14^2 = 32) patches; image: 12544 / 14^2 = 64.
  assert (pv, pi) == (4 * 32, 64)
  for b in batches:
    assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] in CFG.buckets
    assert b["pixel_values_videos"].shape == (2 * pv, 1176) and b["pixel_values_videos"].dtype == np.float32
    assert b["pixel_values"].shape == (2 * pi, 1176)
    assert b["video_grid_thw"].dtype == np.int64 and b["second_per_grid_ts"].dtype == np.float32
    assert b["valid"].dtype == bool
    for row, ok in enumerate(b["valid"]):
      if not ok:
        assert b["attention_mask"][row].sum() == 0 and b["id"][row] is None
        continue
      mask = b["attention_mask"][row]
      assert mask[-1] == 1 and np.all(np.diff(mask) >= 0)  # left padded
      assert np.all(b["input_ids"][row][mask == 0] == tok.pad_token_id)
    n_vid = int((b["input_ids"] == tok.video_token_id).sum())
    assert n_vid == int(np.prod(b["video_grid_thw"], axis=-1).sum()) // 4
    n_img = int((b["input_ids"] == tok.image_token_id).sum())
    assert n_img == int(np.prod(b["image_grid_thw"], axis=-1).sum()) // 4
    np.testing.assert_array_equal(b["second_per_grid_ts"], np.ones(len(b["video_grid_thw"])))
  first = batches[0]
  assert first["id"] == ["0", "1"] and first["problem_type"] == ["numerical", "numerical"]
  assert first["solution"] == ["<answer>2</answer>"] * 2 and first["data_source"] == ["LLaVA-Video"] * 2
  assert first["process"] == ["", "<think>room 1</think>"]
  # Rows are the video module's output for each clip, concatenated, then zeros.
  v0 = video.load_video(recs[0].media, read_kwargs=dict(max_frames=8),
                        min_pixels=CFG.video_min_pixels, max_pixels=CFG.video_max_pixels)
  v1 = video.load_video(recs[1].media, read_kwargs=dict(max_frames=8),
                        min_pixels=CFG.video_min_pixels, max_pixels=CFG.video_max_pixels)
  n0, n1 = len(v0.pixel_values), len(v1.pixel_values)
  np.testing.assert_array_equal(first["pixel_values_videos"][:n0], v0.pixel_values)
  np.testing.assert_array_equal(first["pixel_values_videos"][n0:n0 + n1], v1.pixel_values)
  assert not first["pixel_values_videos"][n0 + n1:].any()
  np.testing.assert_array_equal(first["video_grid_thw"], [v0.grid_thw, v1.grid_thw])
  # Tokens are the chat-templated prompt with the span expanded.
  want = prompts.encode_prompt(tok, recs[0].prompt, "video", video_grid_thw=[v0.grid_thw])
  np.testing.assert_array_equal(first["input_ids"][0][first["attention_mask"][0] == 1], want)
  img_batch = [b for b in batches if "image" in b["data_type"]][0]
  assert len(img_batch["image_grid_thw"]) == 1 and img_batch["pixel_values"].any()


def test_same_seed_same_batches(data, tok):
  recs = _records(data)
  a = _take(_iter(recs, tok, seed=3), 4)
  b = _take(_iter(recs, tok, seed=3), 4)
  for x, y in zip(a, b):
    _same_batch(x, y)
  c = _take(_iter(recs, tok, seed=4), 4)
  assert [x["id"] for x in a] != [x["id"] for x in c]


def test_checkpoint_restore_resumes_at_same_element(data, tok):
  recs = _records(data)
  it = _iter(recs, tok, seed=1)
  _take(it, 2)
  state = it.get_state()
  json.dumps(state)  # plain, serialisable (orbax stores it as JSON)
  want = _take(it, 4)  # crosses an epoch boundary (13 records, 7 good per epoch)
  fresh = _iter(recs, tok, seed=1)
  fresh.set_state(state)
  got = _take(fresh, 4)
  for x, y in zip(want, got):
    _same_batch(x, y)


def test_bad_input_skipped_and_counted(data, tok, caplog):
  load_bad = sources.BadRecords()
  recs = _records(data, load_bad)
  assert load_bad.counts == {"malformed_json": 1}
  caplog.clear()
  with caplog.at_level("WARNING", logger="spacer_jax.data.sources"):
    batches = list(_iter(recs, tok, num_epochs=1, shuffle=False, drop_remainder=False))
  ids = [i for b in batches for i in b["id"] if i is not None]
  assert sorted(ids, key=int) == [str(i) for i in range(7)]  # every good record, exactly once
  counts = batches[-1]["bad_records"]
  assert counts == {"data/bad_records": 6, "data/bad_records/media": 5, "data/bad_records/prompt_too_long": 1}
  msgs = [r.getMessage() for r in caplog.records]
  assert len(msgs) == 6
  for rid, what in (("100", "missing.mp4"), ("101", "truncated.mp4"), ("102", "garbage.mp4"), ("103", "bad.png"),
                    ("104", "thin.png"), ("105", "prompt has")):
    assert any(f"record '{rid}' in {data / 'd.jsonl'}" in m and what in m for m in msgs), (rid, msgs)
  assert any("aspect ratio" in m for m in msgs)


WANT_BAD = {"data/bad_records": 6, "data/bad_records/media": 5, "data/bad_records/prompt_too_long": 1}


def test_bad_records_counted_once_across_epochs(data, tok, caplog):
  """Three passes over 6 bad records: 6 warnings and data/bad_records = 6, also through a
  checkpoint of the iterator taken in the second epoch (workers: test_two_workers_same_batches)."""
  recs = _records(data)
  caplog.clear()  # the malformed line, reported at load
  with caplog.at_level("WARNING", logger="spacer_jax.data.sources"):
    it = _iter(recs, tok, seed=3, num_epochs=3, drop_remainder=False)
    batches = _take(it, 5)  # 7 good records per epoch, batch 2: into the second epoch
    state = it.get_state()
    json.dumps(state)
    batches += list(it)
  assert sum(bool(v) for b in batches for v in b["valid"]) == 21  # 3 epochs x 7 good records
  assert batches[-1]["bad_records"] == WANT_BAD
  assert len(caplog.records) == 6
  fresh = _iter(recs, tok, seed=3, num_epochs=3)
  fresh.set_state(state)
  assert list(fresh)[-1]["bad_records"] == WANT_BAD


def test_strict_mode_raises(data, tok):
  with pytest.raises(sources.BadRecordError, match=r"record '100' in .*d.jsonl: media: .*missing.mp4"):
    list(_iter(_records(data), tok, num_epochs=1, shuffle=False, strict=True))


def test_temporal_copy_is_seeded_frame_permutation(data, tok):
  colors = [(10 * k, 255 - 20 * k, 60) for k in range(8)]
  path = make_mp4(data / "colors.mp4", frames=8, colors=colors)
  rec = sources.Record(id="c", source_file="mem", data_type="video", media=str(path), prompt="Q",
                       problem="Q", problem_type="numerical")
  b = next(_iter([rec, rec], tok, seed=7, temporal=True, shuffle=False))
  clip = video.read_video(str(path), max_frames=8)
  kw = dict(min_pixels=CFG.video_min_pixels, max_pixels=CFG.video_max_pixels)
  for index in (0, 1):  # element index seeds the permutation
    perm = np.random.default_rng([7, index]).permutation(len(clip.frames))
    want = video.preprocess_video(clip.frames[perm], **kw).pixel_values
    n = len(want)
    np.testing.assert_array_equal(b["pixel_values_videos_shuffled"][index * n:(index + 1) * n], want)
  n = len(want)
  assert not np.array_equal(b["pixel_values_videos_shuffled"][:n], b["pixel_values_videos"][:n])


def _process_iters(records, tok, count, rows, seed=0, **kw):
  """The iterators of `count` processes with `rows` rows each (one global batch = count * rows)."""
  cfg = pipeline.DataConfig(**{**CFG.__dict__, "batch_size": rows, "temporal": True, **kw})
  return [pipeline.make_iterator(records, tok, cfg, seed=seed, process_index=i, process_count=count)
          for i in range(count)]


def _global(batches):
  """Row-concatenation of one batch per process: ids, prompts (unpadded) and per-row pixels."""
  out = {"id": [x for b in batches for x in b["id"]], "prompts": [], "pixels": [], "shuffled": []}
  for b in batches:
    sizes = np.prod(b["video_grid_thw"], axis=-1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for row in range(len(b["id"])):
      out["prompts"].append(b["input_ids"][row][b["attention_mask"][row] == 1].tolist())
      out["pixels"].append(b["pixel_values_videos"][starts[row]:starts[row + 1]])
      out["shuffled"].append(b["pixel_values_videos_shuffled"][starts[row]:starts[row + 1]])
  return out


def _same_global(a, b):
  assert a["id"] == b["id"] and a["prompts"] == b["prompts"]
  for key in ("pixels", "shuffled"):  # the temporal permutation follows the global position
    for x, y in zip(a[key], b[key]):
      np.testing.assert_array_equal(x, y)


def test_processes_read_the_single_process_batches(data, tok):
  """Process i of N reads rows [i*b, (i+1)*b) of every global batch one process would read."""
  recs = [r for r in _records(data) if int(r.id) < 6]  # good videos only (a bad one is refilled
  (one,) = _process_iters(recs, tok, 1, 4)              # from its own process's stream)
  two = _process_iters(recs, tok, 2, 2)
  for _ in range(3):  # crosses an epoch (6 records, global batch 4)
    _same_global(_global([next(one)]), _global([next(it) for it in two]))


def test_iterator_state_resumes_with_another_process_count(data, tok):
  recs = [r for r in _records(data) if int(r.id) < 6]
  (one,) = _process_iters(recs, tok, 1, 4, seed=3)
  want = [_global([next(one)]) for _ in range(4)]
  two = _process_iters(recs, tok, 2, 2, seed=3)
  for _ in range(2):
    [next(it) for it in two]
  states = [json.loads(json.dumps(it.get_state())) for it in two]  # through JSON, as checkpointed
  (resumed,) = _process_iters(recs, tok, 1, 4, seed=3)
  resumed.set_process_states(states)
  _same_global(_global([next(resumed)]), want[2])
  # ... and back: the one-process state after batch 3 restored into two processes.
  regrown = _process_iters(recs, tok, 2, 2, seed=3)
  single = json.loads(json.dumps(resumed.get_state()))
  for it in regrown:
    it.set_process_states([single])
  _same_global(_global([next(it) for it in regrown]), want[3])
  with pytest.raises(ValueError, match="set_process_states"):
    regrown[0].set_state(single)


def test_two_workers_same_batches(data, tok, caplog):
  """Worker processes give the in-process batches, and bad records met by different workers in
  different epochs are warned about and counted once (the count lives in the main process)."""
  recs = _records(data)
  ref = list(_iter(recs, tok, seed=5, num_workers=0, num_epochs=3))
  caplog.clear()
  it = _iter(recs, tok, seed=5, num_workers=2, num_epochs=3)
  try:
    got = list(it)
  finally:
    it.close()
  assert len(got) == len(ref) == 10  # 21 good elements, batch 2, remainder dropped
  for x, y in zip(ref, got):
    _same_batch(x, y)
  assert got[-1]["bad_records"] == WANT_BAD
  assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 6


@pytest.mark.slow
def test_two_workers_restore(data, tok):
  recs = _records(data)
  ref = _take(_iter(recs, tok, seed=5, num_workers=0), 5)
  it = _iter(recs, tok, seed=5, num_workers=2)
  try:
    _take(it, 2)
    state = it.get_state()
    json.dumps(state)
  finally:
    it.close()
  it = _iter(recs, tok, seed=5, num_workers=2)
  try:
    it.set_state(state)
    for x, y in zip(ref[2:], _take(it, 3)):
      _same_batch(x, y)
  finally:
    it.close()


def test_orbax_checkpoint_round_trip(data, tok, tmp_path):
  """The iterator state goes through orbax with grain's handler (what checkpoint.py saves)."""
  import grain
  import orbax.checkpoint as ocp

  recs = _records(data)
  it = _iter(recs, tok, seed=2)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                             item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 3)
    fresh = _iter(recs, tok, seed=2)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for x, y in zip(want, _take(fresh, 3)):
    _same_batch(x, y)


def test_sft_batch_trains_on_process_then_solution(tok):
  """sft_target="process": completion = the record's chain of thought + solution + <|im_end|>; rows
  without a trace fall back to the solution and are counted (padding rows are not)."""
  from spacer_jax import rollout  # pylint: disable=g-import-not-at-top
  from spacer_jax import sampling  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  sampler = sampling.Sampler(qwen2_5_vl.init_model(qwen2_5_vl.tiny()))
  batch = {"input_ids": np.array([[5, 6, 7], [0, 8, 9], [0, 0, 4]], np.int32),
           "attention_mask": np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], np.int32),
           "solution": ["<answer>2</answer>", "<answer>B</answer>", None],
           "process": ["<think>two chairs</think>", "", None], "valid": [True, True, False],
           "id": ["a", "b", None]}
  tb, metrics, samples = rollout.sft_batch(sampler, batch, tokenizer=tok, max_new_tokens=48,
                                           target="process")
  assert [s["target"] for s in samples[:2]] == ["<think>two chairs</think><answer>2</answer>",
                                                "<answer>B</answer>"]
  want = tok.encode("<think>two chairs</think><answer>2</answer>") + [tok.eos_token_id]
  np.testing.assert_array_equal(tb["completion_ids"][0, :len(want)], want)
  assert tb["completion_mask"][0].sum() == len(want)
  assert metrics["sft/empty_process_frac"] == 0.5
  _, plain, _ = rollout.sft_batch(sampler, batch, tokenizer=tok, max_new_tokens=48)
  assert "sft/empty_process_frac" not in plain
