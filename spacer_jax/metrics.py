"""Metric logging: workdir/metrics.jsonl, TensorBoard, Weights & Biases, workdir/rollouts.jsonl, timers,
progress bar.

One line of metrics.jsonl per logged step (`{"step": s, "name": value, ...}`), the same scalars as
TensorBoard scalars (tensorboardX, no TensorFlow needed), and one line per completion in
rollouts.jsonl. On resume from step s, lines with step >= s are dropped first, so a run killed after
its last checkpoint and resumed has the same files as one that never stopped. In a multi-process job
only process 0's writer is active (the others check values and keep timers, and write nothing).

With `config.wandb.project` set, `WandbWriter` also sends the same scalars, the run's config and a
table of sample rollouts to Weights & Biases (`--config.wandb.mode=offline` writes them under
{workdir}/wandb for a later `wandb sync`); wandb is imported only then.
"""

import contextlib
import json
import math
import os
import resource
import secrets
import string
import subprocess
import sys
import time

import numpy as np


def memory_scalars(devices=None):
  """Memory in GiB: the accelerators' peak / current / limit (max over `devices`, default the local
  devices) where the backend reports them (GPU, TPU; XLA:CPU does not), and this process's peak RSS.

  Returns a dict of "memory/..." scalars for MetricWriter.write.
  """
  if devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.local_devices()
  gib = 2.0 ** 30
  out = {}
  stats = [s for s in (d.memory_stats() for d in devices) if s]
  for key, name in (("peak_bytes_in_use", "device_peak"), ("bytes_in_use", "device_in_use"),
                    ("bytes_limit", "device_limit")):
    values = [s[key] for s in stats if key in s]
    if values:
      out[f"memory/{name}_gib"] = max(values) / gib
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  out["memory/host_peak_gib"] = rss / gib * (1 if sys.platform == "darwin" else 1024)
  return out


def git_commit(path=None):
  """HEAD of the git checkout holding `path` (default: this package), "-dirty" with uncommitted
  changes to tracked files; "unknown" outside a checkout."""
  here = path or os.path.dirname(os.path.abspath(__file__))
  try:
    sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def every(step, n):
  """True every `n` steps (n <= 0: never)."""
  return n > 0 and step % n == 0


def _truncate_jsonl(path, start_step):
  """Drops lines whose "step" >= start_step (lines written after the checkpoint we resume from)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      if line.strip() and json.loads(line).get("step", -1) < start_step:
        keep.append(line)
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def _to_python(v):
  if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
    v = v.item()
  if isinstance(v, np.ndarray):
    v = v.tolist()
  return v


class MetricWriter:
  """Writes scalars and rollout samples for one run.

  Args:
    workdir: run directory.
    start_step: first step this process will log (older lines >= start_step are dropped).
    use_tensorboard: also write TensorBoard event files under workdir/tb.
    active: False opens and writes no file (the non-zero processes of a multi-process job); `write`
      still raises on non-finite values, so every process stops at the same step.
    wandb: config.wandb as a dict ({project, entity, name, tags, group, notes, mode}); a non-empty
      project also logs to Weights & Biases (WandbWriter), from the active writer only.
    config: the run's config as a dict, recorded as the W&B run config.
  """

  def __init__(self, workdir, start_step=1, use_tensorboard=True, active=True, wandb=None,
               config=None):
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.rollouts_path = os.path.join(workdir, "rollouts.jsonl")
    self._metrics = self._rollouts = self._tb = self._wandb = None
    self._timers = {}
    self._last_finite_step = start_step - 1
    if not active:
      return
    os.makedirs(workdir, exist_ok=True)
    for p in (self.metrics_path, self.rollouts_path):
      _truncate_jsonl(p, start_step)
    self._metrics = open(self.metrics_path, "a")
    self._rollouts = open(self.rollouts_path, "a")
    if use_tensorboard:
      import tensorboardX  # Optional at import time: only runs that log to TensorBoard need it.
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    if wandb and wandb.get("project"):
      self._wandb = WandbWriter(workdir, config=config, **wandb)

  def write(self, step, scalars, nonfinite_ok=()):
    """Logs a dict of scalars for `step`; raises FloatingPointError on NaN/inf.

    Args:
      step: int.
      scalars: {name: number or 0-d array}; non-scalar values are skipped for TensorBoard.
      nonfinite_ok: names allowed to be NaN/inf (e.g. the loss of a step whose update was skipped).
    """
    row = {k: _to_python(v) for k, v in scalars.items()}
    bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)
                 and k not in nonfinite_ok)
    if self._metrics is not None:
      self._metrics.write(json.dumps({"step": int(step), **row}) + "\n")
      self._metrics.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.write(step, row)
    if bad:
      raise FloatingPointError(
          f"non-finite metrics {bad} first seen between step {self._last_finite_step + 1} and step "
          f"{step} (see {self.metrics_path})")
    self._last_finite_step = int(step)

  def write_samples(self, step, samples, num_text=4):
    """Appends one JSON line per sample dict (prompt id, completion, parsed answer, rewards, advantage)
    and shows the first `num_text` as TensorBoard text and a W&B table ("rollouts/samples"). Process 0
    only."""
    if self._rollouts is None:
      return
    for s in samples:
      self._rollouts.write(json.dumps({"step": int(step), **{k: _to_python(v) for k, v in s.items()}})
                           + "\n")
    self._rollouts.flush()
    if self._tb is not None and samples and num_text:
      self._tb.add_text("rollouts/samples", samples_markdown(samples[:num_text]), int(step))
      self._tb.flush()
    if self._wandb is not None and samples and num_text:
      self._wandb.write_samples(step, samples[:num_text])

  @contextlib.contextmanager
  def timed(self, name):
    """Accumulates wall time of the block under `name` (read with `pop_timers`)."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._timers[name] = self._timers.get(name, 0.0) + time.perf_counter() - t0

  def pop_timers(self):
    """{"time/<name>_s": seconds} accumulated since the last call."""
    out = {f"time/{k}_s": v for k, v in self._timers.items()}
    self._timers = {}
    return out

  def close(self):
    for f in (self._metrics, self._rollouts):
      if f is not None:
        f.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()


class WandbWriter:
  """A Weights & Biases run for one workdir: scalars, the config, tables of rollout samples.

  The run id is kept in {workdir}/wandb_run_id.txt, so rerunning the same workdir (a resume) continues
  the same W&B run: online with resume="allow"; offline as another directory under {workdir}/wandb
  with the same id, which `wandb sync` adds to that run. W&B keeps the first value it got for a step,
  so steps that a killed process logged after its last checkpoint keep their old values there
  (metrics.jsonl and TensorBoard get the resumed values).

  Args:
    workdir: run directory (W&B's files go to {workdir}/wandb).
    project, entity, name, tags, group, notes: wandb.init's; "" / () = W&B's default (name: the
      workdir's base name).
    mode: "online", "offline" (no network) or "disabled".
    config: dict recorded as the run's config.
  """

  ID_FILE = "wandb_run_id.txt"

  def __init__(self, workdir, *, project, entity="", name="", tags=(), group="", notes="",
               mode="online", config=None):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("config.wandb.project is set but wandb is not installed: "
                        "pip install 'spacer_jax[wandb]'") from e
    self._wandb = wandb
    id_path = os.path.join(workdir, self.ID_FILE)
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      alphabet = string.ascii_lowercase + string.digits
      run_id = "".join(secrets.choice(alphabet) for _ in range(8))
      with open(id_path, "w") as f:
        f.write(run_id + "\n")
    self.run = wandb.init(
        project=project, entity=entity or None,
        name=name or os.path.basename(os.path.normpath(workdir)), tags=list(tags) or None,
        group=group or None, notes=notes or None, mode=mode, config=config, dir=workdir, id=run_id,
        resume="allow" if mode == "online" else None)

  def write(self, step, row):
    """Logs the numeric values of a metrics row at `step`."""
    self.run.log({k: v for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=int(step))

  def write_samples(self, step, samples):
    """Logs the sample dicts as one table ("rollouts/samples"): a column per key (lists and dicts as
    JSON text)."""
    columns = list(dict.fromkeys(k for s in samples for k in s))

    def cell(v):
      v = _to_python(v)
      return json.dumps(v) if isinstance(v, (list, dict)) else v

    data = [[cell(s.get(c)) for c in columns] for s in samples]
    table = self._wandb.Table(columns=columns, data=data, allow_mixed_types=True)
    self.run.log({"rollouts/samples": table}, step=int(step))

  def close(self):
    """Finishes the run and waits until W&B's service has written everything: `finish` alone
    returns while the service may still be writing the run's file (a reader right after close, or a
    resumed writer in the same process, could see it incomplete)."""
    self.run.finish()
    self._wandb.teardown()


def samples_markdown(samples):
  """Rollout samples as Markdown for TensorBoard's text tab: a header line of the short fields, then
  the completion (or SFT target) in a code block."""
  blocks = []
  for s in samples:
    head = ", ".join(f"{k}={_to_python(v)}" for k, v in s.items()
                     if k not in ("completion", "target") and not isinstance(v, (list, dict)))
    body = str(s.get("completion", s.get("target", ""))).replace("```", "`\u200b``")
    blocks.append(f"**{head}**\n\n```\n{body}\n```")
  return "\n\n".join(blocks)


def progress(start_step, total_steps, disable=False):
  """tqdm progress bar over steps [start_step, total_steps] with ETA; `.update(1)` per step."""
  import tqdm  # Host-only UI dependency.
  return tqdm.tqdm(total=total_steps, initial=start_step - 1, desc="train", unit="step",
                   dynamic_ncols=True, disable=disable)
