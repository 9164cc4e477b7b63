"""Orbax checkpoints of the train state and the data-iterator state (the only file importing orbax).

A checkpoint at step s holds two items:
  state: {"step", "params" (flat {key: array}), "opt_state", "rng"}, saved with StandardSave and restored
         against the abstract state *with its shardings* (so a restore lands directly on the mesh).
  data:  every process's data-iterator `get_state()` as one JSON list in process order (grain
         DatasetIterator dicts, DataLoader bytes, or any iterator exposing get_state/set_state).
The reference model is never saved: it is reloaded from `config.model.hf_dir` (or re-initialised from
the seed for the tiny model), which is what the PyTorch trainer does too.

train.py saves every `config.ckpt_every_steps`, at the end and when `Preemption.reached(step)` says
so: a SIGTERM (or SIGINT) on any process makes every process stop after the same step, save that
step and exit cleanly.

A checkpoint that cannot be read back (a truncated or deleted array file, corrupt metadata, a missing
item, garbage in the iterator state; a disk that filled up or a copy that stopped half way) is not
the end of a run: `restore_or_init` logs one line per unreadable step, naming the step and the file,
moves the step directory aside to `<step>.unreadable` (so a later save of that step is possible and
the evidence is kept) and resumes from the newest readable checkpoint. With strict=True
(config.resume_strict) the first unreadable checkpoint is an error instead. When no checkpoint of a
non-empty directory is readable the run stops with every step's reason: starting from scratch
silently would look like a resume.

Multi-process jobs (spacer_jax/distributed.py): every process calls save and restore; orbax writes
each array's shards from the processes that hold them and process 0 writes the metadata and the JSON
item, so the workdir must be on a file system all hosts share (GCS, NFS, Lustre). The iterator
states are gathered to process 0 before the JSON is written, and on restore each process takes its
own (or, after a change of process count, `ProcessIterator.set_process_states` re-splits them).
"""

import json
import logging
import os
import re
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath

from spacer_jax import distributed

log = logging.getLogger(__name__)


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names the step and the file."""


class Checkpointer:
  """CheckpointManager over `{state, data}` in `directory`."""

  def __init__(self, directory, max_to_keep=3, use_async=True):
    # orbax (ocdbt) requires absolute paths; a relative --workdir is the common case.
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    # The cadence (every N steps, on preemption, at the end) is decided by the loop, not by orbax.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

  def latest_step(self):
    """Latest finalised step in the directory, or None."""
    return self.manager.latest_step()

  def save(self, step, state, data_iter=None):
    """Saves `state` (pytree of jax arrays) and the iterator state at `step` (asynchronously).

    The iterator state is read now, so the iterator may advance while the arrays are written.
    Returns True if a checkpoint was started (False if `step` is already saved).
    """
    if step in self.manager.all_steps():
      return False
    # Every process's iterator state (a collective; orbax writes the JSON item from process 0 only).
    states = distributed.allgather_objects(_iter_state(data_iter))
    items = {"state": ocp.args.StandardSave(state),
             "data": ocp.args.JsonSave({"kind": "processes", "states": states})}
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def reached_preemption(self, step):
    """True at the step at which every process of a multi-process job stops for a preemption
    notice (orbax / jax's preemption sync manager; call it at every step on every process)."""
    return self.manager.reached_preemption(int(step))

  def restore(self, step, abstract_state, data_iter=None):
    """Restores `state` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Also restores `data_iter` in place when given. Raises UnreadableCheckpointError naming the
    step and the file when the checkpoint is damaged.
    """
    step_dir = self.directory / str(int(step))
    try:
      _check_step_files(step_dir)
      items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
      out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    except UnreadableCheckpointError:
      raise
    except Exception as e:  # orbax/tensorstore raise ValueError, KeyError, OSError, ...
      raise UnreadableCheckpointError(_describe(step, step_dir, e)) from e
    if data_iter is not None:
      try:
        _set_iter_state(data_iter, out["data"])
      except Exception as e:  # the iterator's own error for a state it cannot take
        raise UnreadableCheckpointError(
            f"checkpoint step {step} is unreadable: {step_dir / 'data'}: the data iterator cannot "
            f"take the saved state ({type(e).__name__}: {e})") from e
    return out["state"]

  def move_aside(self, step):
    """Renames the directory of `step` to `<step>.unreadable` (orbax ignores it); returns the path."""
    src = self.directory / str(int(step))
    dst = self.directory / f"{int(step)}.unreadable"
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{int(step)}.unreadable-{n}"
    if jax.process_index() == 0:
      src.rename(dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"spacer_jax_move_aside_{int(step)}")
    self.manager.reload()
    return dst

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _iter_state(data_iter):
  """JSON-able iterator state: {"kind": "none" | "dict" | "bytes", "state": ...}."""
  if data_iter is None or not hasattr(data_iter, "get_state"):
    return {"kind": "none", "state": None}
  st = data_iter.get_state()
  if isinstance(st, (bytes, bytearray)):
    return {"kind": "bytes", "state": bytes(st).decode()}
  json.dumps(st)  # Fail here, naming the iterator, rather than inside orbax's writer thread.
  return {"kind": "dict", "state": st}


def _decode_iter_state(saved):
  return saved["state"].encode() if saved.get("kind") == "bytes" else saved["state"]


def _set_iter_state(data_iter, saved):
  """Restores `data_iter` from the JSON item: {"kind": "processes", "states": [one per process]},
  or a single {"kind": ...} state of checkpoints written before multi-process support."""
  states = saved["states"] if saved.get("kind") == "processes" else [saved]
  if all(s.get("kind") == "none" for s in states):
    return
  if hasattr(data_iter, "set_process_states"):
    data_iter.set_process_states([_decode_iter_state(s) for s in states])
    return
  if not hasattr(data_iter, "set_state"):
    raise TypeError(f"{type(data_iter).__name__} has no set_state; cannot resume the data iterator")
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint holds the data-iterator states of {len(states)} processes; "
                     f"{type(data_iter).__name__} cannot be re-split over {jax.process_count()}")
  data_iter.set_state(_decode_iter_state(states[jax.process_index()]))


_JSON_FILES = ("state/_METADATA", "state/array_metadatas/*", "data/metadata")
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def _check_step_files(step_dir):
  """Raises UnreadableCheckpointError for what orbax reports without a file name: a missing item
  directory or a metadata file that is not JSON."""
  step = step_dir.name
  for item in ("state", "data"):
    if not (step_dir / item).is_dir():
      raise UnreadableCheckpointError(
          f"checkpoint step {step} is unreadable: {step_dir / item}: missing")
  for pattern in _JSON_FILES:
    for f in sorted(step_dir.glob(pattern)):
      try:
        json.loads(f.read_text())
      except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UnreadableCheckpointError(
            f"checkpoint step {step} is unreadable: {f}: not JSON ({type(e).__name__}: {e})") from e


def _describe(step, step_dir, e):
  """One line: the step, the most specific file the error names (else the step directory), why."""
  text = " ".join(str(e).split()).split(" [tensorstore_spec")[0]
  files = _LOCAL_FILE.findall(text) or re.findall(r"'(/[^']+)'", text)
  where = files[-1] if files else str(step_dir)
  text = re.sub(r'Error opening "\w+" driver: ', "", text)  # tensorstore's driver stack
  if len(text) > 300:
    text = text[:300] + "..."
  return f"checkpoint step {step} is unreadable: {where}: {type(e).__name__}: {text}"


def restore_newest(ckpt, abstract_state, data_iter=None, *, strict=False, move_aside=True):
  """The newest readable checkpoint of `ckpt`: (state, step), or None when it holds none.

  Steps that cannot be read are logged (one line each, naming the step and the file) and, with
  move_aside, renamed to `<step>.unreadable` once an older step has been restored.

  Args:
    ckpt: Checkpointer.
    abstract_state: restore target (ShapeDtypeStructs with shardings).
    data_iter: iterator restored in place (None: not restored).
    strict: raise UnreadableCheckpointError at the first unreadable step instead.
    move_aside: rename unreadable steps (False for another run's directory, which is only read).

  Raises:
    UnreadableCheckpointError: strict and the newest step is unreadable, or no step is readable.
  """
  failures = []
  for step in sorted(ckpt.manager.all_steps(), reverse=True):
    try:
      state = ckpt.restore(step, abstract_state, data_iter)
    except UnreadableCheckpointError as e:
      if strict:
        raise UnreadableCheckpointError(
            f"{e} (config.resume_strict=True; without it the run resumes from the newest readable "
            "checkpoint)") from e
      failures.append((step, str(e)))
      continue
    for bad_step, why in failures:
      moved = f"; moved to {ckpt.move_aside(bad_step)}" if move_aside else ""
      log.warning("%s; resuming from step %d instead%s", why, step, moved)
    return state, step
  if failures:
    raise UnreadableCheckpointError(f"no readable checkpoint in {ckpt.directory}:\n"
                                    + "\n".join(why for _, why in failures))
  return None


def restore_or_init(ckpt, abstract_state, init_fn, data_iter=None, resume_dir="", strict=False):
  """Returns (state, source) following the resume order.

  Resume order (big_vision / maxtext):
    1. `ckpt.directory` has a checkpoint -> resume from its newest readable step, state and data
       iterator (preemption safety: rerunning the same command with the same workdir continues;
       unreadable newer steps are logged and moved aside, see the module docstring).
    2. `resume_dir` (config.resume) names another run's checkpoint directory -> take its full train
       state (params, optimizer, step, rng) from its newest readable step; the data iterator starts
       fresh.
    3./4. `init_fn()` -> HF weights with a fresh optimizer (config.model.hf_dir), or random init for the
       tiny model; train.py's init_fn decides between the two.

  Args:
    ckpt: Checkpointer of this run.
    abstract_state: pytree of ShapeDtypeStruct with shardings, the restore target.
    init_fn: zero-arg callable building a fresh state (already on its shardings).
    data_iter: the training iterator (restored in place in case 1).
    resume_dir: optional checkpoint directory of another run.
    strict: an unreadable newest checkpoint is an error (config.resume_strict).

  Returns:
    (state, source) with source in {"workdir", "resume", "init"}.
  """
  found = restore_newest(ckpt, abstract_state, data_iter, strict=strict)
  if found is not None:
    return found[0], "workdir"
  if resume_dir:
    other = Checkpointer(resume_dir, use_async=False)
    try:
      found = restore_newest(other, abstract_state, strict=strict, move_aside=False)
    finally:
      other.close()
    if found is None:
      raise FileNotFoundError(f"config.resume={resume_dir!r} holds no checkpoint")
    return found[0], "resume"
  return init_fn(), "init"


def abstract_of(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree of jax arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Preemption:
  """When to stop for a preemption notice: SIGTERM (what schedulers send) or SIGINT, on any process.

  Use as a context manager around the loop and call `reached(step)` once per step on every process;
  when it returns True, save `step` and stop.

  One process: a handler turns SIGTERM/SIGINT into a flag, so the step in flight finishes, is saved
  and the run exits cleanly; a second SIGINT interrupts at once (Ctrl-C twice kills a stuck run).
  Under JAX's distributed runtime (several processes, or one CPU process that joined a one-process
  runtime, see distributed.initialize): JAX's preemption sync manager catches SIGTERM on any process
  (also one that arrives before the loop starts) and agrees with the others on the first step every
  process can still reach; `reached` turns True at that same step on all of them (orbax's
  `CheckpointManager.reached_preemption`), so they save one consistent checkpoint. SIGINT is sent on
  to the process as a SIGTERM, so Ctrl-C takes the same path; no Python SIGTERM handler is
  installed, which would replace JAX's.

  Attributes:
    requested: a notice arrived (this process's signal, or the agreed stop of a multi-process job).
    signum: the signal this process received, if any.
  """

  def __init__(self, checkpointer=None):
    self._ckpt = checkpointer
    self.requested = False
    self.signum = None
    self._previous = {}
    self._multi = False

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      prev = self._previous.get(signum)
      if callable(prev):
        prev(signum, frame)
      raise KeyboardInterrupt
    first = self.signum is None
    self.signum = signum
    if not self._multi:
      self.requested = True
    elif first:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler starts the agreement

  def __enter__(self):
    self._multi = jax.distributed.is_initialized()
    signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, prev in self._previous.items():
      signal.signal(s, prev)
    self._previous = {}
    return False

  def reached(self, step):
    """True when the loop must save `step` and stop (the same step on every process)."""
    if self._multi and self._ckpt is not None and self._ckpt.reached_preemption(step):
      self.requested = True
    return self.requested


def latest_step(ckpt_dir):
  """Largest finished step in an orbax directory (a numeric subdirectory holding `state`), or None.

  In-progress asynchronous saves live in temporary directories whose names are not numbers."""
  ckpt_dir = os.fspath(ckpt_dir)
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [int(n) for n in os.listdir(ckpt_dir)
           if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state"))]
  return max(steps) if steps else None


def restore_params(ckpt_dir, abstract_params, step=None):
  """Restores only `state["params"]` (`{hf_key: array}`) of a checkpoint onto the given
  ShapeDtypeStructs (their dtype and sharding); the optimizer state is never read.

  Args:
    ckpt_dir: a run's ckpt/ directory.
    abstract_params: `{hf_key: jax.ShapeDtypeStruct}` with shardings (modeling.AbstractModel.params).
    step: the step to read (default: the latest).
  """
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  step = latest_step(ckpt_dir) if step is None else int(step)
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
  path = os.path.join(ckpt_dir, str(step), "state")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step} (steps: "
                            f"{sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())})")
  item = {"params": abstract_params}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                              item)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
  except ValueError as e:
    raise ValueError(f"{path}: the checkpoint's params do not match the model: {e}") from e
  return out["params"]
