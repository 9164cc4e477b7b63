"""Tests of the CPU demo: config, synthetic-data bootstrap, SFT traces, held-out records, plot.

The 3-seed learning check (experiments/2026-11-26_demo/run_seeds.py, ~45 CPU minutes) is marked slow.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spacer_jax import demo, rewards
from spacer_jax.data import synthetic
from spacer_jax.models import qwen2_5_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _get_config(arg):
  from spacer_jax.configs import sgrlvr  # pylint: disable=g-import-not-at-top
  return sgrlvr.get_config(arg)


def _tiny_demo_config():
  c = _get_config("demo")
  c.data.synthetic.num_scenes = 2
  c.data.synthetic.num_eval_scenes = 1
  c.data.synthetic.questions_per_scene = 8
  c.data.synthetic.height = 56
  c.data.synthetic.width = 56
  return c


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = _tiny_demo_config()
  paths = demo.synthetic_paths(config, workdir)  # the bootstrap: generates into {workdir}/data/synthetic
  return config, workdir, paths


def test_demo_config_resolves():
  c = _get_config("demo")
  assert c.mode == "grpo" and c.data.source == "synthetic" and c.model.variant == "tiny"
  assert 0 < c.sft_warmup_steps < c.total_steps and c.sft_target == "process"
  # The held-out evaluation restores the checkpoint at the end of SFT, and the last one.
  assert c.sft_warmup_steps % c.ckpt_every_steps == 0
  assert c.keep_ckpts >= c.total_steps // c.ckpt_every_steps + 1
  lo, hi = c.rewards.length_range
  assert 0 < lo < hi <= c.sampling.max_new_tokens
  assert c.rewards.use_map and c.rewards.use_temporal and c.rewards.use_length
  assert c.grpo.num_generations >= 2 and c.data.batch_size >= 1
  cfg = qwen2_5_vl.tiny(**c.model.tiny_overrides.to_dict())
  head_dim = cfg.hidden_size // cfg.num_attention_heads
  assert 2 * sum(cfg.mrope_section) == head_dim
  sc = demo.synthetic_config(c)
  assert sc.height % 28 == 0 and sc.width % 28 == 0
  assert c.data.video_max_pixels >= sc.height * sc.width and c.data.max_frames >= sc.num_frames
  # Other arguments still work next to the new flag.
  assert _get_config("smoke").total_steps == 2
  assert _get_config("").model.variant == ""


def test_bootstrap_generates_once(demo_run):
  config, workdir, paths = demo_run
  assert paths.root == os.path.join(workdir, "data", "synthetic")
  assert synthetic.is_generated(paths.root, demo.synthetic_config(config))
  mtime = os.path.getmtime(paths.manifest)
  assert demo.synthetic_paths(config, workdir) == paths
  assert os.path.getmtime(paths.manifest) == mtime  # reused, not regenerated


def test_records_carry_full_reward_sft_traces(demo_run):
  """The synthetic generator writes each record's templated trace into `process`: SFT on
  process + solution (sft_target="process") trains on a completion that gets every reward."""
  _, _, paths = demo_run
  recs = [json.loads(line) for line in open(paths.train_jsonl)]
  maps = {json.loads(line)["video_id"]: json.loads(line)["cognitive_map"]
          for line in open(paths.cognitive_map)}
  texts = [r["process"] + r["solution"] for r in recs]
  ex = {"solution": [r["solution"] for r in recs], "problem_type": [r["problem_type"] for r in recs],
        "cognitive_map": [maps[os.path.basename(r["path"])[:-4]] for r in recs]}
  comps, _ = rewards.compute_rewards(texts, ex, np.full(len(texts), 130), 1, None)
  np.testing.assert_array_equal(comps["format"], 1.0)
  np.testing.assert_array_equal(comps["accuracy_base"], 1.0)
  assert all(r["process"].startswith("<think>") and r["process"].endswith("</think>") for r in recs)
  # The map in the trace is the annotation file's map, written as the prompt's example writes one.
  for r in recs:
    assert f"<map>{maps[os.path.basename(r['path'])[:-4]]}</map>" in r["process"]


def test_train_does_not_import_the_demo():
  """The trainer knows nothing about the demo: the demo config names its post_train step."""
  src = open(os.path.join(ROOT, "spacer_jax", "train.py")).read()
  assert "import demo" not in src and "from spacer_jax import demo" not in src
  proc = subprocess.run([sys.executable, "-c", "import sys, spacer_jax.train; "
                         "print('spacer_jax.demo' in sys.modules)"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.stdout.strip() == "False", proc.stderr[-2000:]
  assert _get_config("demo").post_train == "spacer_jax.demo:finish"


def test_heldout_records_use_the_training_prompt(demo_run, tmp_path):
  _, _, paths = demo_run
  records, qtypes = demo.heldout_records(paths, str(tmp_path / "heldout.jsonl"))
  rows = [json.loads(line) for line in open(paths.eval_jsonl)]
  assert len(records) == len(rows) == len(qtypes) > 0
  for rec, row in zip(records, rows):
    assert rec.solution == f"<answer>{row['ground_truth']}</answer>"
    assert rec.problem_type == ("multiple choice" if row["options"] else "numerical")
    assert os.path.exists(rec.media) and rec.cognitive_map
    assert str(list(rec.cognitive_map)) in rec.prompt  # the scene's categories, as in training
    assert qtypes[rec.id] == row["question_type"]


def test_window_means_plot_and_summary(tmp_path):
  rows = [{"step": s, "phase_sft": 1.0, "train/loss": 3.0 / s} for s in range(1, 6)]
  rows += [{"step": s, "phase_sft": 0.0, "reward/accuracy": s / 100, "reward/accuracy_base": 0.5,
            "reward/map": 0.1, "reward/format": 1.0, "reward/total": 1.0} for s in range(6, 16)]
  first, last = demo.window_means(rows, "reward/accuracy")
  assert first == pytest.approx(0.065) and last == pytest.approx(0.145)  # steps 6-7 and 14-15
  with pytest.raises(ValueError, match="no GRPO steps"):
    demo.window_means(rows[:5], "reward/accuracy")
  png = tmp_path / "curve.png"
  heldout = {"sft": {"step": 5, "accuracy_base": 0.3}, "final": {"step": 15, "accuracy_base": 0.4}}
  demo.plot_curves(rows, str(png), heldout)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_and_summary_last_line():
  sft = {"step": 150, "accuracy_base": 0.10, "accuracy": 0.1, "map": 0.2, "format": 0.30,
         "per_task": {"object_counting": 0.2}, "num": 186}
  final = dict(sft, step=200, accuracy_base=0.10 + demo.ACCURACY_MARGIN, format=0.30)
  v = demo.verdict(sft, final)
  assert v["learned"] and v["text"].startswith("learned: ")
  assert not demo.verdict(sft, dict(final, format=0.29))["learned"]  # format fell
  assert not demo.verdict(sft, dict(final, accuracy_base=0.11))["learned"]  # gain below the margin
  assert demo.verdict(sft, dict(final, accuracy_base=0.05))["text"].startswith("did not learn: ")
  m = {"seed": 1, "sft_steps": 150, "grpo_steps": 50, "last_step": 200, "window_frac": 0.2,
       "heldout": {"sft": sft, "final": final}, "verdict": v,
       **{k: {"first": 0.1, "last": 0.2, "gain": 0.1} for k in (
           "reward/accuracy", "reward/accuracy_base", "reward/map", "reward/format")}}
  text = demo.summary_text(m, "/tmp/run", {"train_s": 600.0, "eval_s": 60.0})
  assert text.splitlines()[-1] == "verdict: " + v["text"]
  assert "10.0 min training" in text


@pytest.mark.slow
def test_demo_learns_across_three_seeds(tmp_path):
  """The issue-6 learning check: 3 seeds of the full demo; run_seeds.py --check asserts the margin."""
  script = os.path.join(ROOT, "experiments", "2026-11-26_demo", "run_seeds.py")
  proc = subprocess.run([sys.executable, script, f"--out={tmp_path}", "--check"], cwd=ROOT,
                        capture_output=True, text=True, timeout=3 * 3600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
