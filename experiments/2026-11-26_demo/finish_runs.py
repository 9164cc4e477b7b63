"""Re-runs spacer_jax.demo.finish (held-out evaluation, plot, summary) on finished demo workdirs.

  .venv/bin/python experiments/2026-11-26_demo/finish_runs.py /tmp/demo_seeds/seed_1 ...

Used when a run's training finished but its final evaluation did not (the seeds run of README.md: the
first demo.finish failed inside train.py's mesh context, fixed since). Reads {workdir}/config.json.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import ml_collections  # noqa: E402

from spacer_jax import demo  # noqa: E402


def main(workdirs):
  for wd in workdirs:
    t0 = time.perf_counter()
    with open(os.path.join(wd, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
    demo.finish(config, wd)
    print(f"{wd}: finish took {time.perf_counter() - t0:.0f} s wall")


if __name__ == "__main__":
  main(sys.argv[1:])
