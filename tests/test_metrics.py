"""metrics: memory_scalars (accelerator memory where reported, host peak RSS always), the optional
Weights & Biases writer."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from spacer_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Device:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_memory_scalars_take_the_max_over_devices():
  gib = 2 ** 30
  out = metrics.memory_scalars([
      _Device({"peak_bytes_in_use": 3 * gib, "bytes_in_use": gib, "bytes_limit": 80 * gib}),
      _Device({"peak_bytes_in_use": 5 * gib, "bytes_in_use": 2 * gib, "bytes_limit": 80 * gib})])
  assert out["memory/device_peak_gib"] == 5.0
  assert out["memory/device_in_use_gib"] == 2.0
  assert out["memory/device_limit_gib"] == 80.0
  assert out["memory/host_peak_gib"] > 0


def test_memory_scalars_on_cpu_report_the_host_only():
  out = metrics.memory_scalars()  # XLA:CPU devices return no memory_stats
  assert set(out) == {"memory/host_peak_gib"}
  big = np.ones(64 * 2 ** 20, np.uint8)  # 64 MiB touched: the peak RSS cannot be below it
  big[::4096] = 2
  assert metrics.memory_scalars()["memory/host_peak_gib"] >= 64 / 1024
  assert metrics.memory_scalars([_Device(None)]).keys() == {"memory/host_peak_gib"}


# --------------------------------------------------------------------------------------------------
# Weights & Biases (offline: no network).
def _wandb_records(path):
  """The protobuf Records of a .wandb file (W&B's leveldb-log framing: a 7-byte file header, then
  32 KiB blocks of records, each with a 7-byte header: crc32, length, type full/first/middle/last)."""
  import struct  # pylint: disable=g-import-not-at-top
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:7]
  block, pos, parts, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if length == 0 and kind == 0:  # block padding
      pos += left
      continue
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 2):
      parts = chunk
    else:
      parts += chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(parts)
      out.append(record)
  return out


def test_wandb_offline_logs_the_scalars_the_config_and_a_sample_table(tmp_path):
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  pytest.importorskip("wandb")  # the optional [wandb] part; requirements-test.txt pins it
  wb = dict(project="spacer-test", entity="", name="", tags=("smoke", "ci"), group="", notes="",
            mode="offline")
  config = {"optim": {"lr": 1e-6}, "grpo": {"num_generations": 4}}
  writer = metrics.MetricWriter(str(tmp_path), use_tensorboard=False, wandb=wb, config=config)
  rows = {1: {"train/loss": 0.5, "reward/total": 1.25, "compiles/x": 3, "phase_sft": 0.0},
          2: {"train/loss": 0.25, "reward/total": 1.5, "compiles/x": 3, "phase_sft": 0.0}}
  samples = [{"prompt_id": "a", "sample": 0, "completion": "<answer>3</answer>", "reward_total": 1.0,
              "rewards": {"format": 1.0}},
             {"prompt_id": "b", "sample": 1, "completion": "x", "reward_total": 0.0,
              "rewards": {"format": 0.0}}]
  writer.write(1, rows[1])
  writer.write_samples(1, samples, num_text=2)
  writer.write(2, rows[2])
  writer.close()

  run_id = (tmp_path / metrics.WandbWriter.ID_FILE).read_text().strip()
  found = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}*" / f"run-{run_id}.wandb"))
  assert len(found) == 1, (run_id, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")))
  (run_file,) = found
  records = _wandb_records(run_file)
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert (run.project, run.display_name, list(run.tags)) == ("spacer-test", tmp_path.name,
                                                             ["smoke", "ci"])
  logged_config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert logged_config["optim"] == {"lr": 1e-6} and logged_config["grpo"] == {"num_generations": 4}
  history = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history.setdefault(items.pop("_step"), {}).update(items)
  for step, row in rows.items():
    assert {k: history[step][k] for k in row} == row  # the same scalars as metrics.jsonl
  assert history[1]["rollouts/samples/_type"] == "table-file"
  table = json.loads((pathlib.Path(run_file).parent / "files" /
                      history[1]["rollouts/samples/path"]).read_text())
  assert table["columns"] == ["prompt_id", "sample", "completion", "reward_total", "rewards"]
  assert table["data"][0] == ["a", 0, "<answer>3</answer>", 1.0, '{"format": 1.0}']

  # A resumed run (same workdir) keeps the W&B run id.
  metrics.MetricWriter(str(tmp_path), start_step=3, use_tensorboard=False, wandb=wb).close()
  assert len(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}*"))) == 2


def test_without_a_wandb_project_wandb_is_never_imported(tmp_path):
  code = ("import sys; from spacer_jax import metrics; "
          f"w = metrics.MetricWriter({str(tmp_path)!r}, use_tensorboard=False, "
          "wandb=dict(project='', mode='offline')); w.write(1, {'a': 1.0}); w.close(); "
          "assert 'wandb' not in sys.modules, 'wandb imported'")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-2000:]
