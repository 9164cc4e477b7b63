"""Multi-process runs on JAX's multi-controller runtime: one Python process per host (or per GPU).

Every process runs the same program on its own devices; `jax.distributed.initialize` connects them
into one job whose `jax.devices()` are all the devices of all hosts, so the trainer's mesh, jitted
functions and orbax checkpoints span the hosts, and XLA does the collectives (NCCL on GPUs, ICI/DCN
on TPUs, gloo on CPUs). This module holds the host-side pieces:

  initialize(...)          joins the job (explicit coordinator flags, or the cluster's own
                           environment), or does nothing for a single process.
  define_flags / initialize_from_flags
                           the --coordinator_address / --num_processes / --process_id /
                           --distributed flags of train.py, evaluate.py and demo.py.
  allgather_objects(x)     every process's Python value (pickled, gathered by an XLA all-gather).
  broadcast_object(x)      process 0's value on every process.
  process_rows(n)          the rows [i*n/N, (i+1)*n/N) of process i in a global batch of n rows.
  put_rows(local, s)       a global jax.Array from every process's block of rows.
  to_host(x)               a global jax.Array as one numpy array on every process.
  barrier(name), is_primary(), primary_first(fn)

With one process every function is the identity (no collective, no pickling), so a single-process
run does exactly what it did before multi-process support existed.

Which process computes what (the layout the trainer and the evaluator follow): a global batch of B
prompts is split into process blocks, process i holding prompts [i*B/N, (i+1)*B/N) (the data
pipeline reads them, spacer_jax/data/pipeline.py); the device programs (sampler prefill/decode,
train_step, token_logps) are global SPMD programs over the global mesh; the host's small arrays
(token ids, masks, grids, M-RoPE positions: KBs) are gathered so that every process holds the same
global host batch as a single-process run would, while the pixels (the only large host data) stay
process-local and enter the global array through `put_rows` (`jax.make_array_from_process_local_data`).
"""

import importlib.metadata
import os
import pickle
import re
import socket

import jax
import numpy as np
from absl import flags
from absl import logging

DISTRIBUTED_MODES = ("auto", "on", "off")


# ------------------------------------------------------------------------------------------------
# Joining the job.


def define_flags(fv=flags.FLAGS):
  """The multi-process flags shared by the entry points (call it once, under `__main__`)."""
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0's coordinator service (multi-process runs).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes in the job.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                       flag_values=fv)
  flags.DEFINE_enum(
      "distributed", "auto", DISTRIBUTED_MODES,
      "auto: join a job when the coordinator flags are given or a multi-process SLURM step / Open "
      "MPI launch / multi-host Cloud TPU environment is detected, else run alone; on: always call "
      "jax.distributed.initialize (JAX's cluster auto-detection, e.g. on a TPU VM slice); off: one "
      "process, whatever the environment says.", flag_values=fv)


def initialize_from_flags():
  """`initialize` with the values of the flags from `define_flags`."""
  f = flags.FLAGS
  return initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                    process_id=f.process_id, mode=f.distributed)


def detected_cluster(environ=None):
  """Name of a multi-process launcher found in the environment, or None.

  Only launches that really hold more than one process count: a SLURM step (srun) with more than
  one task, an Open MPI job with more than one rank, a Cloud TPU slice whose worker list has more
  than one host. A single-task `salloc` shell or a single-host TPU VM stays a plain single process
  (`--distributed=on` joins JAX's runtime anyway). Telling a multi-host TPU VM slice apart needs its
  metadata server, which this check does not query: on TPU VM slices pass `--distributed=on`.
  """
  env = os.environ if environ is None else environ

  def count(name):
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1

  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and count("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "cloud_tpu"
  return None


def slurm_local_devices(environ=None):
  """All GPUs of the node when a SLURM step runs one task per node, else None.

  JAX's SLURM detection gives each process the one GPU numbered by its SLURM_LOCALID (one process
  per GPU, every GPU visible to every task); a single task per node must be handed all of them.
  """
  env = os.environ if environ is None else environ
  per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
  match = re.match(r"\s*(\d+)", per_node)
  if not match or int(match.group(1)) != 1:
    return None
  gpus = env.get("SLURM_GPUS_ON_NODE")
  if gpus and gpus.isdigit():
    return list(range(int(gpus)))
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  return list(range(len(visible))) if visible else None


def initialize(coordinator_address=None, num_processes=None, process_id=None, mode="auto"):
  """Joins a multi-process job, or does nothing (a single process). Call before any other JAX use.

  Args:
    coordinator_address: "HOST:PORT" of process 0 (the same on every process).
    num_processes, process_id: the job size and this process's index.
    mode: "auto" (join when any of the three is given or `detected_cluster()` finds a launcher),
      "on" (always `jax.distributed.initialize`, with JAX's cluster detection filling in what is not
      given: TPU VMs, SLURM, Open MPI, Kubernetes), "off" (never).

  Returns:
    True if this process is part of a multi-process job.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"--distributed={mode!r}: choose one of {DISTRIBUTED_MODES}")
  explicit = {k: v for k, v in (("coordinator_address", coordinator_address),
                                ("num_processes", num_processes), ("process_id", process_id))
              if v is not None}
  if mode == "off":
    if explicit:
      raise ValueError(f"--distributed=off contradicts {sorted(explicit)}")
    return False
  cluster = detected_cluster()
  if mode == "auto" and not explicit and cluster is None:
    cpu_devices = _forced_cpu_devices()
    if cpu_devices > 1 and not _accelerator_plugin():
      # One process simulating several CPU devices (tests, laptops): a one-process runtime makes
      # XLA's CPU collectives go through gloo, as in a multi-process CPU job, so they sum in the
      # same order and a run gives the same numbers bit for bit whatever its process layout
      # (in-process collectives sum in another order: the last bits differ, and a run whose
      # gradient is only rounding noise, like the smoke recipe's first step, then diverges).
      jax.distributed.initialize(f"localhost:{_free_port()}", num_processes=1, process_id=0)
      logging.info("one process, %d CPU devices: CPU collectives through gloo (as with several "
                   "processes); --distributed=off keeps XLA's in-process ones", cpu_devices)
    return False
  if explicit and len(explicit) < 3 and cluster is None and mode == "auto":
    missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(explicit))
    raise ValueError(f"multi-process flags {sorted(explicit)} given without {missing} and no cluster "
                     "environment to take them from; pass all three (or --distributed=on)")
  logging.info("joining a multi-process job (%s)", ", ".join(
      [f"{k}={v}" for k, v in explicit.items()] + ([f"cluster={cluster}"] if cluster else [])
      or ["jax cluster auto-detection"]))
  if cluster == "slurm" and "process_id" not in explicit:
    local = slurm_local_devices()
    if local is not None:
      explicit["local_device_ids"] = local
  jax.distributed.initialize(**explicit)
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def _forced_cpu_devices():
  """The CPU device count asked for by XLA_FLAGS / jax_num_cpu_devices (1 if neither)."""
  match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  count = int(match.group(1)) if match else 1
  configured = getattr(jax.config, "jax_num_cpu_devices", -1)
  return max(count, configured if isinstance(configured, int) else 1)


def _accelerator_plugin():
  """True when the default backend may not be the CPU: JAX_PLATFORMS does not start with cpu, or a
  GPU/TPU plugin (jax[cuda*], jax[rocm], libtpu) is installed."""
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  names = {(d.metadata["Name"] or "").lower().replace("_", "-")
           for d in importlib.metadata.distributions()}
  return any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Who does what.


def is_primary():
  """True on process 0: the one that writes logs, metrics, predictions and the workdir record."""
  return jax.process_index() == 0


def process_rows(n):
  """slice(i*n/N, (i+1)*n/N): this process's block of a global batch of n rows (n % N == 0)."""
  count, index = jax.process_count(), jax.process_index()
  if n % count:
    raise ValueError(f"a global batch of {n} rows does not split over {count} processes")
  return slice(index * n // count, (index + 1) * n // count)


def barrier(name):
  """Waits until every process reaches the barrier `name` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def primary_first(fn):
  """Runs fn() on process 0, then (after a barrier) on the others; returns its value.

  For work that writes shared files idempotently (a tokenizer built once into the workdir): the
  other processes then find the files and only read them.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if is_primary() else None
  barrier(f"primary_first:{getattr(fn, '__name__', 'fn')}")
  return out if is_primary() else fn()


# ------------------------------------------------------------------------------------------------
# Host data across processes.


def _bucket(n):
  return max(1024, 1 << (int(n) - 1).bit_length())


def _allgather_bytes(data):
  """Every process's bytes, in process order (two all-gathers: lengths, then padded payloads).

  Payloads are padded to a power of two so the gather compiles once per size class, not per call.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int32))
  sizes = np.asarray(sizes).reshape(-1)
  buf = np.zeros((_bucket(sizes.max()),), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buf))  # [N, L] uint8
  return [gathered[i, :int(s)].tobytes() for i, s in enumerate(sizes)]


def allgather_objects(obj):
  """[value of process 0, value of process 1, ...] for any picklable value (numpy arrays exact).

  A collective: every process must call it, in the same order. One process: [obj], untouched.
  """
  if jax.process_count() == 1:
    return [obj]
  return [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(obj, protocol=5))]


def broadcast_object(obj):
  """Process 0's value of `obj` on every process (the others' values are ignored)."""
  if jax.process_count() == 1:
    return obj
  return allgather_objects(obj if is_primary() else None)[0]


def concat_rows(arrays):
  """np.concatenate of a list of per-process arrays along axis 0 (keeps the dtype)."""
  return np.concatenate([np.asarray(a) for a in arrays], axis=0)


def allgather_rows(local):
  """The global array whose process blocks are every process's `local` rows (numpy, exact)."""
  if jax.process_count() == 1:
    return np.asarray(local)
  return concat_rows(allgather_objects(np.asarray(local)))


def to_host(x):
  """A jax.Array (global or local) as a numpy array holding all of it, on every process.

  A collective when `x` spans processes and is not replicated (every process must call it).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _holds_own_block(sharding, global_shape, rows_per_process):
  """True when this process's devices hold exactly its row block [i*n, (i+1)*n) of dim 0."""
  lo = jax.process_index() * rows_per_process
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    rows = index[0] if index else slice(None)
    start, stop, _ = rows.indices(global_shape[0])
    starts.append(start)
    stops.append(stop)
  return min(starts) == lo and max(stops) == lo + rows_per_process


def put_rows(local, sharding):
  """A global jax.Array on `sharding` whose dim 0 is the processes' `local` blocks in process order.

  When this process's devices hold exactly its own block (a batch axis laid over the processes in
  order, the usual mesh), the block goes straight to its devices
  (`jax.make_array_from_process_local_data`, no host-to-host copy); otherwise (a replicated array,
  a mesh whose batch axis crosses processes in another order) the blocks are gathered first.
  Every process must pass a block of the same shape.
  """
  local = np.asarray(local)
  count = jax.process_count()
  if count == 1:
    return jax.device_put(local, sharding)
  global_shape = (local.shape[0] * count,) + local.shape[1:]
  if _holds_own_block(sharding, global_shape, local.shape[0]):
    return jax.make_array_from_process_local_data(sharding, local, global_shape)
  return jax.device_put(allgather_rows(local), sharding)
