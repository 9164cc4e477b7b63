"""Runs the demo through the real trainer, with the demo hooks train.py does not call yet.

  .venv/bin/python experiments/2026-11-26_demo/run_demo.py --config=configs/sgrlvr.py:demo \
      --workdir=/tmp/demo [--config.seed=1 ...]

Same as `python -m spacer_jax.train --config=configs/sgrlvr.py:demo --workdir=DIR` (train.py calls
spacer_jax.demo's load_traces / attach_traces / finish since a502244). With an older train.py this
script wraps rollout.sft_batch to attach the templated traces and calls demo.finish after train.main
(the 3-seed runs of README.md were started that way, at 55ac3c7).
Also writes {workdir}/demo_time.json: wall and CPU seconds (user+sys of this process and children).
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from absl import app  # noqa: E402

from spacer_jax import demo, rollout, train  # noqa: E402


def _cpu():
  s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main(argv):
  t0, c0 = time.perf_counter(), _cpu()
  config, workdir = train._CONFIG.value, train._WORKDIR.value  # pylint: disable=protected-access
  calls_demo = "demo" in open(train.__file__).read().split("def main", 1)[1]
  if not calls_demo:
    table = demo.load_traces(config, workdir)
    sft_batch = rollout.sft_batch

    def sft_batch_with_traces(sampler, batch, **kw):
      return sft_batch(sampler, demo.attach_traces(batch, table), **kw)

    rollout.sft_batch = sft_batch_with_traces
  train.main(argv)
  t1, c1 = time.perf_counter(), _cpu()
  if not calls_demo:
    demo.finish(config, workdir)
  t2, c2 = time.perf_counter(), _cpu()
  times = {"train_wall_s": t1 - t0, "train_cpu_s": c1 - c0, "finish_wall_s": t2 - t1,
           "finish_cpu_s": c2 - c1, "total_wall_s": t2 - t0, "total_cpu_s": c2 - c0,
           "loadavg_end": os.getloadavg()}
  with open(os.path.join(workdir, "demo_time.json"), "w") as f:
    json.dump(times, f, indent=1)
  print(json.dumps(times))


if __name__ == "__main__":
  app.run(main)
