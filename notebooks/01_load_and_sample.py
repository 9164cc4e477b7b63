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
# # 01 Load Qwen2.5-VL and answer a video question
#
# **Hardware:** Colab TPU runtime for a real checkpoint (Qwen2.5-VL-3B-Instruct in bfloat16 is
# ~7.5 GB of weights: a v2-8 / v3-8 shards it over 8 cores, a v5e-1 holds it in its 16 GB); any
# CPU for `SMOKE=1` (a tiny random model and a synthetic clip).
# **Runtime:** `SMOKE=1` ~1 min on a 2-core CPU (measured, mostly compilation). With a real
# checkpoint: not measured in this repository yet; the time goes to the install, reading the
# safetensors and the first compilation of prefill/decode, after which each question with the same
# prompt length and video grid reuses the executables.
#
# Steps: install, pick devices and a mesh, load Hugging Face Qwen2.5-VL weights from a local
# directory straight into their shards (`qwen2_5_vl.load_hf`), decode and preprocess a video the
# way SpaceR's training does (`spacer_jax.data.video`), build the SpaceR prompt
# (`spacer_jax.data.prompts`), answer with the jitted KV-cache sampler (`spacer_jax.sampling`) and
# score the answer with the SpaceR rewards when a ground truth is known.

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
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from spacer_jax import config_lib
from spacer_jax import rewards
from spacer_jax import sampling
from spacer_jax import sharding
from spacer_jax.data import prompts
from spacer_jax.data import sources
from spacer_jax.data import synthetic
from spacer_jax.data import tokenizer as tokenizer_lib
from spacer_jax.data import video as video_lib
from spacer_jax.models import qwen2_5_vl

SMOKE = os.environ.get("SMOKE", "0") == "1"
platform = jax.devices()[0].platform
print(f"jax {jax.__version__}: {jax.device_count()} x {platform} ({jax.devices()[0].device_kind})")
if platform == "cpu" and not SMOKE:
  print("No accelerator found: a real checkpoint will be slow. Switch the Colab runtime to TPU.")

# %% [markdown]
# ## Inputs
# Real run: a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)
# and a video. On Colab, download once, e.g.
# `huggingface_hub.snapshot_download("Qwen/Qwen2.5-VL-3B-Instruct", local_dir=MODEL_DIR)`.
#
# `SMOKE=1`: a tiny random Qwen2.5-VL with the project's offline tokenizer, saved in the
# Hugging Face layout by `qwen2_5_vl.save_hf` (so the load below is the real code path), and one
# clip + question from the synthetic SpaceR-format dataset.

# %%
MODEL_DIR = os.environ.get("MODEL_DIR", "/content/Qwen2.5-VL-3B-Instruct")
VIDEO = os.environ.get("VIDEO", "/content/clip.mp4")
QUESTION = os.environ.get("QUESTION", "How many chair(s) are in this room?")
PROBLEM_TYPE = os.environ.get("PROBLEM_TYPE", "numerical")
OPTIONS = ()            # e.g. ("A. chair", "B. table") for "multiple choice"
CATEGORIES = None       # e.g. ("chair", "table", "sofa"): the cognitive-map prompt of SR-91k items
SOLUTION = None         # e.g. "<answer>3</answer>" to score the answer
COGNITIVE_MAP = None    # the ground-truth map of the video, for the map bonus
DTYPE = jnp.bfloat16
MAX_NEW_TOKENS = 1024
MAX_FRAMES = 16         # SpaceR's training setting
PIXELS = {}             # preprocess_video size limits; {} = SpaceR's defaults

if SMOKE:
  work = pathlib.Path(tempfile.mkdtemp(prefix="nb01_"))
  MODEL_DIR = str(work / "model")
  ids = tokenizer_lib.build_offline_tokenizer(MODEL_DIR).special_ids()
  ids["eos_token_id"] = (ids["eos_token_id"],)
  qwen2_5_vl.save_hf(qwen2_5_vl.init_model(qwen2_5_vl.tiny(**ids), seed=0), MODEL_DIR)
  data = synthetic.generate_dataset(
      str(work / "data"),
      synthetic.SyntheticConfig.demo(num_scenes=1, num_eval_scenes=1, questions_per_scene=2,
                                     eval_questions_per_scene=1),
      progress=False)
  record = sources.load_spacer(data.train_jsonl, strict=True)[0]
  VIDEO, QUESTION, PROBLEM_TYPE = record.media, record.problem, record.problem_type
  OPTIONS, CATEGORIES = record.options, record.categories
  SOLUTION, COGNITIVE_MAP = record.solution, record.cognitive_map
  DTYPE, MAX_NEW_TOKENS, MAX_FRAMES = jnp.float32, 16, 4
  PIXELS = dict(min_pixels=56 * 56, max_pixels=56 * 56)   # keep the 56x56 frames: 16 tokens each

# %% [markdown]
# ## Mesh and weights
# One mesh axis `fsdp` over all devices (`config_lib.MESH_FSDP`); every weight goes straight from
# the safetensors file into its shard under `config_lib.FSDP_RULES`, so no host ever holds a full
# copy on device 0.

# %%
mesh = sharding.make_mesh(config_lib.MESH_FSDP)
rules = config_lib.FSDP_RULES
print("mesh:", dict(mesh.shape))
t0 = time.perf_counter()
model = qwen2_5_vl.load_hf(MODEL_DIR, dtype=DTYPE, mesh=mesh, rules=rules)
tok = tokenizer_lib.load_tokenizer(MODEL_DIR)
cfg = model.config
print(f"loaded {MODEL_DIR} in {time.perf_counter() - t0:.1f} s: {cfg.num_hidden_layers} layers, "
      f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
embed = model.model.embed_tokens.weight
print("embed_tokens.weight:", embed.shape, embed.dtype, embed.sharding.spec)

# %% [markdown]
# ## Video
# Frames are sampled as SpaceR samples them (2 fps, at most `MAX_FRAMES`), resized to multiples of
# 28 and patchified exactly like the HF Qwen2-VL processor.

# %%
clip = video_lib.read_video(VIDEO, max_frames=MAX_FRAMES)
print(f"{VIDEO}: {clip.total_frames} frames at {clip.video_fps:.1f} fps -> sampled "
      f"{len(clip.indices)} frames {clip.indices.tolist()}, {clip.frames.shape[1:3]} pixels")
vision = video_lib.preprocess_video(clip.frames, sample_fps=clip.sample_fps, name=VIDEO, **PIXELS)
print("pixel_values_videos:", vision.pixel_values.shape, "grid_thw:", vision.grid_thw)

shown = np.linspace(0, len(clip.frames) - 1, min(8, len(clip.frames))).astype(int)
fig, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown), 2.4), squeeze=False)
for ax, i in zip(axes[0], shown):
  ax.imshow(clip.frames[i])
  k = clip.indices[i]
  ax.set_title(f"frame {k}", fontsize=8)
  ax.axis("off")
plt.show()

# %% [markdown]
# ## Prompt
# SpaceR's user text: the question (MC options appended), the think/answer instructions, the
# cognitive-map instructions when the scene's categories are known, then the problem-type suffix,
# all inside the Qwen2.5-VL chat template with the video placeholder first.

# %%
user_text = prompts.spacer_prompt(
    QUESTION, PROBLEM_TYPE, OPTIONS,
    data_source=prompts.SR_DATA_SOURCE if CATEGORIES else None, categories=CATEGORIES)
print(prompts.chat_text(user_text, "video"))
input_ids = prompts.encode_prompt(tok, user_text, "video", video_grid_thw=[vision.grid_thw],
                                  merge_size=cfg.spatial_merge_size)[None]
print(f"prompt: {input_ids.shape[1]} tokens, of which "
      f"{prompts.num_vision_tokens(vision.grid_thw, cfg.spatial_merge_size)} video tokens")

# %% [markdown]
# ## Answer
# Greedy decoding with the KV-cache sampler; `<|im_end|>` and `<|endoftext|>` stop a sequence.
# Compilation happens on the first call; a second question with the same prompt length and video
# grid reuses the executable.

# %%
sampler = sampling.Sampler(model, temperature=0.0,
                           extra_stop_ids=[i for i in (tok.eos_token_id, tok.endoftext_id)
                                           if i is not None],
                           mesh=mesh)
t0 = time.perf_counter()
with jax.set_mesh(mesh):
  out = sampler(input_ids, np.ones_like(input_ids), max_new_tokens=MAX_NEW_TOKENS,
                rng=jax.random.key(0), pixel_values_videos=vision.pixel_values,
                video_grid_thw=np.asarray(vision.grid_thw)[None],
                second_per_grid_ts=np.asarray([vision.second_per_grid_t], np.float32))
n = int(out.lengths[0])
tokens = np.asarray(out.tokens[0, :n])
answer = tok.decode(tokens)
print(f"{n} tokens in {time.perf_counter() - t0:.1f} s (incl. compilation)\n")
print(answer)

# %% [markdown]
# ## Score
# When the ground truth is known, the SpaceR rewards say how the trainer would score this answer.

# %%
print("parsed <answer>:", repr(rewards.extract_answer(answer)))
print("format reward:", rewards.format_reward(answer))
if SOLUTION is not None:
  print("ground truth:", SOLUTION)
  print("accuracy reward:", rewards.accuracy_reward(answer, SOLUTION, PROBLEM_TYPE, COGNITIVE_MAP))
assert n >= 1 and np.isfinite(np.asarray(out.logprobs[0, :n])).all()
