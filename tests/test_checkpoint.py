"""Checkpoints: save/restore of the train state onto shardings, data-iterator state, resume order,
preemption flag."""

import os
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
