"""Runs the demo (train.train_and_evaluate, then demo.finish) and records its wall and CPU time.

  .venv/bin/python experiments/2026-11-26_demo/run_demo.py --config=configs/sgrlvr.py:demo \
      --workdir=/tmp/demo [--config.seed=1 ...]

Same as `python -m spacer_jax.train --config=configs/sgrlvr.py:demo --workdir=DIR`, plus
{workdir}/demo_time.json: wall and CPU seconds (user+sys of this process and children). (The 3-seed
runs of README.md were started with an older version of this script, at 55ac3c7, that attached the
traces itself; the synthetic records now carry them in `process`.)
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spacer_jax import cli, demo, train  # noqa: E402


def _cpu():
  s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main(argv):
  del argv
  t0, c0 = time.perf_counter(), _cpu()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  train.train_and_evaluate(config, workdir)
  t1, c1 = time.perf_counter(), _cpu()
  demo.finish(config, os.path.abspath(workdir))
  t2, c2 = time.perf_counter(), _cpu()
  times = {"train_wall_s": t1 - t0, "train_cpu_s": c1 - c0, "finish_wall_s": t2 - t1,
           "finish_cpu_s": c2 - c1, "total_wall_s": t2 - t0, "total_cpu_s": c2 - c0,
           "loadavg_end": os.getloadavg()}
  with open(os.path.join(workdir, "demo_time.json"), "w") as f:
    json.dump(times, f, indent=1)
  print(json.dumps(times))


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Demo config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory.")


if __name__ == "__main__":
  cli.run(main, define_flags, __doc__)  # --config=configs/sgrlvr.py:demo finds the packaged config
