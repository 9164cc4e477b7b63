"""CPU cost of the deterministic x264 setting: the demo's synthetic dataset generated with x264's C
path (render.X264_PARAMS = "asm=0", the default) and with its CPU-detected assembly, interleaved.

  .venv/bin/python experiments/2026-12-04_demo_robust/encode_cost.py [--reps=3] [--out=/tmp/enc_cost]

Prints the CPU seconds of each generation, the mean per setting and the ratio, and the load average.
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from spacer_jax.data import synthetic  # noqa: E402
from spacer_jax.data.synthetic import render  # noqa: E402

SETTINGS = {"c (asm=0, default)": "asm=0", "cpu-detected asm": ""}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default="/tmp/enc_cost")
  args = ap.parse_args()
  # The demo's dataset (configs/sgrlvr.py demo(): 256 + 32 scenes of 4 frames at 84x84).
  config = synthetic.SyntheticConfig.demo(num_scenes=256, num_eval_scenes=32, questions_per_scene=10,
                                          height=84, width=84)
  times = {k: [] for k in SETTINGS}
  print(f"load average at start {os.getloadavg()}")
  for rep in range(args.reps):
    for name, params in SETTINGS.items():
      render.X264_PARAMS = params
      root = os.path.join(args.out, "data")
      shutil.rmtree(root, ignore_errors=True)
      t0 = time.process_time()
      synthetic.generate_dataset(root, config, progress=False)
      times[name].append(time.process_time() - t0)
      print(f"rep {rep} {name:20s} {times[name][-1]:6.2f} CPU s")
  mean = {k: sum(v) / len(v) for k, v in times.items()}
  ref, new = mean["cpu-detected asm"], mean["c (asm=0, default)"]
  print(f"mean CPU s: C {new:.2f}, asm {ref:.2f}; ratio {new / ref:.3f} (+{new - ref:.2f} s per dataset)")
  print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
  main()
