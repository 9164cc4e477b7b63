"""`python -m spacer_jax.train --config=configs/sgrlvr.py:smoke`: runs, logs, checkpoints, resumes.

Each run is a subprocess on one CPU device (the 8-device layout is covered by test_sharding.py). The
tokenizer, the synthetic dataset and the XLA compilation cache are shared by the runs of a session,
so only the first run pays for BPE training, rendering and compilation.
"""

import json
import os
import shutil
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
  # beta > 0: the reference log-probs; num_iterations = 1: no old-policy log-prob pass.
  assert compiles["compiles/train_step_grpo"] == 1 and compiles["compiles/token_logps_ref"] == 1
  assert compiles["compiles/token_logps"] == 0
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


@pytest.mark.slow
def test_unreadable_latest_checkpoint_resumes_from_the_previous_one(tmp_path, shared):
  wd = tmp_path / "run"
  _run(wd, shared, "--config.ckpt_every_steps=1")
  chunk = max((wd / "ckpt" / "2" / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
  chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])  # e.g. a full disk
  strict = subprocess.run(_cmd(wd, shared, "--config.total_steps=3", "--config.resume_strict=True"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
  assert strict.returncode != 0 and "config.resume_strict=True" in strict.stderr
  assert f"checkpoint step 2 is unreadable: {chunk}" in strict.stderr
  log = _run(wd, shared, "--config.total_steps=3", "--config.ckpt_every_steps=1")
  (line,) = [l for l in log.splitlines() if "is unreadable" in l]
  assert f"checkpoint step 2 is unreadable: {chunk}" in line and "resuming from step 1" in line
  assert "resumed from this workdir's checkpoint at step 1; training steps 2..3" in log
  assert [r["step"] for r in _metrics(wd)] == [1, 2, 3]
  assert sorted(os.listdir(wd / "ckpt")) == ["1", "2", "2.unreadable", "3"]


HOSTILE_IDS = ("hostile-not-utf8", "hostile-dotdot", "hostile-absolute")


def _hostile_dataset(root, synthetic_root):
  """SpaceR-151k-format data from the synthetic generator's output: one good record and three bad
  lines (a non-UTF-8 byte, a `../` path and an absolute path, both to real videos). Were the bad
  ones loaded, the first 4 draws (2 smoke steps x batch 2, one epoch of 4) would use each of them.

  Returns the --config overrides that point the smoke run at it.
  """
  from spacer_jax.data import synthetic
  paths = synthetic.generate_dataset(str(synthetic_root), synthetic.SyntheticConfig.demo(
      num_scenes=4, num_eval_scenes=2, questions_per_scene=4), progress=False)  # = the smoke data
  with open(paths.train_jsonl) as f:
    good = json.loads(f.readline())
  media, outside = root / "media", root / "outside"
  name = os.path.basename(good["path"])  # same name everywhere: the cognitive map is found by it
  (media / os.path.dirname(good["path"])).mkdir(parents=True)
  outside.mkdir()
  for dst in (media / good["path"], outside / name):
    shutil.copy(os.path.join(paths.root, good["path"]), dst)
  rows = [good, dict(good, problem_id=HOSTILE_IDS[1], path=f"../outside/{name}"),
          dict(good, problem_id=HOSTILE_IDS[2], path=str(outside / name))]
  lines = [json.dumps(r).encode() for r in rows]
  lines.insert(1, json.dumps(dict(good, problem_id=HOSTILE_IDS[0])).encode().replace(
      b'"problem": "', b'"problem": "\xff'))
  (root / "spacer.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  return ["--config.data.source=spacer", f"--config.data.annotations={root / 'spacer.jsonl'}",
          f"--config.data.media_root={media}", f"--config.data.cognitive_maps={paths.cognitive_map}"]


WANT_AT_LOAD = {"data/bad_records_at_load": 3, "data/bad_records_at_load/absolute_media_path": 1,
                "data/bad_records_at_load/media_outside_root": 1,
                "data/bad_records_at_load/not_utf8": 1}


def test_hostile_dataset_records(tmp_path, shared, caplog):
  """The data side of the acceptance run below (default run): the trainer's record loader keeps
  the good record and counts the three bad ones, each by cause."""
  from spacer_jax import config_lib, train
  from spacer_jax.configs import sgrlvr
  overrides = _hostile_dataset(tmp_path, shared / "synthetic")
  config = sgrlvr.get_config("smoke")
  for o in overrides:
    key, value = o[len("--config."):].split("=", 1)
    section, field = key.split(".")
    config[section][field] = value
  config_lib.validate(config)
  records, bad = train.load_records(config, str(tmp_path / "w"))
  assert len(records) == 1 and records[0].id not in HOSTILE_IDS
  assert bad.metrics("data/bad_records_at_load") == WANT_AT_LOAD
  lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
  assert any("'line 2'" in m and "spacer.jsonl: not_utf8" in m for m in lines), lines
  assert any(f"'{HOSTILE_IDS[1]}'" in m and "media_outside_root" in m for m in lines), lines
  assert any(f"'{HOSTILE_IDS[2]}'" in m and "absolute_media_path" in m for m in lines), lines
  # Not vacuous: with the switch on, both path records load (their videos and maps are real).
  config.data.allow_media_outside_root = True
  records, _ = train.load_records(config, str(tmp_path / "w"))
  assert sorted(r.id for r in records if r.id in HOSTILE_IDS) == sorted(HOSTILE_IDS[1:])


@pytest.mark.slow
def test_hostile_dataset_trains_two_steps(tmp_path, shared):
  """Issue 14's acceptance: the smoke recipe on SpaceR-151k-format data with a non-UTF-8 line, a
  `../` path and an absolute path trains 2 steps; the three are bad records, never rollouts."""
  overrides = _hostile_dataset(tmp_path / "data", shared / "synthetic")
  wd = tmp_path / "run"
  _run(wd, shared, *overrides)
  rows = _metrics(wd)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert {k: v for k, v in r.items() if k.startswith("data/bad_records_at_load")} == WANT_AT_LOAD
  with open(wd / "rollouts.jsonl") as f:
    used = {json.loads(l)["prompt_id"] for l in f}
  assert used and not used & set(HOSTILE_IDS)


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


def test_bad_config_lists_every_problem_without_a_traceback(tmp_path):
  """Missing paths and impossible values are all reported in one message, before any work."""
  out = subprocess.run(
      [sys.executable, "-m", "spacer_jax.train", "--config=configs/sgrlvr.py",
       f"--workdir={tmp_path / 'w'}", f"--config.model.hf_dir={tmp_path / 'nope'}",
       f"--config.data.annotations={tmp_path / 'missing.jsonl'}", "--config.data.batch_size=0",
       "--config.grpo.num_generations=1"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "the config has 6 problems" in out.stderr, out.stderr[-3000:]
  for field in ("config.model.hf_dir", "config.data.annotations", "config.data.media_root",
                "config.data.cognitive_maps", "config.data.batch_size = 0",
                "config.grpo.num_generations = 1"):
    assert field in out.stderr, field
  assert not (tmp_path / "w").exists()  # nothing written, nothing compiled


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
