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
# # 03 Rewards playground
#
# **Hardware:** any runtime (Colab CPU is enough; a TPU runtime works too, the scoring is jnp).
# **Runtime:** ~10 s after the install cell on a 2-core CPU (measured; mostly the first jnp
# compilations).
#
# Try the SpaceR reward parsers and scorers (`spacer_jax.rewards`; the rules are in
# docs/spacer_recipe.md, "Rewards") on hand-written completions: the format reward, multiple
# choice, the fuzzy number parser and MRA, the cognitive-map parser and score with each fix switch
# off (the reference behaviour) and on, and the temporal and length bonuses over one group of G
# completions, followed by the GRPO advantages.
# `SMOKE=1` changes nothing here (the notebook is already tiny); it is honoured for uniformity.

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
import dataclasses

import numpy as np

from spacer_jax import grpo
from spacer_jax import rewards

SMOKE = os.environ.get("SMOKE", "0") == "1"
np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## Format reward
# 1.0 iff the whole completion is `<think>...</think>` then whitespace then `<answer>...</answer>`,
# with nothing before or after (not even a newline).

# %%
format_cases = [
    "<think>The sofa is left of the TV.</think> <answer>B</answer>",
    "<think></think><answer></answer>",
    "<think>ok</think>\n<answer>B</answer>\n",          # trailing newline fails
    "Sure! <think>ok</think><answer>B</answer>",         # leading text fails
    "<think>ok</think> so <answer>B</answer>",           # text between the tags fails
    "<answer>B</answer>",
]
format_scores = rewards.format_reward(format_cases)
for text, score in zip(format_cases, format_scores):
  print(f"{score:.1f}  {text!r}")
assert format_scores.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]

# %% [markdown]
# ## Multiple choice: case-sensitive exact match of the `<answer>` contents

# %%
mc_answers = ["B", "B.", "b", "(B)", " B ", "C"]
mc_completions = [f"<think>...</think><answer>{a}</answer>" for a in mc_answers]
mc_scores = rewards.accuracy_reward(mc_completions, ["<answer>B</answer>"] * len(mc_answers),
                                    ["multiple choice"] * len(mc_answers))
for a, s in zip(mc_answers, mc_scores):
  print(f"{a!r:8} -> {s:.1f}")

# %% [markdown]
# ## Numbers: the fuzzy parser and mean relative accuracy (MRA)
# The reference parser tries number *words* in dictionary order before digits, treats the articles
# "a"/"an" as 1 and drops signs and thousands separators. `use_article_fix` and
# `use_first_number_fix` switch on the evident intent ("the first number mentioned").

# %%
article_fix = dataclasses.replace(rewards.DEFAULT, use_article_fix=True)
first_fix = dataclasses.replace(rewards.DEFAULT, use_first_number_fix=True)
texts = ["about 3.5 meters", "It is a 3 meter gap", "3 chairs and one table", "twenty-one",
         "-2.5", "1,234", "three or two", "no idea"]
print(f"{'answer text':28} {'reference':>10} {'article fix':>12} {'first number':>13}")
for t in texts:
  row = [rewards.parse_number(t, c) for c in (rewards.DEFAULT, article_fix, first_fix)]
  print(f"{t!r:28} " + " ".join(f"{str(v):>12}" for v in row))

# %% [markdown]
# MRA averages `|pred - gt| / gt <= 1 - theta` over ten thresholds theta in [0.5, 0.95], in float64
# with `<=`, so a relative error of exactly 0.1 still passes the 0.9 threshold.

# %%
gt = 5.0
preds = np.array([5.0, 4.5, 5.5, 4.0, 7.5, 2.0])
print("pred:", preds)
print("MRA: ", rewards.mra(preds, np.full_like(preds, gt)))
num_completions = [f"<think>...</think><answer>{p} meters</answer>" for p in preds]
print("accuracy reward (numerical):",
      rewards.accuracy_reward(num_completions, [f"<answer>{gt}</answer>"] * len(preds),
                              ["numerical"] * len(preds)))

# %% [markdown]
# ## Cognitive maps
# A correct answer (MC, or numerical with MRA > 0.5) whose completion carries `<map>...</map>` gets
# the map score (greedy matching on a 10 x 10 grid) added to its accuracy. In the reference a map
# scoring 0 *erases* the correct answer; `use_zero_map_fix` keeps the accuracy instead.

# %%
gt_map = {"chair": [[1, 1], [6, 5]], "table": [[0, 0]]}
map_texts = {
    "exact dict": "{'chair': [[1, 1], [6, 5]], 'table': [[0, 0]]}",
    "one chair off": "{'chair': [[1, 1], [9, 9]], 'table': [[0, 0]]}",
    "missing table": "{'chair': [[1, 1], [6, 5]]}",
    "flat pair in list": "{'chair': [1, 1], 'table': [0, 0]}",
    "prose fallback": "chair at (1, 1) and (6, 5); table at (0, 0)",
    "unknown category": "{'sofa': [[3, 3]]}",
}
for name, body in map_texts.items():
  parsed = rewards.parse_map(body, list(gt_map))
  print(f"{name:18} parsed={parsed}  score={rewards.map_score(parsed, gt_map):.3f}")

# %%
zero_map_fix = dataclasses.replace(rewards.DEFAULT, use_zero_map_fix=True)
non_sr_fix = dataclasses.replace(rewards.DEFAULT, use_non_sr_map_fix=True)
map_cases = [  # (label, completion, cognitive map of the sample's video)
    ("good map", "<think>..</think><answer>B</answer><map>" + map_texts["exact dict"] + "</map>",
     gt_map),
    ("off map", "<think>..</think><answer>B</answer><map>" + map_texts["one chair off"] + "</map>",
     gt_map),
    ("unparsable map", "<think>..</think><answer>B</answer><map>" + map_texts["flat pair in list"]
     + "</map>", gt_map),
    ("no map tags", "<think>..</think><answer>B</answer>", gt_map),
    ("wrong answer", "<think>..</think><answer>C</answer><map>" + map_texts["exact dict"]
     + "</map>", gt_map),
    ("map, non-SR video", "<think>..</think><answer>B</answer><map>" + map_texts["exact dict"]
     + "</map>", None),
]
labels, completions, maps = zip(*map_cases)
n = len(completions)
columns = {
    "reference": rewards.DEFAULT, "zero-map fix": zero_map_fix, "non-SR fix": non_sr_fix}
table = {name: rewards.accuracy_reward(list(completions), ["<answer>B</answer>"] * n,
                                       ["multiple choice"] * n, list(maps), config=c)
         for name, c in columns.items()}
print(f"{'case':20}" + "".join(f"{name:>15}" for name in table))
for i, label in enumerate(labels):
  print(f"{label:20}" + "".join(f"{table[name][i]:15.3f}" for name in table))

# %% [markdown]
# An empty ground-truth map: the reference scores an empty prediction 1.0 and raises on any
# predicted point (reward 0); `use_empty_gt_map_fix` gives 0.0 to a prediction with points.

# %%
empty_fix = dataclasses.replace(rewards.DEFAULT, use_empty_gt_map_fix=True)
empty_gt = {"chair": []}
for pred in ({}, {"chair": [[1, 1]]}):
  try:
    ref = f"{rewards.map_score(pred, empty_gt):.3f}"
  except TypeError as e:                   # the reference raises here; its reward becomes 0
    ref = f"raises {type(e).__name__}"
  fixed = rewards.map_score(pred, empty_gt, config=empty_fix)
  print(f"pred={pred!s:22} reference: {ref:18} fix: {fixed:.3f}")

# %% [markdown]
# ## One group: temporal and length bonuses, totals and GRPO advantages
# `compute_rewards` scores B prompts x G completions. The temporal bonus (+0.3 to every completion
# with accuracy > 0.1) is granted when the group's mean accuracy is at least 0.8 x the mean accuracy
# of completions sampled from frame-shuffled video; the length bonus (+0.2) goes to "correct"
# completions of 320..512 tokens when more than one completion in the group is correct.

# %%
G = 4
group = [
    "<think>Counting chairs.</think> <answer>4</answer>",
    "<think>Counting.</think> <answer>four</answer><map>{'chair': [[1, 1], [6, 5]]}</map>",
    "<answer>3</answer>",
    "<think>Hmm.</think> <answer>a lot</answer>",
]
lengths = np.array([350, 400, 40, 600])
examples = {"solution": ["<answer>4</answer>"], "problem_type": ["numerical"],
            "cognitive_map": [{"chair": [[1, 1], [6, 5]], "table": [[0, 0]]}],
            "data_type": ["video"], "id": ["demo-0"]}
for label, shuffled in (("shuffled frames do worse", [[0.0, 0.0]]),
                        ("shuffled frames do as well", [[2.0, 2.0]])):
  comps, counters = rewards.compute_rewards(group, examples, lengths, G, shuffled_accuracy=shuffled)
  adv = np.asarray(grpo.compute_advantages(comps["total"], G))
  print(f"\n{label}:")
  keys = ("format", "accuracy_base", "map", "accuracy", "temporal", "length", "total")
  print(f"{'#':>2} " + "".join(f"{k:>14}" for k in keys) + f"{'advantage':>12}")
  for i in range(G):
    print(f"{i:>2} " + "".join(f"{comps[k][i]:14.3f}" for k in keys) + f"{adv[i]:12.3f}")
  print("counters:", {k: v for k, v in counters.items() if v})
  print(f"group mean advantage: {float(adv.mean()):.2e}")
