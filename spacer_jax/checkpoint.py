"""Orbax checkpoints of the train state and the data-iterator state (the only file importing orbax).

A checkpoint at step s holds two items:
  state: {"step", "params" (flat {key: array}), "opt_state", "rng"}, saved with StandardSave and restored
         against the abstract state *with its shardings* (so a restore lands directly on the mesh).
  data:  every process's data-iterator `get_state()` as one JSON list in process order (grain
         DatasetIterator dicts, DataLoader bytes, or any iterator exposing get_state/set_state).
The reference model is never saved: it is reloaded from `config.model.hf_dir` (or re-initialised from
the seed for the tiny model), which is what the PyTorch trainer does too.

Multi-process jobs (spacer_jax/distributed.py): every process calls save and restore; orbax writes
each array's shards from the processes that hold them and process 0 writes the metadata and the JSON
item, so the workdir must be on a file system all hosts share (GCS, NFS, Lustre). The iterator
states are gathered to process 0 before the JSON is written, and on restore each process takes its
own (or, after a change of process count, `ProcessIterator.set_process_states` re-splits them).

train.py saves every `config.ckpt_every_steps`, at the end and when `Preemption.reached(step)` says
so: a SIGTERM (or SIGINT) on any process makes every process stop after the same step, save that
step and exit cleanly.
"""

import json
import os
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath

from spacer_jax import distributed


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

    Also restores `data_iter` in place when given.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    if data_iter is not None:
      _set_iter_state(data_iter, out["data"])
    return out["state"]

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


def restore_or_init(ckpt, abstract_state, init_fn, data_iter=None, resume_dir=""):
  """Returns (state, source) following the resume order.

  Resume order (big_vision / maxtext):
    1. `ckpt.directory` has a checkpoint -> resume from its latest step, state and data iterator
       (preemption safety: rerunning the same command with the same workdir continues).
    2. `resume_dir` (config.resume) names another run's checkpoint directory -> take its full train
       state (params, optimizer, step, rng); the data iterator starts fresh.
    3./4. `init_fn()` -> HF weights with a fresh optimizer (config.model.hf_dir), or random init for the
       tiny model; train.py's init_fn decides between the two.

  Args:
    ckpt: Checkpointer of this run.
    abstract_state: pytree of ShapeDtypeStruct with shardings, the restore target.
    init_fn: zero-arg callable building a fresh state (already on its shardings).
    data_iter: the training iterator (restored in place in case 1).
    resume_dir: optional checkpoint directory of another run.

  Returns:
    (state, source) with source in {"workdir", "resume", "init"}.
  """
  step = ckpt.latest_step()
  if step is not None:
    return ckpt.restore(step, abstract_state, data_iter), "workdir"
  if resume_dir:
    other = Checkpointer(resume_dir, use_async=False)
    other_step = other.latest_step()
    if other_step is None:
      raise FileNotFoundError(f"config.resume={resume_dir!r} holds no checkpoint")
    state = other.restore(other_step, abstract_state)
    other.close()
    return state, "resume"
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
