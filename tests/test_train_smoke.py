"""`python -m spacer_jax.train --config=configs/sgrlvr.py:smoke`: runs, logs, checkpoints, resumes.

Each run is a subprocess on one CPU device (the 8-device layout is covered by test_sharding.py). The
tokenizer, the synthetic dataset and the XLA compilation cache are shared by the runs of a session,
so only the first run pays for BPE training, rendering and compilation.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time/", "compiles/", "memory/", "rollout/tokens_per_s", "train/tokens_per_s")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return tmp_path_factory.mktemp("smoke_shared")


def _cmd(workdir, shared, *overrides, config="configs/sgrlvr.py:smoke"):
  return [sys.executable, "-m", "spacer_jax.train", f"--config={config}", f"--workdir={workdir}",
          f"--config.jax_cache_dir={shared / 'xla'}",
          f"--config.data.synthetic_root={shared / 'synthetic'}",
          f"--config.data.tokenizer_dir={shared / 'tokenizer'}", "--config.use_progress_bar=False",
          *overrides]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _prepare_shared(shared):
  """Tokenizer files for --config.data.tokenizer_dir (the trainer builds it when missing)."""
  tok = shared / "tokenizer"
  if not (tok / "tokenizer.json").exists():
    from spacer_jax.data import tokenizer as tokenizer_lib
    tokenizer_lib.build_offline_tokenizer(out_dir=str(tok))


def _run(workdir, shared, *overrides, config="configs/sgrlvr.py:smoke"):
  _prepare_shared(shared)
  out = subprocess.run(_cmd(workdir, shared, *overrides, config=config), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stderr


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def _stable(row):
  return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@pytest.mark.slow
def test_smoke_runs_two_steps_then_resumes_at_step_3(tmp_path, shared):
  wd = tmp_path / "run"
  # The lr schedule spans total_steps; pin it so the 2-step run and the 3-step runs share it.
  _run(wd, shared, "--config.optim.decay_steps=3")
  rows = _metrics(wd)
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("reward/total", "reward/format", "reward/accuracy", "train/loss", "train/kl",
              "train/grad_norm", "train/entropy", "train/clip_fraction", "completion/length_mean",
              "reward/dead_groups", "time/rollout_s", "time/train_s", "rollout/tokens_per_s"):
    assert key in rows[0], key
  # Each jitted function compiled during warm-up (step 1) and never again.
  compiles = {k: v for k, v in rows[0].items() if k.startswith("compiles/")}
  assert compiles["compiles/train_step_grpo"] == 1 and compiles["compiles/token_logps"] == 1
  assert rows[0]["memory/host_peak_gib"] > 0
  assert {k: rows[1][k] for k in compiles} == compiles
  with open(wd / "rollouts.jsonl") as f:
    samples = [json.loads(l) for l in f]
  assert {s["step"] for s in samples} == {1, 2}
  assert {"prompt_id", "completion", "answer", "reward_total", "advantage"} <= set(samples[0])
  assert (wd / "ckpt" / "2").is_dir()
  assert json.loads((wd / "config.json").read_text())["model"]["variant"] == "tiny"
  assert (wd / "git_commit.txt").read_text().strip()

  log = _run(wd, shared, "--config.total_steps=3", "--config.optim.decay_steps=3")
  assert "starting at step 3 of 3" in log
  rows_resumed = _metrics(wd)
  assert [r["step"] for r in rows_resumed] == [1, 2, 3]
  assert (wd / "ckpt" / "3").is_dir()

  # The same three steps without a restart give the same metrics.
  straight = tmp_path / "straight"
  _run(straight, shared, "--config.total_steps=3", "--config.optim.decay_steps=3")
  assert [_stable(r) for r in _metrics(straight)] == [_stable(r) for r in rows_resumed]


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, shared):
  _prepare_shared(shared)
  straight = tmp_path / "straight"
  _run(straight, shared, "--config.total_steps=3")
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed, shared, "--config.total_steps=3"), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None:
    if (killed / "metrics.jsonl").exists() and (killed / "metrics.jsonl").read_text().strip():
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  _, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  steps = sorted(int(p) for p in os.listdir(killed / "ckpt") if p.isdigit())
  assert steps and steps[-1] <= 3
  k = steps[-1]
  if k < 3:
    assert "saved step" in err
  _run(killed, shared, "--config.total_steps=3")
  assert [_stable(r) for r in _metrics(killed)] == [_stable(r) for r in _metrics(straight)]


def test_two_runs_from_scratch_are_bit_identical(tmp_path):
  """The same command twice, each run building its own tokenizer and synthetic dataset, gives the same
  metrics and rollouts bit for bit. The second run gets glibc's MALLOC_PERTURB_ (fresh heap memory
  filled with a byte pattern): before the synthetic encoder was pinned to x264's C path, the videos
  depended on what the heap held (issues 14 and 18). The runs share the XLA compilation cache to keep
  this test cheap; the slow demo test (test_demo.py) compiles in each run."""
  outs = {}
  for name, perturb in (("a", ""), ("b", "85")):
    cmd = [sys.executable, "-m", "spacer_jax.train", "--config=configs/sgrlvr.py:smoke",
           f"--workdir={tmp_path / name}", f"--config.jax_cache_dir={tmp_path / 'xla'}",
           "--config.use_progress_bar=False", "--config.use_tensorboard=False"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), "MALLOC_PERTURB_": perturb},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs[name] = tmp_path / name
  a, b = _metrics(outs["a"]), _metrics(outs["b"])
  assert [r["step"] for r in a] == [1, 2]
  assert [_stable(r) for r in a] == [_stable(r) for r in b]
  assert (outs["a"] / "rollouts.jsonl").read_bytes() == (outs["b"] / "rollouts.jsonl").read_bytes()


def test_missing_checkpoint_names_the_config_field(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "spacer_jax.train", "--config=configs/sgrlvr.py",
       f"--workdir={tmp_path}", f"--config.model.hf_dir={tmp_path / 'nope'}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "config.model.hf_dir" in out.stderr


def test_missing_data_names_the_config_field(tmp_path):
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "config.json").write_text("{}")
  out = subprocess.run(
      [sys.executable, "-m", "spacer_jax.train", "--config=configs/grpo.py",
       f"--workdir={tmp_path / 'w'}", f"--config.model.hf_dir={tmp_path / 'ckpt'}",
       f"--config.data.annotations={tmp_path / 'missing.jsonl'}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "config.data.annotations" in out.stderr


# ------------------------------------------------------------------------------------------------
# The jitted step on the tiny model (in process).
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_step():
  import functools

  import jax
  import numpy as np
  import optax

  from spacer_jax import grpo, rollout, sampling, train, tree_utils
  from spacer_jax.models import qwen2_5_vl

  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg)  # host init: no XLA random-number program to compile
  graphdef, flat, paths = tree_utils.split_model(model)
  rng = np.random.default_rng(0)
  grid = np.array([[2, 4, 4], [2, 4, 4]])
  prompts = [[cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id]
             + list(rng.integers(0, 100, n)) for n in (3, 5)]
  t = max(map(len, prompts))
  ids = np.full((2, t), cfg.pad_token_id)
  mask = np.zeros((2, t), bool)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):], mask[i, t - len(p):] = p, True
  pv = rng.normal(size=(64, 1176)).astype(np.float32)
  sampler = sampling.Sampler(model, temperature=1.0)
  prepared = sampler.prepare(ids, mask, pixel_values_videos=pv, video_grid_thw=grid,
                             second_per_grid_ts=np.ones(2))
  g = 2
  st = sampler.decode(sampler.prefill(prepared, max_new_tokens=6, num_samples=g,
                                      rng=jax.random.PRNGKey(1),
                                      params=tree_utils.to_state(flat, paths)),
                      params=tree_utils.to_state(flat, paths))
  tokens, logps, lengths = map(np.asarray, (st.tokens, st.logprobs, st.lengths))
  lengths = np.minimum(lengths, [6, 3, 5, 2])  # ragged masks
  tb = rollout.assemble(prepared, tokens, lengths, g)
  tb["advantages"] = np.array([1.0, -1.0, 0.5, -0.5], np.float32)

  def make(mode="grpo", num_micro=1, freeze=(), beta=0.04, loss_agg="seq_mean_token_mean"):
    keys = tuple(k for k in sorted(flat) if not any(__import__("re").search(p, k) for p in freeze))
    tx = optax.sgd(1.0)
    fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, paths=paths, tx=tx,
                                   trainable_keys=keys, mode=mode,
                                   grpo_config=grpo.GRPOConfig(beta=beta, loss_agg=loss_agg),
                                   num_micro=num_micro))
    state = {"step": jax.numpy.zeros((), "int32"), "params": dict(flat),
             "opt_state": tx.init({k: flat[k] for k in keys}), "rng": jax.random.PRNGKey(0)}
    return fn, state

  logps_fn = jax.jit(functools.partial(train.token_logps, graphdef=graphdef, paths=paths))
  return dict(flat=flat, tb=tb, sampler_logps=logps, make=make, logps_fn=logps_fn)


@pytest.mark.slow
def test_trainer_logps_equal_sampler_logps(tiny_step):
  import numpy as np
  tb = tiny_step["tb"]
  lp = np.asarray(tiny_step["logps_fn"](tiny_step["flat"], tb))
  m = tb["completion_mask"] > 0
  np.testing.assert_allclose(lp[m], tiny_step["sampler_logps"][m], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode,loss_agg", [("grpo", "seq_mean_token_mean"), ("grpo", "token_mean"),
                                           ("grpo", "seq_mean_token_sum_norm"), ("sft", None)])
def test_grad_accumulation_scan_equals_one_batch(tiny_step, mode, loss_agg):
  import numpy as np
  ref = tiny_step["logps_fn"](tiny_step["flat"], tiny_step["tb"]) - 0.1 if mode == "grpo" else None
  kw = dict(mode=mode, loss_agg=loss_agg or "seq_mean_token_mean")
  f1, s1 = tiny_step["make"](num_micro=1, **kw)
  f2, s2 = tiny_step["make"](num_micro=2, **kw)
  a, ma = f1(s1, tiny_step["tb"], ref)
  b, mb = f2(s2, tiny_step["tb"], ref)
  # Micro-batches hold 9 and 7 completion tokens (ragged masks): per-sequence aggregations average
  # exactly, token means (SFT, token_mean) only with the token-share weights of train_step.
  # (The GRPO loss is ~2e-4 here because the advantages sum to 0: compare absolutely.)
  np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(float(mb["grad_norm"]), float(ma["grad_norm"]), rtol=1e-5)
  for k in a["params"]:  # SGD with lr 1: parameter change = gradient
    np.testing.assert_allclose(np.asarray(b["params"][k]), np.asarray(a["params"][k]), atol=1e-6,
                               err_msg=k)


@pytest.mark.slow
def test_nonfinite_gradient_skips_update_and_frozen_vision_stays(tiny_step):
  import numpy as np
  flat, tb = tiny_step["flat"], dict(tiny_step["tb"])
  ref = tiny_step["logps_fn"](flat, tb)
  f, s = tiny_step["make"](freeze=(r"^visual\.",))
  out, m = f(s, tb, ref)
  assert float(m["skipped"]) == 0.0 and int(out["step"]) == 1
  changed = {k for k in flat if not np.array_equal(np.asarray(out["params"][k]), np.asarray(flat[k]))}
  assert changed and not any(k.startswith("visual.") for k in changed)
  assert "model.layers.0.self_attn.q_proj.weight" in changed
  tb["advantages"] = np.array([np.nan, 1.0, 0.0, 0.0], np.float32)
  f, s = tiny_step["make"]()
  out, m = f(s, tb, ref)
  assert float(m["skipped"]) == 1.0 and int(out["step"]) == 1
  for k in flat:
    np.testing.assert_array_equal(np.asarray(out["params"][k]), np.asarray(flat[k]))


@pytest.mark.slow
def test_sft_loss_is_token_mean_nll(tiny_step):
  import numpy as np
  flat, tb = tiny_step["flat"], tiny_step["tb"]
  lp = np.asarray(tiny_step["logps_fn"](flat, tb))
  f, s = tiny_step["make"](mode="sft")
  _, m = f(s, tb, None)
  mask = tb["completion_mask"]
  np.testing.assert_allclose(float(m["loss"]), -(lp * mask).sum() / mask.sum(), rtol=1e-5)
