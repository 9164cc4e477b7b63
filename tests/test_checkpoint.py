"""Checkpoints: save/restore of the train state onto shardings, data-iterator state, resume order,
unreadable checkpoints, preemption flag."""

import logging
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacer_jax import checkpoint, optim, sharding


class CountingIter:
  """Minimal iterator with grain-style get_state/set_state."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return self.i

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def _state(mesh, seed=0):
  rng = np.random.default_rng(seed)
  params = {"model.embed_tokens.weight": rng.normal(size=(16, 8)).astype(np.float32),
            "model.norm.weight": np.ones((8,), np.float32)}
  tx, _ = optim.make_optimizer(params, lr=1e-3, total_steps=10)
  shard = sharding.tree_shardings(
      params, mesh, [("vocab", None), ("embed", "fsdp"), ("norm", None)],
      {"model.embed_tokens.weight": ("vocab", "embed"), "model.norm.weight": ("norm",)})
  params = jax.device_put(params, shard)
  state = {"step": jnp.asarray(3, jnp.int32), "params": params,
           "opt_state": tx.init(params), "rng": jax.random.PRNGKey(seed)}
  return state


def test_save_restore_roundtrip_with_shardings_and_iterator(tmp_path):
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  state = _state(mesh)
  it = CountingIter()
  next(it), next(it)
  ck = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert ck.save(3, state, it)
  ck.wait_until_finished()
  assert ck.latest_step() == 3
  fresh = CountingIter()
  abstract = checkpoint.abstract_of(_state(mesh, seed=1))
  restored = ck.restore(3, abstract, fresh)
  assert fresh.i == 2
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  emb = restored["params"]["model.embed_tokens.weight"]
  assert emb.sharding.spec == jax.P(None, "fsdp")
  ck.close()


def test_restore_or_init_order(tmp_path):
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  abstract = checkpoint.abstract_of(_state(mesh))
  calls = []

  def init_fn():
    calls.append(1)
    return _state(mesh, seed=5)

  ck = checkpoint.Checkpointer(tmp_path / "a", use_async=False)
  st, src = checkpoint.restore_or_init(ck, abstract, init_fn)
  assert src == "init" and calls == [1]
  ck.save(7, st, None)
  ck.wait_until_finished()
  # Another run resumes from `a` via config.resume.
  ck_b = checkpoint.Checkpointer(tmp_path / "b", use_async=False)
  st_b, src_b = checkpoint.restore_or_init(ck_b, abstract, init_fn, resume_dir=str(tmp_path / "a"))
  assert src_b == "resume" and calls == [1]
  np.testing.assert_array_equal(st_b["params"]["model.norm.weight"], st["params"]["model.norm.weight"])
  # Its own workdir wins over config.resume once it has a checkpoint.
  st_b = dict(st_b, step=jnp.asarray(9, jnp.int32))
  ck_b.save(9, st_b, None)
  ck_b.wait_until_finished()
  st_c, src_c = checkpoint.restore_or_init(ck_b, abstract, init_fn, resume_dir=str(tmp_path / "a"))
  assert src_c == "workdir" and int(st_c["step"]) == 9
  with pytest.raises(FileNotFoundError, match="config.resume"):
    checkpoint.restore_or_init(checkpoint.Checkpointer(tmp_path / "c"), abstract, init_fn,
                               resume_dir=str(tmp_path / "empty"))
  for c in (ck, ck_b):
    c.close()


def test_max_to_keep_and_duplicate_step(tmp_path):
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  st = _state(mesh)
  ck = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, use_async=False)
  for s in (3, 5, 6):
    assert ck.save(s, st)
  assert not ck.save(6, st)  # e.g. SIGTERM right after a scheduled save
  ck.close()
  assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit()) == [5, 6]


def test_preemption_sets_flag_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with checkpoint.Preemption() as preemption:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.reached(2) and preemption.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):  # a second signal while stopping: Ctrl-C kills at once
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_relative_directory(tmp_path, monkeypatch):
  # `--workdir=runs/demo` is the README's form; orbax alone rejects relative paths.
  monkeypatch.chdir(tmp_path)
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  st = _state(mesh)
  ck = checkpoint.Checkpointer(os.path.join("runs", "ckpt"), use_async=False)
  assert ck.save(1, st)
  ck.close()
  assert ck.latest_step() == 1 and os.path.isdir(tmp_path / "runs" / "ckpt" / "1")


# ------------------------------------------------------------------------------------------------
# Unreadable checkpoints: log, move aside, resume from the newest readable one (or fail if strict).
# ------------------------------------------------------------------------------------------------
def _array_file(step_dir):
  """The largest array chunk file the state item reads."""
  return max((step_dir / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)


def _truncate(p):
  p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


# variant -> (corruption of step directory d, the file the log line must name, relative to d)
CORRUPTIONS = {
    "truncated_array": (lambda d: _truncate(_array_file(d)), "state/d/"),
    "deleted_array": (lambda d: _array_file(d).unlink(), "state/d/"),
    "zeroed_array": (lambda d: _array_file(d).write_bytes(b"\0" * _array_file(d).stat().st_size),
                     "state/d/"),
    "garbage_state_metadata": (lambda d: (d / "state" / "_METADATA").write_text("garbage{"),
                               "state/_METADATA"),
    "garbage_array_metadatas": (
        lambda d: (d / "state" / "array_metadatas" / "process_0").write_bytes(b"\xff\xfe"),
        "state/array_metadatas/process_0"),
    "deleted_ocdbt_manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(), "state/"),
    "empty_step_dir": (lambda d: [shutil.rmtree(d), d.mkdir()], "state"),
    "missing_state_item": (lambda d: shutil.rmtree(d / "state"), "state"),
    "missing_data_item": (lambda d: shutil.rmtree(d / "data"), "data"),
    "garbage_data_json": (lambda d: (d / "data" / "metadata").write_text("{not json"),
                          "data/metadata"),
    "wrong_data_state": (lambda d: (d / "data" / "metadata").write_text(
        '{"kind": "dict", "state": "not the iterator state"}'), "data"),
}


def _two_steps(directory, mesh):
  """Checkpoints at steps 1 and 2 (iterator at 1 and 2); returns the state of step 1."""
  ck = checkpoint.Checkpointer(directory, use_async=False)
  it = CountingIter()
  states = {}
  for s in (1, 2):
    next(it)
    states[s] = dict(_state(mesh, seed=s), step=jnp.asarray(s, jnp.int32))
    ck.save(s, states[s], it)
  ck.close()
  return states[1]


@pytest.mark.parametrize("variant", sorted(CORRUPTIONS))
def test_unreadable_latest_checkpoint_resumes_from_the_previous_one(tmp_path, variant, caplog):
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  want = _two_steps(tmp_path / "ckpt", mesh)
  corrupt, named = CORRUPTIONS[variant]
  corrupt(tmp_path / "ckpt" / "2")
  abstract = checkpoint.abstract_of(_state(mesh))
  ck = checkpoint.Checkpointer(tmp_path / "ckpt", use_async=False)
  it = CountingIter()
  with caplog.at_level(logging.WARNING, logger="spacer_jax.checkpoint"):
    state, source = checkpoint.restore_or_init(ck, abstract, lambda: pytest.fail("init"), it)
  assert source == "workdir" and int(state["step"]) == 1 and it.i == 1
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (line,) = [r.getMessage() for r in caplog.records if r.name == "spacer_jax.checkpoint"]
  assert line.startswith("checkpoint step 2 is unreadable: " + str(tmp_path / "ckpt" / "2" / named))
  assert "resuming from step 1 instead" in line and "\n" not in line
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2.unreadable"]
  assert ck.save(2, state, it)  # the step can be written again
  ck.close()


@pytest.mark.parametrize("variant", ["truncated_array", "missing_data_item"])
def test_resume_strict_makes_an_unreadable_checkpoint_an_error(tmp_path, variant):
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  _two_steps(tmp_path / "ckpt", mesh)
  corrupt, named = CORRUPTIONS[variant]
  corrupt(tmp_path / "ckpt" / "2")
  ck = checkpoint.Checkpointer(tmp_path / "ckpt", use_async=False)
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=re.escape(f"checkpoint step 2 is unreadable: {tmp_path / 'ckpt' / '2' / named}")
                     + ".*config.resume_strict=True"):
    checkpoint.restore_or_init(ck, checkpoint.abstract_of(_state(mesh)), lambda: None, CountingIter(),
                               strict=True)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]  # nothing moved
  ck.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)])
  _two_steps(tmp_path / "ckpt", mesh)
  for s in ("1", "2"):
    shutil.rmtree(tmp_path / "ckpt" / s / "data")
  ck = checkpoint.Checkpointer(tmp_path / "ckpt", use_async=False)
  with pytest.raises(checkpoint.UnreadableCheckpointError, match="no readable checkpoint") as e:
    checkpoint.restore_or_init(ck, checkpoint.abstract_of(_state(mesh)), lambda: pytest.fail("init"))
  assert "step 2 is unreadable" in str(e.value) and "step 1 is unreadable" in str(e.value)
  ck.close()
  # config.resume from another run skips its unreadable steps too, without touching that run.
  other = tmp_path / "other"
  _two_steps(other, mesh)
  _truncate(_array_file(other / "2"))
  ck_b = checkpoint.Checkpointer(tmp_path / "b", use_async=False)
  st, src = checkpoint.restore_or_init(ck_b, checkpoint.abstract_of(_state(mesh)), lambda: None,
                                       resume_dir=str(other))
  assert src == "resume" and int(st["step"]) == 1 and sorted(os.listdir(other)) == ["1", "2"]
  ck_b.close()
