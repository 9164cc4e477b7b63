"""Sweeps: every arm x seed of a training config, then a results table, plots and a comparison.

    python -m spacer_jax.sweep --config=configs/ablation.py --seeds=3 --baseline=sgrlvr \
        --out=experiments/2026-12-05_ablation --parallel=2

Arms. `--arm=NAME:--config.x=y,--config.z=w` (repeatable; `--arm=NAME:` is the config as it is) or,
without --arm, the config file's `sweep(add)` function (big_vision's convention): each call
`add(**{"optim.lr": 1e-6})` is one arm, `add(name="beta0", **{"grpo.beta": 0.0})` names it
(`--sweep=FN` picks another function of the file; `sweep(add, config)` also gets the base config
and may choose arms by it). `--config.x=y` flags given to the sweep itself
apply to every arm. Before anything runs, every arm's config is built exactly as train.py will build
it (ml_collections config_flags): an unknown field, a bad value, or an override that does not change
its field stops the sweep naming the arm, and sweep.json records what each arm changes against the
baseline arm.

Runs. Every arm runs with every seed (`--seeds=3` means seeds 1, 2, 3; `--seeds=1,5,9` lists them),
`--parallel` at a time, each in its own workdir {runs}/{arm}/seed_{S} (default runs = {out}/runs,
which gets a .gitignore: checkpoints never go into the experiment record):

    python -m spacer_jax.train --config=FILE[:ARG] --workdir={runs}/{arm}/seed_{S} \
        [sweep's --config flags] [arm's overrides] --config.seed=S

then, if the run has not written demo_metrics.json, its finishing step in a second process. A
config that names `post_train` (the demo's: spacer_jax.demo:finish) has train.py run it after
training; for one that does not (e.g. configs/sgrlvr.py:smoke), or when it was interrupted, the
sweep calls `--finish=MODULE:FUNCTION` (default spacer_jax.demo:finish) as FUNCTION(config,
workdir): the demo's held-out evaluation of the SFT and last checkpoints on the synthetic
VSI-format held-out split (demo_metrics.json). `--module` replaces spacer_jax.train (e.g. an entry point that
trains and finishes in one process). Runs of a synthetic-data config share one generated dataset
({runs}/data/...) and, unless the config sets one, one persistent XLA compilation cache
({runs}/jax_cache), so arms with the same shapes compile once.

Shared SFT phase. An arm whose config differs from the baseline arm's only in settings the RL
phase alone reads (grpo.*, rewards.*: RL_ONLY_PREFIXES) has, for each seed, exactly the baseline
run's SFT warm-up: runs are bit-reproducible and nothing else differs. Such a run does not repeat it:
once the baseline run of its seed has finished, its checkpoint at step sft_warmup_steps (train state
and data iterator), its metrics.jsonl and rollouts.jsonl rows up to that step and its tokenizer are
copied into the arm's workdir, where train.py resumes with the arm's config (run.json records
`sft_from`). tests/test_sweep.py checks that this gives the same metrics and weights as a run from
scratch. Arms that change anything else (data.*, mode, optim.*, sft_warmup_steps, ...) run in full;
`--no_share_sft` runs every arm in full. The shared runs' wall time counts their RL phase only.

Adopted runs. `--adopt=ARM:DIR` (DIR containing `{seed}`) takes finished runs made outside the sweep,
e.g. the demo's runs of several seeds, as ARM's runs: each DIR's config.json must equal the arm's
config with that seed, except jax_cache_dir and use_progress_bar (they do not change results), the
dataset and tokenizer directories of a synthetic-data tiny-model run (generated deterministically)
and fields the run's config lacks (added to the code later; run.json lists them). The directory is
copied into the sweep's runs and run.json records where it came from.

Resume. Rerunning the same command skips finished runs (demo_metrics.json present), finishes
trained ones and restarts the others, which resume from their last checkpoint (train.py's resume).
A run directory made by different flags is an error, not a silent mix. Ctrl-C or SIGTERM stops the
sweep: the running trainers get SIGTERM, checkpoint and exit.

Record, in --out: sweep.json (each invocation's command and git commit, the arms, their overrides
and config differences), results.json (per arm and seed: held-out answer accuracy overall and per
task, held-out format and map scores, the rollout reward components averaged over the last 20% of
GRPO steps, training and wall time; per arm mean and standard error over seeds; the comparison with
the baseline arm), results.md (the same as tables), curves.png (rollout answer accuracy and format
over GRPO steps, one curve per arm, band = +-1 standard error over seeds) and per_task.png (held-out
accuracy per task, error bars = standard error over seeds). `--summarize_only` rebuilds them from
the runs; `--dry_run` prints the plan and runs nothing.

Comparison with --baseline (default: the first arm): difference of the arm's mean and the
baseline's mean, with a 95% t interval. When both arms ran the same seeds (the default), the
interval is the paired one on the per-seed differences: a seed fixes the initial weights, the data
order and the sampling stream, so arms that differ only in the RL phase start RL from the same SFT
checkpoint and pairing removes that checkpoint's luck from the comparison. Otherwise Welch's
interval (unequal variances, Welch-Satterthwaite degrees of freedom). With 3 seeds (2 degrees of
freedom, t = 4.30) only large effects give an interval that excludes 0; intervals are per
comparison, not corrected for the number of arms.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from spacer_jax import config_lib, demo, metrics as metrics_lib

RESULTS_FILE = "demo_metrics.json"  # What a finished run has written (demo.finish).
RUN_FILE = "run.json"  # The sweep's record of one run: arm, seed, flags, attempts.
# Rollout reward components (rollout.run logs each as reward/{name}, a mean over the B*G samples).
REWARD_COMPONENTS = ("format", "accuracy_base", "map", "accuracy", "temporal", "length", "total")
CURVE_KEYS = (("reward/accuracy_base", "rollout answer accuracy"),
              ("reward/format", "rollout format"))
LEVEL = 0.95
_NAME = re.compile(r"^[A-Za-z0-9_.=+-]+$")
_OVERRIDE = re.compile(r"^--config\.([A-Za-z_][\w.]*)=(.*)$", re.S)


@dataclasses.dataclass
class Arm:
  name: str
  overrides: list  # "--config.x=y" flags, in order.


@dataclasses.dataclass
class Run:
  arm: str
  seed: int
  run_dir: str
  argv: list  # train.py flags except --workdir.
  total_steps: int
  sft_from: "Run | None" = None  # The baseline run whose SFT phase this run starts from (share_sft).
  sft_steps: int = 0  # That phase's length (config.sft_warmup_steps).


# ------------------------------------------------------------------------------------------------
# Arms and configs.
# ------------------------------------------------------------------------------------------------
def override_flag(key, value):
  """`--config.key=value` with the value written so config_flags parses it back to `value`."""
  key = key[len("config."):] if key.startswith("config.") else key
  if isinstance(value, (list, tuple)):
    text = repr(tuple(value))
  elif isinstance(value, str):
    text = value
  else:
    text = repr(value)
  return f"--config.{key}={text}"


def parse_arm(spec):
  """`NAME:--config.x=y,--config.z=(1, 2)` -> Arm (commas inside values are kept)."""
  name, sep, rest = spec.partition(":")
  if not sep or not _NAME.match(name):
    raise ValueError(f"--arm={spec!r}: expected NAME:--config.x=y,--config.z=w (NAME of "
                     f"letters, digits and _.=+-; `NAME:` alone for the config as it is)")
  flags = [f.strip() for f in re.split(r",(?=\s*--)", rest) if f.strip()]
  for f in flags:
    if not _OVERRIDE.match(f):
      raise ValueError(f"--arm={spec!r}: {f!r} is not a --config.FIELD=VALUE override")
  return Arm(name, flags)


def sweep_arms(config_path, fn_name="sweep", config=None):
  """The arms of a config file's `sweep(add)` function (big_vision style). A function that takes a
  second argument, `sweep(add, config)`, gets the base config (`config`: the ConfigDict the sweep's
  --config and --config.x flags make) and may choose its arms by it."""
  import inspect  # pylint: disable=g-import-not-at-top
  module = config_lib.load_config_module(config_path)
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ValueError(f"{config_path} has no function {fn_name}(add); pass --arm=NAME:... instead")
  arms = []

  def add(name=None, **overrides):
    flags = [override_flag(k, v) for k, v in overrides.items()]
    auto = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"
    arms.append(Arm(name or re.sub(r"[^A-Za-z0-9_.=+-]", "_", auto), flags))

  if len(inspect.signature(fn).parameters) > 1:
    fn(add, config)
  else:
    fn(add)
  bad = [a.name for a in arms if not _NAME.match(a.name)]
  if bad:
    raise ValueError(f"{config_path}:{fn_name}: arm names {bad} need letters, digits and _.=+- only")
  if not arms:
    raise ValueError(f"{config_path}:{fn_name}(add) added no arms")
  return arms


def resolve_config(config_arg, flags, where):
  """The ConfigDict train.py builds from `--config=config_arg` and `flags` (config_flags itself)."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["sweep", f"--config={config_arg}", *flags]
  fv = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
  except (AttributeError, KeyError, absl_flags.Error, ValueError, TypeError) as e:
    raise ValueError(f"{where}: {' '.join(flags) or config_arg}: {e}") from e
  return fv.config


def flatten(config):
  """{dotted key: value} of a ConfigDict, tuples as lists (what config.json holds)."""
  return flatten_json(json.loads(config.to_json()))


def flatten_json(tree):
  """{dotted key: value} of a nested dict (a run's config.json)."""
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[prefix + k] = list(v) if isinstance(v, tuple) else v
  walk(tree, "")
  return out


def config_diff(base, other):
  """{key: [base value, other value]} for every field where two flattened configs differ."""
  keys = sorted(set(base) | set(other))
  return {k: [base.get(k), other.get(k)] for k in keys if base.get(k) != other.get(k)}


def check_overrides(arm, base_flat, arm_flat):
  """Every override of `arm` names an existing field and changes it (else the arm's name lies)."""
  for flag in arm.overrides:
    key = _OVERRIDE.match(flag).group(1)
    if key not in arm_flat:
      raise ValueError(f"arm {arm.name}: {flag} sets {key!r}, a config section, not a field")
    if key == "seed":
      raise ValueError(f"arm {arm.name}: {flag}: seeds come from --seeds")
    if base_flat.get(key) == arm_flat[key]:
      raise ValueError(f"arm {arm.name}: {flag} does not change {key} (the config already has "
                       f"{arm_flat[key]!r}), so the arm would not test what its overrides say")


def _hash(obj):
  return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def plan(config_arg, arms, seeds, runs_dir, common=(), jax_cache_dir=None):
  """Resolves and checks every arm's config; returns ({arm: flattened config}, [Run])."""
  if len({a.name for a in arms}) != len(arms):
    raise ValueError(f"arm names must be unique, got {[a.name for a in arms]}")
  if any(f.startswith("--config.seed=") for f in common):
    raise ValueError("seeds come from --seeds, not --config.seed")
  base_flat = flatten(resolve_config(config_arg, list(common), "the sweep's --config flags"))
  flats, runs = {}, []
  for arm in arms:
    cfg = resolve_config(config_arg, [*common, *arm.overrides], f"arm {arm.name}")
    flats[arm.name] = flatten(cfg)
    check_overrides(arm, base_flat, flats[arm.name])
    extra = []
    # Shared across arms and seeds: the synthetic dataset (keyed by its settings) and compiled code.
    if cfg.data.get("source") == "synthetic" and not cfg.data.get("synthetic_root"):
      root = os.path.join(runs_dir, "data", "synthetic_" + _hash(cfg.data.synthetic.to_dict()))
      extra.append(f"--config.data.synthetic_root={root}")
    if jax_cache_dir and "jax_cache_dir" in cfg and not cfg.jax_cache_dir:
      extra.append(f"--config.jax_cache_dir={jax_cache_dir}")
    for seed in seeds:
      argv = [f"--config={config_arg}", *common, *arm.overrides, *extra, f"--config.seed={seed}"]
      runs.append(Run(arm.name, seed, os.path.join(runs_dir, arm.name, f"seed_{seed}"), argv,
                      int(cfg.total_steps)))
  return flats, runs


# Settings only the RL phase reads: an arm that differs from the baseline in nothing else has the
# baseline's SFT phase, bit for bit (runs are bit-reproducible; tests/test_sweep.py checks it).
RL_ONLY_PREFIXES = ("grpo.", "rewards.")


def sft_shareable(base_flat, arm_flat):
  """Why an arm cannot start from the baseline's SFT checkpoint ('' when it can)."""
  if base_flat["mode"] != "grpo" or not base_flat["sft_warmup_steps"]:
    return "the baseline has no SFT warm-up"
  if base_flat["total_steps"] <= base_flat["sft_warmup_steps"]:
    return "the baseline has no RL steps"
  if base_flat["sft_warmup_steps"] % base_flat["ckpt_every_steps"]:
    return "the baseline saves no checkpoint at step sft_warmup_steps"
  other = [k for k in config_diff(base_flat, arm_flat) if not k.startswith(RL_ONLY_PREFIXES)]
  if other:
    return f"it changes {', '.join(other)} (not only {'/'.join(p + '*' for p in RL_ONLY_PREFIXES)})"
  return ""


def share_sft(runs, flats, baseline):
  """Points every run of an arm that changes only RL settings (RL_ONLY_PREFIXES) at the baseline
  run of its seed: it starts from that run's checkpoint at step sft_warmup_steps instead of
  repeating the identical SFT phase. Returns {arm: '' if shared, else why not}."""
  base = {r.seed: r for r in runs if r.arm == baseline}
  why = {}
  for arm, flat in flats.items():
    if arm != baseline:
      why[arm] = sft_shareable(flats[baseline], flat)
  steps = int(flats[baseline]["sft_warmup_steps"])
  for r in runs:
    if r.arm != baseline and not why[r.arm] and r.seed in base:
      r.sft_from, r.sft_steps = base[r.seed], steps
  return why


def _copy_rows(src, dst, max_step):
  """The jsonl rows of `src` with step <= max_step, into `dst` (metrics.jsonl, rollouts.jsonl)."""
  if not os.path.exists(src):
    return
  with open(src) as f, open(dst, "w") as g:
    for line in f:
      if line.strip() and json.loads(line)["step"] <= max_step:
        g.write(line)


def seed_from_sft(run):
  """Gives a new run the SFT phase of `run.sft_from`: its checkpoint at step `run.sft_steps` (state
  and data iterator; train.py resumes from it), its metrics.jsonl and rollouts.jsonl rows up to that
  step and its tokenizer/. TensorBoard events are not copied (the arm's start at the RL phase)."""
  import shutil  # pylint: disable=g-import-not-at-top
  src, step = run.sft_from.run_dir, run.sft_steps
  ckpt = os.path.join(src, "ckpt", str(step))
  if not os.path.isdir(os.path.join(ckpt, "state")):
    raise FileNotFoundError(f"{src}: no checkpoint at step {step} to start {run.run_dir} from "
                            f"(config.keep_ckpts too small?)")
  tmp = os.path.join(run.run_dir, "ckpt.sft_tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(ckpt, os.path.join(tmp, str(step)))
  for name in ("metrics.jsonl", "rollouts.jsonl"):
    _copy_rows(os.path.join(src, name), os.path.join(run.run_dir, name), step)
  tok = os.path.join(src, "tokenizer")
  if os.path.isdir(tok):
    shutil.copytree(tok, os.path.join(run.run_dir, "tokenizer"), dirs_exist_ok=True)
  os.replace(tmp, os.path.join(run.run_dir, "ckpt"))  # Last: a checkpoint means the copy is whole.
  path = os.path.join(run.run_dir, RUN_FILE)
  rec = _read_json(path)
  rec["sft_from"] = {"run_dir": src, "step": step}
  _write_json(path, rec)


# Fields that do not change what a run computes (where compiled code is cached; the progress bar).
ADOPT_IGNORED = ("jax_cache_dir", "use_progress_bar")
# Where a synthetic-data run of the tiny model found its dataset and tokenizer: both are generated
# deterministically (from data.synthetic.*, which is compared; the offline BPE), so any directory
# holds the same bytes.
ADOPT_IGNORED_SYNTHETIC = ("data.synthetic_root", "data.tokenizer_dir")


def config_mismatch(run, run_config_path, where):
  """Compares the config train.py would get from `run.argv` with a run's config.json.

  Returns ({key: [ours, theirs]} for fields that differ, [fields the run's config lacks]). Ignored:
  ADOPT_IGNORED, and for the tiny model on synthetic data ADOPT_IGNORED_SYNTHETIC. Fields the run's
  config lacks were added to the code after the run was made (its git_commit.txt says which code);
  they are not differences.
  """
  with open(run_config_path) as f:
    theirs = flatten_json(json.load(f))
  ours = flatten(resolve_config(run.argv[0].split("=", 1)[1], run.argv[1:], where))
  ignored = ADOPT_IGNORED + (ADOPT_IGNORED_SYNTHETIC if ours["data.source"] == "synthetic"
                             and ours["model.variant"] else ())
  diff = {k: v for k, v in config_diff(ours, theirs).items() if k not in ignored}
  newer = sorted(k for k in diff if k not in theirs)
  return {k: v for k, v in diff.items() if k in theirs}, newer


def adopt(run, src, module):
  """Makes a finished run made outside the sweep (e.g. the demo's own runs) the sweep's run of its
  arm and seed: its config.json must equal the config train.py would get from the sweep's flags for
  that run (config_mismatch); the directory is copied to run.run_dir with a run.json naming where it
  came from."""
  import shutil  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(src, RESULTS_FILE)):
    raise FileNotFoundError(f"--adopt: {src} has no {RESULTS_FILE} (not a finished run)")
  diff, newer = config_mismatch(run, os.path.join(src, "config.json"), f"--adopt {src}")
  if diff:
    raise ValueError(f"--adopt: {src} is not arm {run.arm} seed {run.seed}: "
                     + "; ".join(f"{k}: arm {a!r}, run {b!r}" for k, (a, b) in diff.items()))
  shutil.copytree(src, run.run_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.log"))
  timing = _read_json(os.path.join(src, "demo_time.json"), {})
  _write_json(os.path.join(run.run_dir, RUN_FILE), {
      "arm": run.arm, "seed": run.seed, "module": module, "argv": run.argv, "adopted_from": src,
      "fields_newer_than_the_run": newer,
      "attempts": [{"stage": "adopted", "wall_s": float(timing.get("total_wall_s", 0.0)),
                    "returncode": 0}]})


# ------------------------------------------------------------------------------------------------
# Running.
# ------------------------------------------------------------------------------------------------
def _read_json(path, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def latest_step(run_dir):
  from spacer_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = os.path.join(run_dir, "ckpt")
  return checkpoint.latest_step(ckpt) if os.path.isdir(ckpt) else None


def run_status(run):
  """"done" (results written), "trained" (last checkpoint, no results), "partial" or "new"."""
  if os.path.exists(os.path.join(run.run_dir, RESULTS_FILE)):
    return "done"
  step = latest_step(run.run_dir)
  if step is None:
    return "new"
  return "trained" if step >= run.total_steps else "partial"


def claim(run, module):
  """Creates or checks {run_dir}/run.json: a run directory belongs to one set of flags."""
  path = os.path.join(run.run_dir, RUN_FILE)
  rec = _read_json(path)
  if rec is not None and (rec["argv"] != run.argv or rec["module"] != module):
    # Other flags may still mean the same run: the config file moved (another clone, a renamed
    # checkout). The run's own config.json, when it has one, decides; a run that never started
    # (no config.json, no checkpoint) holds nothing to protect. run.json then takes the new flags
    # (the old ones kept), so that later stages resolve the config from a path that exists.
    run_config = os.path.join(run.run_dir, "config.json")
    diff = None
    if rec["module"] == module and os.path.exists(run_config):
      diff, _ = config_mismatch(run, run_config, run.run_dir)
    elif rec["module"] == module and run_status(run) == "new":
      diff = {}
    if diff is None or diff:
      why = ("; its config.json differs: " + "; ".join(
          f"{k}: now {a!r}, run {b!r}" for k, (a, b) in diff.items())) if diff else ""
      raise ValueError(f"{run.run_dir} was made by other flags:\n  {shlex.join(rec['argv'])}\nnot\n  "
                       f"{shlex.join(run.argv)}{why}\nuse another --out/--runs_dir or delete that run")
    rec.setdefault("earlier_argv", []).append(rec["argv"])
    rec["argv"] = run.argv
    _write_json(path, rec)
  if rec is None:
    os.makedirs(run.run_dir, exist_ok=True)
    rec = {"arm": run.arm, "seed": run.seed, "module": module, "argv": run.argv, "attempts": []}
    _write_json(path, rec)
  return rec


class _Runner:
  """Runs the stages of the runs on a thread pool of subprocesses; stops them on a signal."""

  def __init__(self, module, finish, printer):
    self.module, self.finish = module, finish
    self.lock = threading.RLock()  # RLock: the signal handler may interrupt a holder.
    self.printer = lambda text: self._say(printer, text)
    self.procs = set()
    self.stopping = False
    self.ended = {}  # run_dir -> threading.Event, set when runner.run of that run returns.
    self.errors = {}  # run_dir -> what went wrong (runs that did not finish)

  def _say(self, printer, text):
    with self.lock:
      printer(text)

  def stop(self):
    with self.lock:
      self.stopping = True
      for p in self.procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)  # train.py checkpoints and exits on SIGTERM.

  def stage(self, run, stage, cmd):
    rec_path = os.path.join(run.run_dir, RUN_FILE)
    started = time.time()
    with open(os.path.join(run.run_dir, "sweep.log"), "a") as log:
      log.write(f"\n== {stage} {datetime.datetime.now().isoformat(timespec='seconds')}: "
                f"{shlex.join(cmd)}\n")
      log.flush()
      with self.lock:
        if self.stopping:
          return None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.add(proc)
      rc = proc.wait()
      with self.lock:
        self.procs.discard(proc)
    with self.lock:
      rec = _read_json(rec_path)
      rec["attempts"].append({"stage": stage, "started": datetime.datetime.fromtimestamp(
          started).isoformat(timespec="seconds"), "wall_s": time.time() - started,
                              "returncode": rc})
      _write_json(rec_path, rec)
    return rc

  def run(self, run, label):
    """One run to the end (or to a stop). Returns None on success, else what went wrong."""
    err = "raised"
    try:
      err = self._run(run, label)
      return err
    except BaseException as e:
      err = f"{type(e).__name__}: {e}"
      raise
    finally:
      with self.lock:  # Runs that start from this one's SFT phase wait for this.
        if err:
          self.errors[run.run_dir] = err
        self.ended.setdefault(run.run_dir, threading.Event()).set()

  def _wait_for(self, base):
    """Waits until the run `base` has ended; returns its error ('' when it finished)."""
    with self.lock:
      ended = self.ended.setdefault(base.run_dir, threading.Event())
    while not ended.wait(2.0):
      if self.stopping:
        return "stopped"
    return self.errors.get(base.run_dir, "")

  def _run(self, run, label):
    status = run_status(run)
    if status == "done":
      return None
    if status == "new" and run.sft_from is not None:
      if run_status(run.sft_from) != "done":
        self.printer(f"{label} {run.arm} seed {run.seed}: waits for {run.sft_from.arm} seed "
                     f"{run.seed} (its SFT phase)")
        err = self._wait_for(run.sft_from)
        if err:
          return f"the run it shares the SFT phase with did not finish ({err})"
      seed_from_sft(run)
      self.printer(f"{label} {run.arm} seed {run.seed}: starts from {run.sft_from.arm} seed "
                   f"{run.seed} at step {run.sft_steps} (shared SFT phase)")
      status = run_status(run)
    if status in ("new", "partial"):
      what = "starts" if status == "new" else f"resumes after step {latest_step(run.run_dir)}"
      self.printer(f"{label} {run.arm} seed {run.seed}: training {what}")
      rc = self.stage(run, "train", [sys.executable, "-m", self.module,
                                     f"--workdir={run.run_dir}", *run.argv])
      if rc is None or self.stopping:
        return "stopped"
      if rc != 0:
        return f"training exited with {rc}"
      if run_status(run) not in ("done", "trained"):
        return "training stopped before its last step"
    if run_status(run) == "trained" and self.finish:
      self.printer(f"{label} {run.arm} seed {run.seed}: finishing ({self.finish})")
      rc = self.stage(run, "finish", [sys.executable, "-m", "spacer_jax.sweep",
                                      f"--finish_run={run.run_dir}", f"--finish={self.finish}"])
      if rc is None or self.stopping:
        return "stopped"
      if rc != 0:
        return f"{self.finish} exited with {rc}"
    if run_status(run) != "done":
      return f"no {RESULTS_FILE} after training" + ("" if self.finish else " (no --finish)")
    return None


def execute(runs, *, module, finish, parallel=1, printer=print):
  """Runs every unfinished run; returns {run_dir: error} for those that did not finish."""
  for r in runs:  # Finished runs too: their results must come from these flags.
    claim(r, module)
  todo = [r for r in runs if run_status(r) != "done"]
  # Runs that others start from first (the pool takes them in order: a waiting run never holds
  # the slot its baseline needs).
  sources = {r.sft_from.run_dir for r in todo if r.sft_from is not None}
  todo.sort(key=lambda r: r.run_dir not in sources)
  printer(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to go, "
          f"{parallel} at a time")
  runner = _Runner(module, finish, printer)
  errors = {}
  main_thread = threading.current_thread() is threading.main_thread()
  previous = {}

  def on_signal(signum, frame):
    del frame
    if runner.stopping:  # A second signal: stop waiting for them.
      raise KeyboardInterrupt
    printer(f"signal {signum}: stopping the runs (they checkpoint and exit; again to abandon them)")
    runner.stop()

  if main_thread:
    for s in (signal.SIGINT, signal.SIGTERM):
      previous[s] = signal.signal(s, on_signal)
  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
      futures = {pool.submit(runner.run, r, f"[{i + 1}/{len(todo)}]"): r
                 for i, r in enumerate(todo)}
      for fut in concurrent.futures.as_completed(futures):
        r = futures[fut]
        err = fut.exception() or fut.result()
        wall = sum(a["wall_s"] for a in _read_json(os.path.join(r.run_dir, RUN_FILE))["attempts"])
        if err:
          errors[r.run_dir] = str(err)
          runner.printer(f"{r.arm} seed {r.seed}: {err}; see {r.run_dir}/sweep.log")
        else:
          runner.printer(f"{r.arm} seed {r.seed}: done ({wall / 60:.1f} min in all attempts)")
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  return errors


def finish_run(run_dir, finish):
  """The finishing step of one run, in this process: the run config's `post_train` if it names one
  (train.py's main runs it too; this is the retry after an interrupted one), else `finish`, called
  as FUNCTION(config, run_dir) through train.run_post_train."""
  rec = _read_json(os.path.join(run_dir, RUN_FILE))
  if rec is None:
    raise FileNotFoundError(f"{run_dir}: no {RUN_FILE}; not a run directory of spacer_jax.sweep")
  config_arg = rec["argv"][0].split("=", 1)[1]
  config = resolve_config(config_arg, rec["argv"][1:], run_dir)
  if not config.get("post_train"):
    config.post_train = finish
  from spacer_jax import train  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  if not absl_flags.FLAGS.is_parsed():  # grain reads absl flags.
    absl_flags.FLAGS.mark_as_parsed()
  if config.get("jax_cache_dir"):  # The trainer's compilation cache, as train.py sets it.
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.jax_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return train.run_post_train(config, run_dir)


# ------------------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------------------
def run_values(run_dir):
  """Per-run numbers: held-out scores (demo_metrics.json), rollout rewards over the last 20% of the
  GRPO steps and training time (metrics.jsonl), wall time of all attempts (run.json)."""
  m = _read_json(os.path.join(run_dir, RESULTS_FILE))
  out = {}
  heldout = m.get("heldout", {})
  if "final" in heldout:
    h = heldout["final"]
    out["heldout/accuracy"] = h["accuracy_base"]
    out.update({f"heldout/{t}": v for t, v in h["per_task"].items()})
    out["heldout/format"] = h["format"]
    out["heldout/map"] = h["map"]
    out["heldout/accuracy_reward"] = h["accuracy"]
    out["heldout_questions"] = h["num"]
    out["heldout_samples"] = int(m.get("heldout_samples_per_question", 0))  # 0: greedy
  if "sft" in heldout:
    out["heldout_sft/accuracy"] = heldout["sft"]["accuracy_base"]
  rows = demo.read_metrics(run_dir)
  grpo = [r for r in rows if not r.get("phase_sft")]
  for c in REWARD_COMPONENTS:
    if any(f"reward/{c}" in r for r in grpo):
      out[f"rollout/{c}"] = demo.window_means(rows, f"reward/{c}")[1]
  out["train_s"] = float(sum(r.get("time/step_s", 0.0) for r in rows))
  rec = _read_json(os.path.join(run_dir, RUN_FILE), {"attempts": []})
  out["wall_s"] = float(sum(a["wall_s"] for a in rec["attempts"]))
  commit_path = os.path.join(run_dir, "git_commit.txt")
  if os.path.exists(commit_path):
    with open(commit_path) as f:
      out["git_commit"] = f.read().strip()
  return out


def mean_se(values):
  v = np.asarray(values, np.float64)
  se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
  return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def compare(base, arm, level=LEVEL):
  """Difference of means arm - base with a `level` t interval; base/arm: {seed: value}.

  Paired on the per-seed differences when both have the same seeds (>= 2), else Welch's interval.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  q = 0.5 + level / 2
  if set(base) == set(arm) and len(base) >= 2:
    d = np.array([arm[s] - base[s] for s in sorted(base)], np.float64)
    n, diff = len(d), float(d.mean())
    se, df, test = float(d.std(ddof=1) / math.sqrt(n)), n - 1, "paired t"
  else:
    a, b = np.array(list(arm.values()), np.float64), np.array(list(base.values()), np.float64)
    n, diff = min(len(a), len(b)), float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
      return {"diff": diff, "ci": [float("nan")] * 2, "se": float("nan"), "df": float("nan"),
              "test": "none (fewer than 2 seeds)", "excludes_zero": False}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(math.sqrt(va + vb))
    df = float((va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))) if se else 1.0
    test = "Welch t"
  half = float(stats.t.ppf(q, df)) * se
  lo, hi = diff - half, diff + half
  return {"diff": diff, "ci": [lo, hi], "se": se, "df": df, "test": test,
          "excludes_zero": bool(lo > 0 or hi < 0)}


def summarize(runs, arms, baseline):
  """results.json's content from the finished runs."""
  per_arm = {a.name: {} for a in arms}
  for r in runs:
    if os.path.exists(os.path.join(r.run_dir, RESULTS_FILE)):
      per_arm[r.arm][r.seed] = run_values(r.run_dir)
  keys = []
  for seeds in per_arm.values():
    for vals in seeds.values():
      keys += [k for k in vals if k not in keys and isinstance(vals[k], (int, float))]
  out = {"baseline": baseline, "level": LEVEL, "arms": {}}
  for a in arms:
    seeds = per_arm[a.name]
    stats_ = {k: mean_se([v[k] for v in seeds.values() if k in v]) for k in keys
              if any(k in v for v in seeds.values())}
    out["arms"][a.name] = {"overrides": a.overrides, "seeds": {str(s): v for s, v in seeds.items()},
                           "mean_se": stats_}
  base = per_arm.get(baseline, {})
  out["comparison"] = {}
  for a in arms:
    if a.name == baseline or not per_arm[a.name] or not base:
      continue
    out["comparison"][a.name] = {
        k: compare({s: v[k] for s, v in base.items() if k in v},
                   {s: v[k] for s, v in per_arm[a.name].items() if k in v})
        for k in keys if k.startswith("heldout") and all(k in v for v in base.values())
        and all(k in v for v in per_arm[a.name].values())}
  return out


def _tasks(results):
  """The held-out task names present in the results (heldout/{task} keys)."""
  return sorted({k.split("/", 1)[1] for a in results["arms"].values() for k in a["mean_se"]
                 if k.startswith("heldout/")} - {"accuracy", "format", "map", "accuracy_reward"})


def _fmt(ms, scale=1.0, digits=3):
  if ms is None:
    return ""
  se = "" if math.isnan(ms["se"]) else f" ± {ms['se'] * scale:.{digits}f}"
  return f"{ms['mean'] * scale:.{digits}f}{se}"


def results_markdown(results, record):
  """results.md: the tables of results.json."""
  arms = results["arms"]
  tasks = _tasks(results)
  inv = record["invocations"][-1]
  commits = sorted({v.get("git_commit", "?") for a in arms.values() for v in a["seeds"].values()})
  nq = sorted({v.get("heldout_questions") for a in arms.values() for v in a["seeds"].values()
               if v.get("heldout_questions")})
  ks = sorted({v.get("heldout_samples", 0) for a in arms.values() for v in a["seeds"].values()})
  decoding = " / ".join("greedy decoding" if k <= 0 else
                        f"mean over {k} completions per question sampled as the rollouts are"
                        for k in ks)
  lines = [f"# Sweep: `{record['config']}`", "",
           f"Command: `{inv['command']}`", "",
           f"Sweep started at git commit `{inv['git_commit']}`; the runs' commits: "
           + ", ".join(f"`{c}`" for c in commits)
           + (" (**more than one: the runs did not all run the same code**)" if len(commits) > 1
              else ""), "",
           f"Seeds: {', '.join(str(s) for s in record['seeds'])}. Baseline arm: "
           f"`{results['baseline']}`. Values are mean ± standard error over seeds.", "",
           f"Held-out = answer accuracy ({decoding}; `accuracy_base`: exact match for multiple "
           "choice, MRA for numbers) of the last checkpoint on the synthetic held-out split "
           f"(VSI-Bench task types, training prompt format; {', '.join(map(str, nq)) or '?'} "
           "questions).", "",
           "## Held-out accuracy", "",
           "| arm | seeds | overall | " + " | ".join(tasks) + " | format | after SFT | wall min |",
           "|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
  for name, a in arms.items():
    ms = a["mean_se"]
    n = len(a["seeds"])
    cells = [_fmt(ms.get(f"heldout/{t}")) for t in ["accuracy", *tasks, "format"]]
    cells += [_fmt(ms.get("heldout_sft/accuracy")), _fmt(ms.get("wall_s"), 1 / 60, 1)]
    lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
  comps = [c for c in REWARD_COMPONENTS
           if any(f"rollout/{c}" in a["mean_se"] for a in arms.values())]
  lines += ["", "## Rollout rewards, mean over the last 20% of GRPO steps", "",
            "| arm | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps)]
  for name, a in arms.items():
    ms = a["mean_se"]
    cells = [_fmt(ms.get(f"rollout/{c}")) if f"rollout/{c}" in ms else "no GRPO steps"
             for c in comps]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", f"## Difference to `{results['baseline']}` (arm - baseline), "
            f"{int(100 * results['level'])}% interval", "",
            "| arm | metric | difference | interval | test (df) | excludes 0 |",
            "|---|---|---|---|---|---|"]
  for name, per_key in results["comparison"].items():
    for key in ["heldout/accuracy"] + [f"heldout/{t}" for t in tasks]:
      if key not in per_key:
        continue
      c = per_key[key]
      lines.append(f"| {name} | {key.split('/', 1)[1]} | {c['diff']:+.3f} | "
                   f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['test']} ({c['df']:.1f}) | "
                   f"{'**yes**' if c['excludes_zero'] else 'no'} |")
  lines += ["", "Paired t interval on the per-seed differences when both arms ran the same seeds "
            "(a seed fixes the initial weights, data order and sampling stream, so arms that "
            "differ only in RL start it from the same SFT checkpoint); Welch's interval otherwise. "
            "Not corrected for the number of comparisons.", "", "## Per seed", "",
            "| arm | seed | overall | " + " | ".join(tasks) + " | rollout answer acc. | wall min |",
            "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
  for name, a in arms.items():
    for seed, v in a["seeds"].items():
      ra = v.get("rollout/accuracy_base")
      lines.append(f"| {name} | {seed} | {v.get('heldout/accuracy', float('nan')):.3f} | "
                   + " | ".join(f"{v[f'heldout/{t}']:.3f}" if f"heldout/{t}" in v else ""
                                for t in tasks)
                   + f" | {'' if ra is None else f'{ra:.3f}'} | {v['wall_s'] / 60:.1f} |")
  lines += ["", "Figures: `curves.png` (rollout answer accuracy and format over GRPO steps, mean "
            "over seeds ± 1 standard error), `per_task.png` (held-out accuracy per task)."]
  return "\n".join(lines) + "\n"


def plot_curves(runs, arms, out_png, smooth=None):
  """One curve per arm (mean over seeds) with a ±1 standard-error band, for each CURVE_KEYS."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(6 * len(CURVE_KEYS), 4), squeeze=False)
  no_rl = []
  for i, arm in enumerate(arms):
    series = []
    for r in runs:
      if r.arm == arm.name and os.path.exists(os.path.join(r.run_dir, "metrics.jsonl")):
        series.append([x for x in demo.read_metrics(r.run_dir) if not x.get("phase_sft")])
    series = [s for s in series if s]
    if not series:
      no_rl.append(arm.name)
      continue
    for ax, (key, title) in zip(axes[0], CURVE_KEYS):
      steps = sorted(set.intersection(*[{x["step"] for x in s if key in x} for s in series]))
      if not steps:
        continue
      vals = np.array([[{x["step"]: x[key] for x in s}[t] for t in steps] for s in series])
      k = smooth or max(1, len(steps) // 10)
      vals = np.stack([demo._smooth(v, k) for v in vals])  # pylint: disable=protected-access
      mean = vals.mean(0)
      ax.plot(steps, mean, color=f"C{i}", label=f"{arm.name} (n={len(series)})")
      if len(series) > 1:
        se = vals.std(0, ddof=1) / math.sqrt(len(series))
        ax.fill_between(steps, mean - se, mean + se, color=f"C{i}", alpha=0.2)
      ax.set(title=f"{title} (moving mean of {k})", xlabel="step", ylabel="mean over the batch")
  for ax in axes[0]:
    if ax.lines:
      ax.legend(fontsize=7)
  if no_rl:
    fig.suptitle(f"no GRPO steps: {', '.join(no_rl)}", fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def plot_tasks(results, out_png):
  """Grouped bars: held-out accuracy per task and overall, one bar per arm, ± standard error."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  arms = results["arms"]
  tasks = _tasks(results)
  groups = ["overall"] + tasks
  width = 0.8 / max(1, len(arms))
  fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(arms)) ** 0.5), 4))
  x = np.arange(len(groups))
  for i, (name, a) in enumerate(arms.items()):
    ms = [a["mean_se"].get("heldout/accuracy" if g == "overall" else f"heldout/{g}")
          for g in groups]
    means = [m["mean"] if m else np.nan for m in ms]
    errs = [m["se"] if m and not math.isnan(m["se"]) else 0.0 for m in ms]
    pos = x + (i - (len(arms) - 1) / 2) * width
    ax.bar(pos, means, width, yerr=errs, capsize=2, color=f"C{i}", alpha=0.8,
           label=f"{name} (n={len(a['seeds'])})")
    for j, g in enumerate(groups):  # The seeds themselves: with 3 of them, show them.
      key = "heldout/accuracy" if g == "overall" else f"heldout/{g}"
      pts = [v[key] for v in a["seeds"].values() if key in v]
      ax.plot([pos[j]] * len(pts), pts, ".", color="k", ms=3)
  ax.set_xticks(x, [g.replace("_", "\n", 1) for g in groups], fontsize=7)
  ax.set(ylabel="held-out answer accuracy", ylim=(0, None),
         title="held-out accuracy per task (mean ± SE; dots: seeds)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def write_record(out, runs, arms, record):
  """results.json, results.md, curves.png and per_task.png in `out`; returns the results."""
  results = summarize(runs, arms, record["baseline"])
  _write_json(os.path.join(out, "results.json"), results)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(results_markdown(results, record))
  plot_curves(runs, arms, os.path.join(out, "curves.png"))
  plot_tasks(results, os.path.join(out, "per_task.png"))
  return results


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_seeds(text):
  """"3" -> [1, 2, 3]; "1,5,9" -> [1, 5, 9]."""
  items = [s for s in text.split(",") if s.strip()]
  if len(items) == 1 and "," not in text:
    n = int(items[0])
    if n < 1:
      raise ValueError(f"--seeds={text}: need at least one seed")
    return list(range(1, n + 1))
  seeds = [int(s) for s in items]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={text}: repeated seed")
  return seeds


def _parser():
  p = argparse.ArgumentParser(prog="python -m spacer_jax.sweep", allow_abbrev=False,
                              description=__doc__.split("\n")[0],
                              epilog="See the module docstring (spacer_jax/sweep.py) for details.")
  p.add_argument("--config", help="config file[:arg], as for spacer_jax.train")
  p.add_argument("--out", help="experiment record directory (experiments/YYYY-MM-DD_slug)")
  p.add_argument("--seeds", default="3", help="N (seeds 1..N) or a comma-separated list")
  p.add_argument("--arm", action="append", default=[], metavar="NAME:--config.x=y,...")
  p.add_argument("--sweep", default="sweep", help="the config file's function sweep(add)")
  p.add_argument("--baseline", default="", help="arm the others are compared with (default: first)")
  p.add_argument("--parallel", type=int, default=1,
                 help="runs at a time (CPU: they share the cores; on an accelerator host keep 1: "
                      "each run takes all local devices)")
  p.add_argument("--runs_dir", default="", help="run workdirs (default {out}/runs)")
  p.add_argument("--module", default="spacer_jax.train", help="training entry point (python -m)")
  p.add_argument("--finish", default="spacer_jax.demo:finish",
                 help="MODULE:FUNCTION(config, workdir) run after training when the run has not "
                      f"written {RESULTS_FILE}; '' for none")
  p.add_argument("--jax_cache_dir", default=None,
                 help="shared XLA compilation cache (default {runs_dir}/jax_cache; '' for none)")
  p.add_argument("--no_share_sft", action="store_true",
                 help="run every arm from scratch (default: an arm that changes only RL settings, "
                      f"{'/'.join(x + '*' for x in RL_ONLY_PREFIXES)}, starts from the baseline "
                      "run's checkpoint at sft_warmup_steps of its seed)")
  p.add_argument("--adopt", action="append", default=[], metavar="ARM:DIR_WITH_{seed}",
                 help="take finished runs made outside the sweep as ARM's runs, e.g. "
                      "--adopt=sgrlvr:runs/demo_seeds/seed_{seed} (their config must be the arm's)")
  p.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
  p.add_argument("--summarize_only", action="store_true", help="only rebuild the record")
  p.add_argument("--finish_run", default="", help=argparse.SUPPRESS)  # The finish subprocess.
  return p


def main(argv=None, printer=print):
  argv = sys.argv[1:] if argv is None else list(argv)
  args, extra = _parser().parse_known_args(argv)
  if args.finish_run:
    finish_run(args.finish_run, args.finish)
    return 0
  bad = [a for a in extra if not _OVERRIDE.match(a)]
  if bad or not args.config or not args.out:
    _parser().error(f"need --config and --out; unknown arguments {bad}" if bad else
                    "need --config and --out")
  from spacer_jax import cli  # pylint: disable=g-import-not-at-top
  # `configs/ablation.py` names the packaged config when ./configs/ablation.py does not exist, as
  # for train.py.
  config = cli.resolve_config(args.config)
  config_file = config.split(":", 1)[0]
  config_arg = os.path.abspath(config_file) + config[len(config_file):]
  arms = [parse_arm(a) for a in args.arm] or sweep_arms(
      os.path.abspath(config_file), args.sweep,
      resolve_config(config_arg, extra, "the sweep's --config flags"))
  baseline = args.baseline or arms[0].name
  if baseline not in {a.name for a in arms}:
    raise ValueError(f"--baseline={baseline!r} is not an arm: {[a.name for a in arms]}")
  seeds = parse_seeds(args.seeds)
  out = os.path.abspath(args.out)
  runs_dir = os.path.abspath(args.runs_dir or os.path.join(out, "runs"))
  cache = (os.path.join(runs_dir, "jax_cache") if args.jax_cache_dir is None
           else args.jax_cache_dir and os.path.abspath(args.jax_cache_dir))
  flats, runs = plan(config_arg, arms, seeds, runs_dir, extra, cache)
  diffs = {a.name: config_diff(flats[baseline], flats[a.name]) for a in arms}
  shared = {} if args.no_share_sft else share_sft(runs, flats, baseline)
  adopted = {}
  for spec in args.adopt:
    arm, sep, pattern = spec.partition(":")
    if not sep or arm not in flats or "{seed}" not in pattern:
      raise ValueError(f"--adopt={spec!r}: expected ARM:DIR with {{seed}} in DIR, ARM one of "
                       f"{sorted(flats)}")
    adopted[arm] = pattern
  command = shlex.join(["python", "-m", "spacer_jax.sweep", *argv])
  if args.dry_run:
    printer(f"{len(arms)} arms x {len(seeds)} seeds = {len(runs)} runs in {runs_dir}")
    for a in arms:
      printer(f"arm {a.name}: {' '.join(a.overrides) or '(the config as it is)'}")
      for k, (b, v) in diffs[a.name].items():
        printer(f"    {k}: {b!r} -> {v!r}  (vs {baseline})")
      if a.name in shared:
        printer(f"    SFT phase: " + (f"its own: {shared[a.name]}" if shared[a.name] else
                                       f"{baseline}'s (starts at step sft_warmup_steps)"))
    for r in runs:
      printer(f"  [{run_status(r)}] python -m {args.module} --workdir={r.run_dir} "
              f"{shlex.join(r.argv)}" + (f"  (from {r.sft_from.run_dir} at step {r.sft_steps})"
                                         if r.sft_from else ""))
    return 0
  for r in runs:
    if r.arm in adopted and run_status(r) == "new":
      adopt(r, os.path.abspath(adopted[r.arm].format(seed=r.seed)), args.module)
      printer(f"{r.arm} seed {r.seed}: adopted {adopted[r.arm].format(seed=r.seed)}")
  os.makedirs(runs_dir, exist_ok=True)
  os.makedirs(out, exist_ok=True)  # --runs_dir may be elsewhere
  with open(os.path.join(runs_dir, ".gitignore"), "w") as f:
    f.write("# Run workdirs of spacer_jax.sweep (checkpoints, logs): not part of the record.\n*\n")
  record_path = os.path.join(out, "sweep.json")
  record = _read_json(record_path, {"invocations": []})
  record.update(config=args.config, seeds=seeds, baseline=baseline, module=args.module,
                finish=args.finish, runs_dir=runs_dir, common_overrides=extra,
                arms=[{"name": a.name, "overrides": a.overrides, "diff_vs_baseline": diffs[a.name],
                       **({"sft_phase": shared[a.name] or f"shared with {baseline}"}
                          if a.name in shared else {})}
                      for a in arms], adopted=adopted)
  record["invocations"].append({"command": command, "git_commit": metrics_lib.git_commit(),
                                "started": datetime.datetime.now().isoformat(timespec="seconds")})
  _write_json(record_path, record)
  errors = {}
  if not args.summarize_only:
    errors = execute(runs, module=args.module, finish=args.finish, parallel=args.parallel,
                     printer=printer)
  results = write_record(out, runs, arms, record)
  for name, per_key in results["comparison"].items():
    c = per_key.get("heldout/accuracy")
    if c:
      printer(f"{name} - {baseline}: held-out accuracy {c['diff']:+.3f} "
              f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] ({c['test']})")
  printer(f"record: {os.path.join(out, 'results.md')}")
  if errors:
    printer(f"{len(errors)} runs did not finish: rerun the same command to resume them")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
