# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,kernelspec,-jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 02 Rollout inspector
#
# **Hardware:** any runtime; reading a run needs no accelerator (Colab CPU is enough). With
# `SMOKE=1` the notebook first trains 2 GRPO steps of `configs/sgrlvr.py:smoke` (tiny random
# model, synthetic data) on whatever devices there are. **Runtime:** seconds for an existing run;
# `SMOKE=1` ~3 min on a 2-core CPU (measured; mostly compilation of the train step and sampler).
#
# Reads the files `python -m spacer_jax.train` writes into its workdir:
# * `metrics.jsonl`: one line per logged step (`reward/*`, `train/*`, `accuracy/*`, `count/*`, ...),
# * `rollouts.jsonl`: one line per completion (`step`, `prompt_id`, `sample`, `problem_type`,
#   `completion`, `answer`, `solution`, `length`, `advantage`, `reward_<component>`),
# * `config.json`: the run's config, used to find the training records and their videos.
#
# and shows, for one step, each prompt's frames, the cognitive map each of its G completions wrote
# (parsed as the map reward parses it) beside the ground-truth map on the same grid, the
# completions, parsed answers, reward components and advantages; then the reward components over
# steps.

# %%
# Install (Colab). Set REPO_URL to this repository's git URL: the one edit a fresh Colab runtime
# (CPU, GPU or TPU) needs. The cell clones the repository to /content/spacer_jax and runs
# `python -m spacer_jax.colab` there: jax at the pinned version for this runtime (jax[tpu],
# jax[cuda12] or plain jax), flax, optax, orbax-checkpoint and grain at their pins, every other
# requirement only where the runtime lacks it or has an older version (nothing Colab preinstalled
# is downgraded: pip runs under a constraints file that holds each installed package at >= its
# version), then the project itself with `pip install -e . --no-deps`. If the install replaced a
# package this kernel had already imported, the cell asks for one restart. Outside Colab it does
# nothing: use the repository's environment (`pip install -r requirements.txt -e .`).
REPO_URL = "https://github.com/YOUR_ORG/spacer_jax.git"
import json
import os
import subprocess
import sys

REPO_DIR = "/content/spacer_jax"
if "google.colab" in sys.modules:
  if "YOUR_ORG" in REPO_URL:
    raise ValueError("set REPO_URL in this cell to the spacer_jax repository's git URL")
  if not os.path.isdir(REPO_DIR):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, REPO_DIR], check=True)
  subprocess.run([sys.executable, "-m", "spacer_jax.colab", "--report=/tmp/spacer_jax_install.json"],
                 cwd=REPO_DIR, check=True)
  sys.path.insert(0, REPO_DIR)
  os.chdir(REPO_DIR)
  with open("/tmp/spacer_jax_install.json") as f:
    stale = [m for m in json.load(f)["modules"] if m in sys.modules]
  if stale:
    raise SystemExit(f"Restart the runtime (Runtime > Restart session), then run all cells again: "
                     f"the install changed {stale}, which this kernel had already imported.")

# %%
import collections
import dataclasses
import pathlib
import tempfile

import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from spacer_jax import cogmap
from spacer_jax import rewards
from spacer_jax.data import sources
from spacer_jax.data import synthetic
from spacer_jax.data import video as video_lib

SMOKE = os.environ.get("SMOKE", "0") == "1"
WORKDIR = os.environ.get("WORKDIR", "/content/runs/sgrlvr")

# %% [markdown]
# ## (SMOKE) A 2-step run to inspect
# `train.train_and_evaluate` is what `python -m spacer_jax.train
# --config=configs/sgrlvr.py:smoke --workdir=...` runs.

# %%
if SMOKE:
  from spacer_jax import cli, config_lib  # pylint: disable=g-import-not-at-top
  from spacer_jax import train  # pylint: disable=g-import-not-at-top
  config_file = pathlib.Path(cli.CONFIG_DIR) / "sgrlvr.py"  # packaged: any install has it
  WORKDIR = tempfile.mkdtemp(prefix="nb02_")
  train.train_and_evaluate(config_lib.load_config_module(str(config_file)).get_config("smoke"),
                           WORKDIR)

# %% [markdown]
# ## Load the run

# %%
workdir = pathlib.Path(WORKDIR)
for name in ("metrics.jsonl", "rollouts.jsonl", "config.json"):
  if not (workdir / name).exists():
    raise FileNotFoundError(f"{workdir / name} not found: point WORKDIR at a spacer_jax.train "
                            "workdir (rollouts.jsonl needs config.rollout_log_every_steps > 0)")
with open(workdir / "metrics.jsonl") as f:
  metrics = [json.loads(line) for line in f if line.strip()]
with open(workdir / "rollouts.jsonl") as f:
  rollouts = [json.loads(line) for line in f if line.strip()]
with open(workdir / "config.json") as f:
  config = ml_collections.ConfigDict(json.load(f))
# SFT steps log their targets (no "completion"); only GRPO rollouts carry rewards.
grpo_rows = [r for r in rollouts if "completion" in r]
print(f"{len(metrics)} metric rows (steps {metrics[0]['step']}..{metrics[-1]['step']}), "
      f"{len(rollouts)} rollout rows, {len(grpo_rows)} of them GRPO completions")
if not grpo_rows:
  raise ValueError(f"{workdir / 'rollouts.jsonl'} has no GRPO completions (SFT steps only?)")

# %% [markdown]
# The training records tell which video and question each `prompt_id` refers to (the same loaders
# as `spacer_jax.train`; the synthetic dataset lives under the workdir unless its config names a
# root).

# %%
d = config.data
if d.source == "synthetic":
  data_paths = synthetic.dataset_paths(d.synthetic_root or str(workdir / "data" / "synthetic"))
  annotations, media_root, maps = data_paths.train_jsonl, data_paths.root, data_paths.cognitive_map
else:
  annotations, media_root, maps = d.annotations, d.media_root, d.cognitive_maps or None
records = {}
if os.path.exists(annotations):
  records = {r.id: r for r in sources.load_spacer(annotations, media_root=media_root,
                                                  cognitive_map_path=maps)}
print(f"{len(records)} records from {annotations}")

# %% [markdown]
# ## One step: frames, cognitive maps, completions, rewards, advantages
# Set `STEP` to any logged step (default: the last one). Each prompt's G completions form one
# GRPO group; the advantages are the group-normalised totals, so they sum to ~0 per group.
#
# The maps: the ground truth (the record's `cognitive_map`, one point per object at its cell of the
# 10x10 floor grid) first, then each completion's `<map>` as `rewards.parse_map` reads it (the
# reward's own parser; the overflow fix is on here only so that a malformed map is drawn instead of
# raising), titled with the map score the rollout got. Colours follow the ground-truth categories.

# %%
STEP = max(r["step"] for r in grpo_rows)
display_config = dataclasses.replace(rewards.DEFAULT, use_overflow_fix=True)
COMPONENTS = ("format", "accuracy_base", "map", "accuracy", "temporal", "length", "total")
step_rows = [r for r in grpo_rows if r["step"] == STEP]
groups = collections.defaultdict(list)
for r in step_rows:
  groups[str(r["prompt_id"])].append(r)

for pid, rows in groups.items():
  rec = records.get(pid)
  print(f"\n=== step {STEP}  prompt {pid}  ({rows[0]['problem_type']})  "
        f"solution {rows[0]['solution']!r}")
  if rec is not None:
    print("question:", rec.problem, "|", " ".join(rec.options))
    if rec.data_type == "video" and os.path.exists(rec.media):
      frames = video_lib.read_video(rec.media, max_frames=d.max_frames).frames
      shown = np.linspace(0, len(frames) - 1, min(8, len(frames))).astype(int)
      fig, axes = plt.subplots(1, len(shown), figsize=(1.8 * len(shown), 2.0), squeeze=False)
      for ax, i in zip(axes[0], shown):
        ax.imshow(frames[i])
        ax.axis("off")
      fig.suptitle(os.path.basename(rec.media), fontsize=8)
      plt.show()
    if rec.cognitive_map:
      order = sorted(rows, key=lambda r: r["sample"])
      fig, axes = plt.subplots(1, 1 + len(order), figsize=(2.3 * (1 + len(order)), 2.6),
                               squeeze=False)
      cogmap.draw(axes[0, 0], rec.cognitive_map, list(rec.cognitive_map), title="ground truth")
      axes[0, 0].legend(fontsize=5, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=2)
      for ax, r in zip(axes[0, 1:], order):
        pred = rewards.parse_map(rewards.extract_map(r["completion"]), list(rec.cognitive_map),
                                 display_config)
        cogmap.draw(ax, pred, list(rec.cognitive_map),
                    title=f"#{r['sample']}: map {r.get('reward_map', float('nan')):.2f}")
      plt.tight_layout()
      plt.show()
  print(f"{'#':>2} {'len':>5} {'answer':>12} " + "".join(f"{c[:9]:>10}" for c in COMPONENTS)
        + f"{'adv':>8}")
  for r in sorted(rows, key=lambda r: r["sample"]):
    print(f"{r['sample']:>2} {r['length']:>5} {r['answer'][:12]!r:>12} "
          + "".join(f"{r.get('reward_' + c, float('nan')):10.3f}" for c in COMPONENTS)
          + f"{r['advantage']:8.3f}")
  for r in sorted(rows, key=lambda r: r["sample"]):
    print(f"--- sample {r['sample']}: {r['completion'][:400]!r}")
  group_adv = np.array([r["advantage"] for r in rows])
  assert abs(group_adv.sum()) < 1e-3 * max(1.0, np.abs(group_adv).sum()), group_adv

# %% [markdown]
# ## Reward components over steps
# From `metrics.jsonl` (means over the B*G completions of each logged step), plus the policy loss,
# KL and mean completion length.

# %%
steps = np.array([m["step"] for m in metrics])
reward_keys = [f"reward/{c}" for c in COMPONENTS if any(f"reward/{c}" in m for m in metrics)]
other_keys = [k for k in ("train/loss", "train/kl", "completion/length_mean")
              if any(k in m for m in metrics)]
fig, axes = plt.subplots(1, 1 + len(other_keys), figsize=(4.5 * (1 + len(other_keys)), 3.2),
                         squeeze=False)
for k in reward_keys:
  axes[0, 0].plot(steps, [m.get(k, np.nan) for m in metrics], marker="o", label=k.split("/")[1])
axes[0, 0].set_xlabel("step")
axes[0, 0].set_title("reward components (mean)")
axes[0, 0].legend(fontsize=7)
for ax, k in zip(axes[0, 1:], other_keys):
  ax.plot(steps, [m.get(k, np.nan) for m in metrics], marker="o")
  ax.set_xlabel("step")
  ax.set_title(k)
plt.tight_layout()
plt.show()

# %% [markdown]
# Per-step means recomputed from `rollouts.jsonl` agree with the logged ones when every step's
# rollouts were logged (`rollout_log_every_steps == log_every_steps == 1`).

# %%
by_step = collections.defaultdict(list)
for r in grpo_rows:
  by_step[r["step"]].append(r["reward_total"])
logged = {m["step"]: m.get("reward/total") for m in metrics}
for s, totals in sorted(by_step.items()):
  print(f"step {s}: mean total from rollouts {np.mean(totals):.4f}, logged {logged.get(s)}")
