"""Multi-process jobs on one machine: 2 processes x 4 CPU devices (gloo collectives over localhost)
against 1 process x 8 devices, through the command lines users run (`--coordinator_address`,
`--num_processes`, `--process_id`).

The default run keeps the core check (2 training steps in both layouts, ~80 CPU-seconds on two
cores); the evaluator, resuming with another process count and SIGTERM are `slow`.

The equalities are exact: both layouts run the same global programs on the same global batches, and
a one-process CPU run with several devices takes XLA's gloo collectives too (distributed.initialize),
so the sums run in the same order. The smoke recipe's first gradient is pure rounding noise (every
group's rewards are equal, the KL gradient is ~0), which Adam turns into a real update: only
bit-equal runs agree after it, which is what these tests check.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time/", "compiles/", "memory/", "rollout/tokens_per_s", "train/tokens_per_s")
TIMEOUT = 1200


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Tokenizer, synthetic dataset and XLA cache shared by every run of the module."""
  d = tmp_path_factory.mktemp("multihost_shared")
  from spacer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer_lib.build_offline_tokenizer(out_dir=str(d / "tokenizer"))
  return d


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _launch(module, args, nproc, log_dir):
  """Starts `python -m module args` as `nproc` processes of one job (8 CPU devices in all)."""
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(nproc):
    flags = ([] if nproc == 1 else
             [f"--coordinator_address=localhost:{port}", f"--num_processes={nproc}",
              f"--process_id={i}"])
    log = open(os.path.join(log_dir, f"{module.split('.')[-1]}_{nproc}_{i}_{time.time_ns()}.log"),
               "w+")
    procs.append((subprocess.Popen([sys.executable, "-m", module, *args, *flags], cwd=ROOT,
                                   env=_env(8 // nproc), stdout=log, stderr=subprocess.STDOUT),
                  log))
  return procs


def _wait(procs):
  logs = []
  for proc, log in procs:
    rc = proc.wait(timeout=TIMEOUT)
    log.seek(0)
    text = log.read()
    log.close()
    assert rc == 0, f"process exited with {rc}:\n{text[-4000:]}"
    logs.append(text)
  return logs


def _train_args(workdir, shared, *overrides):
  return [f"--config={ROOT}/spacer_jax/configs/sgrlvr.py:smoke", f"--workdir={workdir}",
          f"--config.jax_cache_dir={shared / 'xla'}",
          f"--config.data.synthetic_root={shared / 'synthetic'}",
          f"--config.data.tokenizer_dir={shared / 'tokenizer'}", "--config.use_progress_bar=False",
          "--config.optim.decay_steps=3", *overrides]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _stable(rows):
  return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _rollouts(workdir):
  with open(os.path.join(workdir, "rollouts.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _params(workdir):
  from spacer_jax import modeling  # pylint: disable=g-import-not-at-top
  from spacer_jax import tree_utils  # pylint: disable=g-import-not-at-top
  model = modeling.load_model(str(workdir))
  return {k: np.asarray(v) for k, v in tree_utils.split_model(model)[1].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared):
  """2 steps of the smoke recipe as 2 processes x 4 devices and as 1 process x 8 devices."""
  root = tmp_path_factory.mktemp("multihost_runs")
  two, one = root / "two", root / "one"
  # Concurrently: the two jobs share nothing but the read-only inputs.
  procs = _launch("spacer_jax.train", _train_args(two, shared), 2, root)
  # Multi-process runs keep one vision patch group (Sampler.vision_groups): so does the reference.
  procs += _launch("spacer_jax.train",
                   _train_args(one, shared, "--config.model.vision_patch_groups=False"), 1, root)
  logs = _wait(procs)
  return dict(root=root, two=two, one=one, logs=logs)


def test_two_processes_train_exactly_like_one(runs):
  two, one = runs["two"], runs["one"]
  rows = _rows(two)
  assert [r["step"] for r in rows] == [1, 2]  # one metrics.jsonl, written by process 0 only
  assert _stable(rows) == _stable(_rows(one))
  for key in ("train/loss", "reward/total", "train/kl", "train/grad_norm"):
    assert [r[key] for r in rows] == [r[key] for r in _rows(one)], key
  samples = _rollouts(two)
  assert len(samples) == 2 * 2 * 2  # steps x prompts x G, each once
  assert samples == _rollouts(one)
  a, b = _params(two), _params(one)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Both processes saved into the one checkpoint (its data item holds both iterator states).
  saved = json.loads((two / "ckpt" / "2" / "data" / "metadata").read_text())
  assert saved["kind"] == "processes"
  assert [s["state"]["process_index"] for s in saved["states"]] == [0, 1]


@pytest.mark.slow
def test_evaluator_two_processes_same_outputs(runs, shared):
  from spacer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  root = runs["root"]
  heldout = synthetic.dataset_paths(str(shared / "synthetic")).eval_root

  def args(out):
    return [f"--config={ROOT}/spacer_jax/configs/eval_vsibench.py:demo,demo_workdir={runs['one']}",
            f"--config.tokenizer_dir={shared / 'tokenizer'}", f"--config.data_dir={heldout}",
            "--config.max_new_tokens=8", "--config.progress=False",
            "--config.max_items=12", f"--workdir={out}"]

  procs = _launch("spacer_jax.evaluate", args(root / "eval_two"), 2, root)
  procs += _launch("spacer_jax.evaluate", args(root / "eval_one"), 1, root)
  _wait(procs)
  metrics = [json.loads((root / d / "metrics.json").read_text()) for d in ("eval_two", "eval_one")]
  for m in metrics:
    m.pop("seconds")
  assert metrics[0] == metrics[1] and metrics[0]["num_scored"] == 12
  preds = [[json.loads(line) for line in open(root / d / "predictions.jsonl")]
           for d in ("eval_two", "eval_one")]
  assert preds[0] == preds[1]  # the same items in the same order: no duplicate, no gap


@pytest.mark.slow
def test_resume_with_another_process_count(runs, shared):
  """The 2-process checkpoint continues in 1 process and the 1-process one in 2; both equal."""
  root = runs["root"]
  for name in ("two", "one"):
    (root / f"{name}_more").mkdir()
    subprocess.run(["cp", "-r", str(runs[name]) + "/.", str(root / f"{name}_more")], check=True)
  procs = _launch("spacer_jax.train", _train_args(root / "two_more", shared,
                                                  "--config.total_steps=3"), 1, root)
  procs += _launch("spacer_jax.train", _train_args(root / "one_more", shared,
                                                   "--config.total_steps=3"), 2, root)
  logs = _wait(procs)
  assert all("training steps 3..3" in log for log in logs)
  a, b = _rows(root / "two_more"), _rows(root / "one_more")
  assert [r["step"] for r in a] == [1, 2, 3] and _stable(a) == _stable(b)
  assert _rollouts(root / "two_more") == _rollouts(root / "one_more")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes(runs, shared):
  """SIGTERM to process 1: both stop after the same step and save it; the job then resumes and
  ends where an uninterrupted one does."""
  root = runs["root"]
  wd = root / "killed"
  procs = _launch("spacer_jax.train", _train_args(wd, shared, "--config.total_steps=3"), 2, root)
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and procs[1][0].poll() is None:
    if (wd / "metrics.jsonl").exists() and (wd / "metrics.jsonl").read_text().strip():
      procs[1][0].send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  logs = _wait(procs)
  steps = sorted(int(p) for p in os.listdir(wd / "ckpt") if p.isdigit())
  if steps[-1] < 3:  # stopped early: both processes say so, at the same step
    assert all(f"saved step {steps[-1]}, exiting" in log for log in logs)
  _wait(_launch("spacer_jax.train", _train_args(wd, shared, "--config.total_steps=3"), 2, root))
  straight = root / "straight"
  _wait(_launch("spacer_jax.train", _train_args(straight, shared, "--config.total_steps=3"), 2,
                root))
  assert _stable(_rows(wd)) == _stable(_rows(straight))
