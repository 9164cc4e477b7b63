"""spacer_jax.distributed in one process: cluster detection, flag checks, the single-process identities.

The multi-process behaviour (gathers, global arrays, whole runs) is tested with real process groups
in test_multihost.py.
"""

import jax
import numpy as np
import pytest

from spacer_jax import checkpoint, distributed, metrics


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # a one-task salloc shell
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "cloud_tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w-0"}, None),  # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, "cloud_tpu"),
])
def test_detected_cluster(env, want):
  assert distributed.detected_cluster(env) == want


@pytest.mark.parametrize("env, want", [
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    ({"SLURM_TASKS_PER_NODE": "1(x4)", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, [0, 1, 2, 3]),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8"}, None),  # one per GPU
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, None),  # no GPU information: JAX decides
])
def test_slurm_one_task_per_node_gets_all_gpus(env, want):
  assert distributed.slurm_local_devices(env) == want


def test_initialize_argument_errors(monkeypatch):
  for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
              "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize(mode="off") is False
  with pytest.raises(ValueError, match="contradicts"):
    distributed.initialize(num_processes=2, mode="off")
  with pytest.raises(ValueError, match=r"without \['num_processes', 'process_id'\]"):
    distributed.initialize(coordinator_address="localhost:1234")
  with pytest.raises(ValueError, match="choose one of"):
    distributed.initialize(mode="sometimes")


def test_cpu_device_count_and_platform_checks(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo --xla_force_host_platform_device_count=8")
  assert distributed._forced_cpu_devices() == 8  # pylint: disable=protected-access
  monkeypatch.setenv("XLA_FLAGS", "")
  assert distributed._forced_cpu_devices() == 1  # pylint: disable=protected-access
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not distributed._accelerator_plugin()  # pylint: disable=protected-access
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert distributed._accelerator_plugin()  # pylint: disable=protected-access


def test_single_process_identities():
  assert jax.process_count() == 1 and distributed.is_primary()
  x = {"a": np.arange(3)}
  assert distributed.allgather_objects(x)[0] is x and distributed.broadcast_object(x) is x
  assert distributed.process_rows(6) == slice(0, 6)
  np.testing.assert_array_equal(distributed.allgather_rows(np.ones((2, 3))), np.ones((2, 3)))
  assert distributed.primary_first(lambda: 5) == 5
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  s = jax.sharding.NamedSharding(mesh, jax.P("fsdp"))
  arr = distributed.put_rows(np.arange(16.0).reshape(8, 2), s)
  assert arr.sharding == s
  np.testing.assert_array_equal(distributed.to_host(arr), np.arange(16.0).reshape(8, 2))


class _Iter:
  def __init__(self):
    self.state = None

  def get_state(self):
    return {"i": 1}

  def set_state(self, state):
    self.state = state


def test_checkpoint_iterator_states():
  """The data item holds every process's state; iterators without set_process_states restore
  only a checkpoint of the same process count; pre-multi-process items still restore."""
  it = _Iter()
  checkpoint._set_iter_state(it, {"kind": "processes", "states": [  # pylint: disable=protected-access
      {"kind": "dict", "state": {"i": 4}}]})
  assert it.state == {"i": 4}
  checkpoint._set_iter_state(it, {"kind": "dict", "state": {"i": 5}})  # pylint: disable=protected-access
  assert it.state == {"i": 5}
  with pytest.raises(ValueError, match="2 processes"):
    checkpoint._set_iter_state(it, {"kind": "processes", "states": [  # pylint: disable=protected-access
        {"kind": "dict", "state": {"i": 4}}, {"kind": "dict", "state": {"i": 6}}]})


def test_inactive_metric_writer_writes_nothing(tmp_path):
  w = metrics.MetricWriter(str(tmp_path / "run"), use_tensorboard=False, active=False)
  w.write(1, {"loss": 1.0})
  w.write_samples(1, [{"a": 1}])
  with pytest.raises(FloatingPointError):  # still checked, so every process stops together
    w.write(2, {"loss": float("nan")})
  w.close()
  assert not (tmp_path / "run").exists()
