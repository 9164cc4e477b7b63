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
  assert "training steps 3..3" in log
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


@pytest.mark.slow
def test_cli_trains_from_hf_checkpoint_with_qwen_tokenizer(tmp_path, shared):
  """The README's real-recipe command on a tiny checkpoint written by transformers with Qwen2.5's real
  tokenizer (vocab 151,936), on one device: 2 steps, then a resumed third."""
  from conftest import write_tiny_hf_checkpoint  # pylint: disable=g-import-not-at-top
  hf = tmp_path / "hf"
  write_tiny_hf_checkpoint(str(hf), tokenizer="qwen")
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "spacer_jax.train", "--config=configs/sgrlvr.py:smoke",
         "--config.model.variant=", f"--config.model.hf_dir={hf}", f"--workdir={wd}",
         f"--config.data.synthetic_root={shared / 'synthetic'}", "--config.use_progress_bar=False"]
  for steps in (2, 3):
    out = subprocess.run(cmd + [f"--config.total_steps={steps}"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    assert [r["step"] for r in _metrics(wd)] == list(range(1, steps + 1))
  assert json.loads((wd / "model_config.json").read_text())["text_config"]["vocab_size"] == 151936
