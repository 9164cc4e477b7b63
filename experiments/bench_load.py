"""Checkpoint loading: what the validation and the NaN/inf check cost (issue 11).

  PYTHONPATH=. .venv/bin/python experiments/bench_load.py [--reps 5] [--dtype float32|bfloat16]
      [--devices 1|8]

A ~55M-parameter Qwen2.5-VL (the text decoder of docs/performance.md: hidden 512, 8 layers, 8/2
heads, MLP 1408, vocabulary 32000, untied head; plus a 4-block vision tower of width 256) with
random weights is saved once with save_hf (sharded at 100 MB) in the chosen dtype, then loaded with
`qwen2_5_vl.load_hf` in three ways, interleaved in a rotating order, medians of --reps:

  check    the loader as shipped: headers and index validated before any data is read, each shard
           checked for NaN/inf on the host as it is read (hf_weights._check_finite).
  nocheck  the same loader with the per-shard check replaced by a no-op (headers still validated).
  device   nocheck, then the alternative: one jitted `all(isfinite(x))` over every param after
           placement (tree_utils.all_finite), compiled once before timing.

It also sums the time spent inside the host check during each checked load (the most direct
measure: the A/B difference of whole loads is within the noise of a shared machine) and times
`hf_weights.check_checkpoint` (header and index validation) alone. The page cache is
warm after the first load (the files are small), so this measures CPU cost, not disk reads; on a cold
disk the read dominates and both checks are relatively cheaper.

--devices 8 places the params FSDP over 8 simulated CPU devices (XLA_FLAGS set by the script).

Measured 2026-12-04 on the shared 2-core machine with other jobs running (load average 10-16),
--reps 9, one device, warm page cache:
  bfloat16 (121 MB): inside the host check 36 ms per load (4.4% of a 0.81 s load); whole-load A/B
    check 0.81 s / nocheck 0.55 s / device 0.71 s (the spread of single loads, 0.35-1.1 s, is larger
    than the A/B differences); header + index validation 7 ms.
  float32 (241 MB): inside the host check 107 ms (8.9% of a 1.21 s load); A/B 1.21 / 1.07 / 1.37 s;
    validation 10 ms.
  8 devices, bfloat16: A/B 0.72 / 0.66 / 0.72 s (load 9).
The host check itself runs at ~8 GB/s (bf16, exponent-bit test in 1M-element chunks) and ~20 GB/s
(fp32, np.isfinite) on an idle core (2.1 ms and 3.2 ms for 16M elements), far below a disk read; the
on-device alternative needs a compile (seconds on CPU, per model structure) and was not faster here.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--devices", type=int, default=1)
  return p.parse_args()


def main():
  a = _parse()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spacer_jax import config_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax import sharding  # pylint: disable=g-import-not-at-top
  from spacer_jax import tree_utils  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import hf_weights  # pylint: disable=g-import-not-at-top
  from spacer_jax.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top

  v = 32000
  cfg = qwen2_5_vl.tiny(
      vocab_size=v, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
      num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12), vision_depth=4,
      vision_hidden_size=256, vision_num_heads=4, vision_intermediate_size=683, window_size=112,
      fullatt_block_indexes=(1, 3), image_token_id=v - 6, video_token_id=v - 5,
      vision_start_token_id=v - 4, vision_end_token_id=v - 3, bos_token_id=v - 2,
      eos_token_id=(v - 1,), pad_token_id=v - 2)
  dtype = jnp.dtype(a.dtype)
  model = qwen2_5_vl.init_model(cfg, seed=0, dtype=dtype, param_dtype=dtype)
  n = tree_utils.param_count(tree_utils.split_model(model)[1])
  mesh = rules = None
  if a.devices > 1:
    mesh, rules = sharding.make_mesh(config_lib.MESH_FSDP), config_lib.FSDP_RULES
  with tempfile.TemporaryDirectory() as d:
    qwen2_5_vl.save_hf(model, d, max_shard_bytes=100 * 10**6)
    del model
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{n / 1e6:.1f}M params, {a.dtype}, {size / 1e6:.0f} MB on disk, {jax.device_count()} "
          f"device(s), load average {os.getloadavg()[0]:.1f}", flush=True)

    def load():
      m = qwen2_5_vl.load_hf(d, dtype=dtype, mesh=mesh, rules=rules)
      params = tree_utils.split_model(m)[1]
      jax.block_until_ready(params)
      return params

    real_check = hf_weights._check_finite  # pylint: disable=protected-access
    all_finite = jax.jit(tree_utils.all_finite)

    inside = []  # seconds spent inside the host check, per "check" load

    def timed_check(*args):
      t = time.perf_counter()
      real_check(*args)
      inside[-1] += time.perf_counter() - t

    def run(mode):
      if mode == "check":
        inside.append(0.0)
      hf_weights._check_finite = timed_check if mode == "check" else (lambda *_: None)  # pylint: disable=protected-access
      t = time.perf_counter()
      params = load()
      if mode == "device":
        assert bool(all_finite(params))
      return time.perf_counter() - t

    t = time.perf_counter()
    all_finite(load()).block_until_ready()  # warm-up: page cache, jit compile
    print(f"warm-up (first load + all_finite compile) {time.perf_counter() - t:.2f} s", flush=True)
    times = {m: [] for m in ("check", "nocheck", "device")}
    headers = []
    modes = list(times)
    for rep in range(a.reps):
      for mode in modes[rep % 3:] + modes[:rep % 3]:  # rotate the order: no fixed neighbour
        times[mode].append(run(mode))
      t = time.perf_counter()
      hf_weights.check_checkpoint(d)
      headers.append(time.perf_counter() - t)
    hf_weights._check_finite = real_check  # pylint: disable=protected-access
    med = {m: statistics.median(ts) for m, ts in times.items()}
    for m, ts in times.items():
      print(f"{m:8s} median {med[m]:.3f} s  ({', '.join(f'{x:.3f}' for x in ts)})")
    print(f"time inside the host check per load: median {statistics.median(inside) * 1e3:.1f} ms"
          f" ({statistics.median(inside) / med['check']:.1%} of the checked load)")
    print(f"header + index validation alone: median {statistics.median(headers) * 1e3:.2f} ms")
    print(f"host NaN/inf check: {med['check'] / med['nocheck']:.2f}x the load without it "
          f"(+{med['check'] - med['nocheck']:.3f} s); on-device check after placement: "
          f"{med['device'] / med['nocheck']:.2f}x (+{med['device'] - med['nocheck']:.3f} s)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
