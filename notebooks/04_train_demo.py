# ---
# jupyter:
#   accelerator: TPU
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,kernelspec,-jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 04 Train the demo recipe on every device of the runtime, with live curves
#
# **Hardware:** a Colab TPU runtime, on all of its cores (the demo config's mesh puts every device
# on its `fsdp` axis); a GPU or CPU runtime works too. `SMOKE=1`: a few steps of the same recipe
# on CPU. **Runtime:** the full demo (300 SFT + 50 SG-RLVR steps, then the held-out evaluation) is
# about 8-9 CPU minutes on a 2-core machine (README); on a Colab TPU: not measured in this
# repository yet. `SMOKE=1`: about 1 CPU minute (measured: 57 CPU s, mostly compilation).
#
# The demo: a synthetic spatial-video dataset (rooms with VSI-Bench question types, exact answers
# and ground-truth cognitive maps), a tiny random-init Qwen2.5-VL, SFT on templated
# think/map/answer traces, then SG-RLVR (GRPO with the map reward, the temporal and the length
# bonus), all with the project's real trainer, sampler, rewards and checkpoints.
#
# The trainer runs as its own process, `python -m spacer_jax.train --config=configs/sgrlvr.py:demo`,
# which owns the accelerator (a TPU can be opened by one process at a time, so this kernel never
# imports jax); the cell below redraws the curves from its `metrics.jsonl` while it runs.
# Interrupting that cell sends the trainer SIGTERM: it saves a checkpoint and stops, and running
# the cell again resumes from there. The workdir can then be opened with
# `02_rollout_inspector.ipynb` (`WORKDIR`).

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
import pathlib
import signal
import tempfile
import time

from IPython.display import Image, Markdown, display

from spacer_jax import demo

SMOKE = os.environ.get("SMOKE", "0") == "1"
REPO = pathlib.Path(demo.__file__).resolve().parents[1]  # the repository (or site-packages) root
WORKDIR = pathlib.Path(os.environ.get("WORKDIR") or (
    "/content/runs/demo" if "google.colab" in sys.modules else tempfile.mkdtemp(prefix="nb04_")))
REFRESH_S = 5 if SMOKE else 20  # seconds between redraws
print("workdir:", WORKDIR)

# %% [markdown]
# ## The devices the trainer will see
# Asked in a separate process that exits at once, so the accelerator stays free for the trainer.

# %%
probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices(); print(f'{len(d)} x "
                        "{d[0].platform} ({d[0].device_kind}), jax {jax.__version__}')"],
                       capture_output=True, text=True, check=True)
print(probe.stdout.strip())

# %% [markdown]
# ## Settings
# The demo recipe as it is (`configs/sgrlvr.py:demo`). `EXTRA` takes any `--config.x=y` override,
# e.g. `--config.seed=1`; `SMOKE=1` shrinks it to 2 SFT + 2 GRPO steps on a small dataset.

# %%
EXTRA = ["--config.use_progress_bar=False"]
if SMOKE:
  EXTRA += ["--config.total_steps=4", "--config.sft_warmup_steps=2", "--config.ckpt_every_steps=2",
            "--config.data.synthetic.num_scenes=4", "--config.data.synthetic.num_eval_scenes=1",
            "--config.data.synthetic.questions_per_scene=4", "--config.data.batch_size=2",
            "--config.grpo.num_generations=2", "--config.sampling.max_new_tokens=32",
            "--config.rewards.length_range=(16, 32)", "--config.demo.eval_max_items=4",
            "--config.demo.eval_batch_size=4"]
# `configs/sgrlvr.py` names the config packaged with spacer_jax (spacer_jax/configs/) wherever
# the command runs.
cmd = [sys.executable, "-m", "spacer_jax.train", "--config=configs/sgrlvr.py:demo",
       f"--workdir={WORKDIR}", *EXTRA]
print(" ".join(cmd))

# %% [markdown]
# ## Train, with live curves
# Left: the SFT loss (token NLL on the templated traces). Right: the GRPO rollouts' rewards, each
# step's mean over its 4 prompts x G = 4 completions (faint) and a moving mean. At the end the
# held-out answer accuracy of the SFT and the final checkpoints (greedy) joins the plot.

# %%
WORKDIR.mkdir(parents=True, exist_ok=True)
env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
log_path = WORKDIR / "train.log"
live_png = WORKDIR / "live_curve.png"
handle = display(Markdown(f"starting: log in `{log_path}`"), display_id=True)
with open(log_path, "a") as log:
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
shown = 0
try:
  while True:
    done = proc.poll() is not None
    if (WORKDIR / "metrics.jsonl").exists():
      try:
        rows = demo.read_metrics(str(WORKDIR))
      except ValueError:  # a line being written right now; the next round reads it whole
        rows = []
      if rows and rows[-1]["step"] != shown:
        shown = rows[-1]["step"]
        demo.plot_curves(rows, str(live_png), title=f"step {shown} ({time.strftime('%H:%M:%S')})")
        handle.update(Image(filename=str(live_png)))
    if done:
      break
    time.sleep(REFRESH_S)
except KeyboardInterrupt:
  proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits
  proc.wait()
  print("stopped: the trainer saved a checkpoint; run this cell again to resume from it")
if proc.returncode:
  print(log_path.read_text()[-5000:])
  raise RuntimeError(f"the trainer exited with {proc.returncode}; its log is above")

# %% [markdown]
# ## Result
# The demo's own summary: the rollout rewards over the first and last 20% of the GRPO steps, and
# the held-out answer accuracy (sampled as the rollouts are, on held-out rooms, in the training prompt format)
# after SFT and after RL, per task.

# %%
metrics = json.loads((WORKDIR / "demo_metrics.json").read_text())
print(demo.summary_text(metrics, WORKDIR))
display(Image(filename=str(WORKDIR / "demo_curve.png")))
assert metrics["heldout"]["final"]["num"] > 0
