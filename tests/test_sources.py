"""SpaceR-151k / cognitive-map / VSI-Bench readers, and bad-input skipping, counting and strict mode."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spacer_jax.data import prompts
from spacer_jax.data import sources


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def _spacer_row(pid, **kw):
  row = {"problem_id": pid, "problem": "How many chair(s) are in this room?", "data_type": "video",
         "problem_type": "numerical", "options": [], "process": "", "solution": "<answer>3</answer>",
         "path": f"videos/scene{pid:04d}_00.mp4", "data_source": "LLaVA-Video"}
  row.update(kw)
  return row


@pytest.fixture
def spacer_dir(tmp_path):
  (tmp_path / "annotation").mkdir()
  _write_jsonl(tmp_path / "annotation" / "cognitive_map.jsonl", [
      {"video_id": "scene0001_00", "cognitive_map": {"table": [[0, 3]], "chair": [[9, 3], [1, 1]]},
       "object_list": ["chair", "table"]},
      {"video_id": "scene0002_00", "cognitive_map": {"bed": [[5, 5]]}, "object_list": []},
  ])
  _write_jsonl(tmp_path / "SpaceR-151k.jsonl", [
      _spacer_row(1, data_source="SR_dataset", problem_type="multiple choice",
                  options=["A. table", "B. chair"], solution="<answer>B</answer>"),
      _spacer_row(2, data_source="SR_dataset"),
      _spacer_row(3, data_type="image", path="imgs/../img.png", problem_type="free-form"),
  ])
  return tmp_path


def test_load_spacer(spacer_dir):
  bad = sources.BadRecords()
  recs = sources.load_spacer(spacer_dir / "SpaceR-151k.jsonl", bad=bad)
  assert bad.total == 0 and [r.id for r in recs] == ["1", "2", "3"]
  r1, r2, r3 = recs
  assert r1.media == str(spacer_dir / "videos" / "scene0001_00.mp4")
  assert r1.cognitive_map == {"table": [[0, 3]], "chair": [[9, 3], [1, 1]]}
  assert r1.categories == ("table", "chair")  # map key order, not object_list
  assert r1.prompt == prompts.spacer_prompt(r1.problem, "multiple choice", ["A. table", "B. chair"], "SR_dataset",
                                            ["table", "chair"])
  assert "['table', 'chair']" in r1.prompt and r1.options == ("A. table", "B. chair")
  assert r2.categories == ("bed",) and r2.solution == "<answer>3</answer>"
  assert r3.media == str(spacer_dir / "imgs/../img.png")  # `..` that stays inside the root is fine
  assert r3.data_type == "image" and r3.cognitive_map is None
  assert "<map>" not in r3.prompt and r3.prompt.endswith(prompts.TYPE_TEMPLATE["free-form"])
  assert sources.video_id("a/b/scene0001_00.mp4") == "scene0001_00"


def test_bad_spacer_records_skipped_counted_and_named(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "d.jsonl", [
      _spacer_row(1),
      "{not json",
      {k: v for k, v in _spacer_row(3).items() if k != "solution"},
      _spacer_row(4, problem_type="yes/no"),
      _spacer_row(5, problem_type="multiple choice", options=None),
      _spacer_row(6, data_source="SR_dataset"),  # no cognitive_map.jsonl at all
      _spacer_row(7, data_type="audio"),
      "[1, 2]",
      _spacer_row(9),
  ])
  bad = sources.BadRecords()
  with caplog.at_level(logging.WARNING, logger="spacer_jax.data.sources"):
    recs = sources.load_spacer(path, bad=bad)
  assert [r.id for r in recs] == ["1", "9"]
  assert bad.counts == {"malformed_json": 2, "missing_field": 1, "unknown_problem_type": 1, "bad_field": 2,
                        "missing_cognitive_map": 1}
  assert bad.metrics()["data/bad_records"] == 7 and bad.metrics()["data/bad_records/bad_field"] == 2
  msgs = [r.getMessage() for r in caplog.records]
  assert len(msgs) == 7  # one warning per skipped record
  assert any("record 'line 2'" in m and str(path) in m and "malformed_json" in m for m in msgs)
  assert any("record '3' " in m and "'solution'" in m and str(path) in m for m in msgs)
  assert any("record '4' " in m and "'yes/no'" in m for m in msgs)
  assert any("record '6' " in m and "'scene0006_00'" in m for m in msgs)


@pytest.mark.parametrize("row,match", [
    ("{not json", r"record 'line 1' in .*d.jsonl: malformed_json"),
    ({"problem_id": 7, "problem": "q"}, r"record '7' in .*d.jsonl: missing_field: missing field\(s\) \['data_type'"),
    (_spacer_row(8, problem_type="counting"), r"record '8' in .*d.jsonl: unknown_problem_type: .*'counting'"),
])
def test_strict_mode_raises_with_detail(tmp_path, row, match):
  path = _write_jsonl(tmp_path / "d.jsonl", [row])
  with pytest.raises(sources.BadRecordError, match=match):
    sources.load_spacer(path, strict=True)


def test_process_kept_and_checked(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [_spacer_row(1, process="<think>hmm</think>"),
                                             _spacer_row(2, process=None),
                                             _spacer_row(3, process=["not", "text"])])
  bad = sources.BadRecords()
  recs = sources.load_spacer(path, bad=bad)
  assert [(r.id, r.process) for r in recs] == [("1", "<think>hmm</think>"), ("2", "")]
  assert bad.counts == {"bad_field": 1}


def test_bad_cognitive_map_lines(tmp_path):
  path = _write_jsonl(tmp_path / "m.jsonl", [{"video_id": "a", "cognitive_map": {"x": [[1, 1]]}},
                                              {"video_id": "b"}, "oops", {"video_id": "c", "cognitive_map": [1]}])
  bad = sources.BadRecords()
  assert sources.load_cognitive_maps(path, bad=bad) == {"a": {"x": [[1, 1]]}}
  assert bad.counts == {"missing_field": 1, "malformed_json": 1, "bad_field": 1}


def test_non_utf8_line_is_a_bad_record_naming_file_and_line(tmp_path, caplog):
  path = tmp_path / "d.jsonl"
  rows = [json.dumps(_spacer_row(1)).encode(), b'{"problem_id": 2, "problem": "caf\xe9"}',
          b"\xff\xfe", json.dumps(_spacer_row(4)).encode()]
  path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")  # a BOM before line 1 is fine
  bad = sources.BadRecords()
  with caplog.at_level(logging.WARNING, logger="spacer_jax.data.sources"):
    assert [r.id for r in sources.load_spacer(path, bad=bad)] == ["1", "4"]
  assert bad.counts == {"not_utf8": 2}
  msgs = [r.getMessage() for r in caplog.records]
  assert any(f"record 'line 2' in {path}: not_utf8: byte b'\\xe9' at column 34" in m for m in msgs), msgs
  assert any(f"record 'line 3' in {path}: not_utf8: byte b'\\xff' at column 1" in m for m in msgs), msgs
  maps = tmp_path / "m.jsonl"
  maps.write_bytes(b'{"video_id": "a", "cognitive_map": {}}\n{"video_id": "\x80"}\n')
  bad = sources.BadRecords()
  assert sources.load_cognitive_maps(maps, bad=bad) == {"a": {}}
  assert bad.counts == {"not_utf8": 1}
  with pytest.raises(sources.BadRecordError, match=r"record 'line 2' in .*m.jsonl: not_utf8"):
    sources.load_cognitive_maps(maps, strict=True)


def test_iter_jsonl_yields_line_numbers(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"a": 1}\r\n\n  \n{"a": 2}\n[3]\n{"a": 4}')  # CRLF, blanks, no final newline
  bad = sources.BadRecords()
  assert list(sources.iter_jsonl(path, bad)) == [(1, {"a": 1}), (4, {"a": 2}), (6, {"a": 4})]
  assert bad.counts == {"malformed_json": 1}


def test_media_paths_stay_inside_the_media_root(tmp_path, caplog):
  root = tmp_path / "data"
  (root / "videos").mkdir(parents=True)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "x.mp4").write_bytes(b"secret")
  (root / "videos" / "out.mp4").symlink_to(outside / "x.mp4")
  (root / "videos" / "in.mp4").write_bytes(b"fine")
  (root / "alias").symlink_to(root / "videos")  # a symlink that stays inside is fine
  path = _write_jsonl(root / "d.jsonl", [
      _spacer_row(1, path="videos/in.mp4"),
      _spacer_row(2, path="../outside/x.mp4"),
      _spacer_row(3, path="videos/../../outside/x.mp4"),
      _spacer_row(4, path=str(outside / "x.mp4")),
      _spacer_row(5, path="videos/out.mp4"),
      _spacer_row(6, path="alias/in.mp4"),
      _spacer_row(7, path="videos/\x00.mp4"),
  ])
  bad = sources.BadRecords()
  with caplog.at_level(logging.WARNING, logger="spacer_jax.data.sources"):
    recs = sources.load_spacer(path, bad=bad)
  assert [r.id for r in recs] == ["1", "6"]
  assert bad.counts == {"media_outside_root": 3, "absolute_media_path": 1, "bad_field": 1}
  msgs = [r.getMessage() for r in caplog.records]
  assert any("record '2'" in m and "'../outside/x.mp4' resolves to" in m and "allow_media_outside_root" in m
             for m in msgs), msgs
  assert any("record '4'" in m and "is absolute" in m for m in msgs), msgs
  with pytest.raises(sources.BadRecordError, match=r"record '2' in .*d.jsonl: media_outside_root"):
    sources.load_spacer(path, strict=True)
  # The switch for datasets laid out that way: everything but the NUL byte is accepted.
  bad = sources.BadRecords()
  recs = sources.load_spacer(path, bad=bad, allow_media_outside_root=True)
  assert [r.id for r in recs] == ["1", "2", "3", "4", "5", "6"] and bad.counts == {"bad_field": 1}
  assert recs[3].media == str(outside / "x.mp4")
  # The root itself may be a symlink (a dataset mounted elsewhere).
  (tmp_path / "link_root").symlink_to(root)
  recs = sources.load_spacer(path, media_root=tmp_path / "link_root")
  assert [r.id for r in recs] == ["1", "6"]


def test_bad_records_counted_once_per_key(caplog):
  bad = sources.BadRecords()
  with caplog.at_level(logging.WARNING, logger="spacer_jax.data.sources"):
    for _ in range(3):  # three passes over the same two bad records
      bad.report("media", "a", "f.jsonl", "broken", key=0)
      bad.report("media", "b", "f.jsonl", "broken", key=7)
  assert bad.metrics() == {"data/bad_records": 2, "data/bad_records/media": 2}
  assert len(caplog.records) == 2
  fresh = sources.BadRecords()
  fresh.set_state(json.loads(json.dumps(bad.get_state())))
  fresh.report("media", "a", "f.jsonl", "broken", key=0)
  fresh.report("prompt_too_long", "c", "f.jsonl", "long", key=3)
  assert fresh.counts == {"media": 2, "prompt_too_long": 1}


VSI_ROWS = [
    {"id": 0, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_rel_direction_easy",
     "question": "Where is the sofa?", "options": ["A. left", "B. right", "C. back"], "ground_truth": "B"},
    {"id": 1, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_counting",
     "question": "How many chair(s) are in this room?", "options": None, "ground_truth": "4"},
]


@pytest.mark.parametrize("fmt", ["parquet", "json", "jsonl"])
def test_load_vsibench_formats(tmp_path, fmt):
  path = tmp_path / f"test.{fmt}"
  if fmt == "parquet":
    pq.write_table(pa.Table.from_pylist(VSI_ROWS), path)
  elif fmt == "json":
    path.write_text(json.dumps(VSI_ROWS))
  else:
    _write_jsonl(path, VSI_ROWS)
  recs = sources.load_vsibench(path, video_root=tmp_path / "vids")
  assert [r.id for r in recs] == ["0", "1"]
  mc, na = recs
  assert mc.media == str(tmp_path / "vids" / "scannet" / "scene0011_00.mp4")
  assert na.media == str(tmp_path / "vids" / "arkitscenes" / "41069025.mp4")
  assert mc.problem_type == "multiple choice" and na.problem_type == "numerical"
  assert mc.options == ("A. left", "B. right", "C. back") and na.options == ()
  assert mc.solution == "<answer>B</answer>" and na.ground_truth == "4"
  assert mc.prompt == prompts.vsibench_prompt("Where is the sofa?", "object_rel_direction_easy",
                                              ["A. left", "B. right", "C. back"])
  assert mc.categories == prompts.VSI_CATEGORIES and mc.question_type == "object_rel_direction_easy"
  official = sources.load_vsibench(path, style="official")
  assert official[1].prompt.startswith("These are frames of a video.\nHow many chair(s)")
  assert official[0].media == str(tmp_path / "scannet" / "scene0011_00.mp4")  # default root: file's dir


def test_vsibench_bad_rows(tmp_path):
  rows = VSI_ROWS + [{**VSI_ROWS[0], "id": 2, "question_type": "object_color"},
                     {k: v for k, v in VSI_ROWS[1].items() if k != "scene_name"} | {"id": 3},
                     {**VSI_ROWS[0], "id": 4, "options": []}]
  path = _write_jsonl(tmp_path / "v.jsonl", rows)
  bad = sources.BadRecords()
  assert [r.id for r in sources.load_vsibench(path, bad=bad)] == ["0", "1"]
  assert bad.counts == {"unknown_problem_type": 1, "missing_field": 1, "bad_field": 1}
  with pytest.raises(sources.BadRecordError, match=r"record '2' in .*v.jsonl: unknown_problem_type"):
    sources.load_vsibench(path, strict=True)
