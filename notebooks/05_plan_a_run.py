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
# # 05 Plan a real run: will it fit on a TPU slice, and how fast would it go?
#
# **Hardware:** any runtime; a CPU runtime is enough. The planner compiles the recipe's jitted
# functions for abstract TPU chips with the real TPU compiler (libtpu) while the local devices stay
# CPU: no TPU is needed and no weights are downloaded. **Runtime:** `SMOKE=1` (the tiny recipe's
# train step for a v5p-8): about 1 minute. A 7B recipe on a v5p-8: 17 CPU minutes of compilation
# and about 10.5 GB of host memory (61 minutes wall on a loaded 2-core machine): use a high-RAM
# runtime for 7B and larger.
#
# `python -m spacer_jax.plan` builds the trainer's own pieces (the model with its shardings, the
# sampler's prefill and decode loop, the vision encoder, the reference log-probs, the train step)
# with the recipe's real shapes, lowers and compiles each for the chosen slice, and reads the
# compiler's memory and cost analysis: per-chip peak memory against the chip's HBM (a verdict, and
# what to change when it does not fit), the step time, the train-phase MFU and the rollout tokens/s
# the compiler's estimates imply (lower / upper bounds: see the README, "Will it fit?").

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
import importlib.util
import pathlib
import tempfile

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

SMOKE = os.environ.get("SMOKE", "0") == "1"
OUT = pathlib.Path(tempfile.mkdtemp(prefix="nb05_"))

# %% [markdown]
# ## What to plan
# `CONFIG`: any training config with its arguments, as `python -m spacer_jax.train` takes it:
# `configs/sgrlvr.py:size=3b|7b|32b|72b` (add `,lora=16` for LoRA), `configs/sft.py:size=7b`,
# `configs/grpo.py:size=7b`. `TOPOLOGY`: a Cloud TPU slice name (`v5e-1` and `v6e-1` are Colab's
# single-chip TPU runtimes; `v4-8`, `v5e-8`, `v5p-8`, `v6e-8`, `v5p-32`, ...) or `local` (the devices
# of this runtime). `EXTRA`: `--config.x=y` overrides (micro-batches, remat, frames, batch size).

# %%
CONFIG = os.environ.get("CONFIG", "configs/sgrlvr.py:size=7b")
TOPOLOGY = os.environ.get("TOPOLOGY", "v5p-8")
EXTRA = []  # e.g. ["--config.grad_accum_steps=2", "--config.data.max_frames=8"]
FUNCTIONS = []  # [] = every function of one step; e.g. ["train_step"]
if SMOKE:  # the tiny recipe's train step, short prompts
  CONFIG, FUNCTIONS, EXTRA = "configs/sgrlvr.py:smoke", ["train_step"], ["--text_tokens=24"]
if TOPOLOGY != "local" and importlib.util.find_spec("libtpu") is None:
  if "google.colab" in sys.modules:  # the TPU compiler at the project's pinned jax version
    subprocess.run([sys.executable, "-m", "spacer_jax.colab", "--accelerator=tpu"], cwd=REPO_DIR,
                   check=True)
  else:
    raise SystemExit("the TPU compiler (libtpu) is not installed: pip install -r "
                     "requirements-test.txt (jax[tpu] at the pinned jax), or set TOPOLOGY='local'")
print(f"plan {CONFIG} on {TOPOLOGY}")

# %% [markdown]
# ## Compile
# The planner runs as its own process with `JAX_PLATFORMS=cpu` (it needs no accelerator and leaves
# this runtime's own devices alone); its log shows each function as it compiles.

# %%
report_path = OUT / "plan.json"
cmd = [sys.executable, "-m", "spacer_jax.plan", f"--config={CONFIG}", f"--topology={TOPOLOGY}",
       f"--json={report_path}", *EXTRA]
if FUNCTIONS:
  cmd.append("--functions=" + ",".join(FUNCTIONS))
print(" ".join(cmd[1:]))
env = dict(os.environ, JAX_PLATFORMS="cpu" if TOPOLOGY != "local" else os.environ.get(
    "JAX_PLATFORMS", ""))
proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
for line in proc.stdout:
  if "plan.py" in line or not line.startswith(("I", "W")) or " plan: " in line:
    print(line, end="")
if proc.wait():
  raise SystemExit(f"the planner failed (exit {proc.returncode}); its output is above")
report = json.loads(report_path.read_text())

# %% [markdown]
# ## Verdict and per-function figures
# Per chip: the compiler's argument, temporary and peak bytes of each function, the peak while it
# runs inside the step (its peak plus what stays resident: optimizer state during the rollout, the
# reference weights), FLOPs and the compiler's time estimate.

# %%
GIB = 2.0 ** 30
hbm = report["hbm_bytes_per_device"]
verdict = (f"**fits**, {report['headroom_bytes'] / GIB:.1f} GiB to spare" if report["fits"] else
           f"**does not fit**, by at least {-report['headroom_bytes'] / GIB:.1f} GiB")
mfu, tok = report.get("mfu_estimate"), report.get("rollout_tokens_per_second")
lines = [
    f"{CONFIG} on {report['topology']} ({report['num_devices']} x {report['device_kind']}, mesh "
    f"{report['mesh']}): {verdict}; step peak {report['step_peak_bytes'] / GIB:.1f} GiB per chip "
    f"({report['step_peak_function']}) of {hbm / GIB:.1f} GiB HBM.",
    f"{report['param_count']:,} parameters ({report['trainable_param_count']:,} trained). Step time "
    f">= {report['step_seconds_estimate']:.1f} s; train MFU <= "
    f"{'-' if mfu is None else f'{100 * mfu:.0f}%'}; rollout "
    f"{'-' if tok is None else f'{tok:,.0f}'} tokens/s for the slice.", "",
    "| function | arguments GiB | temp GiB | peak GiB | in step GiB | TFLOP | est. s | compile s |",
    "|---|---|---|---|---|---|---|---|"]
for name, f in report["functions"].items():
  in_step = f.get("step_peak_bytes")
  lines.append(
      f"| {name} | {f['argument_bytes'] / GIB:.2f} | {f['temp_bytes'] / GIB:.2f} | "
      f"{f['peak_bytes'] / GIB:.2f} | {'-' if in_step is None else f'{in_step / GIB:.2f}'} | "
      f"{f['flops'] / 1e12:.1f} | {f['estimated_seconds']:.2f} | {f['compile_seconds']:.0f} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Memory per chip against HBM

# %%
names = list(report["functions"])
peaks = [(report["functions"][n].get("step_peak_bytes") or report["functions"][n]["peak_bytes"])
         / GIB for n in names]
fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
ax.barh(names, peaks, color=["C3" if p * GIB > hbm else "C0" for p in peaks])
ax.axvline(hbm / GIB, color="k", ls="--", label=f"HBM {hbm / GIB:.1f} GiB")
ax.set(xlabel="GiB per chip (peak while it runs in the step)",
       title=f"{CONFIG} on {report['topology']}")
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()
