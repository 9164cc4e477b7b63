"""metrics.memory_scalars: accelerator memory where reported, host peak RSS always."""

import numpy as np

from spacer_jax import metrics


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
