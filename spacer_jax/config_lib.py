"""Shared config fragments: argument parsing, mesh and sharding-rule presets, smoke().

Configs are ml_collections files with a `get_config(arg)` function (STYLE 3.5). `parse_arg` turns the
text after the colon of `--config=configs/sgrlvr.py:size=7b,smoke` into a ConfigDict with typed values;
the presets below are the only place mesh axis names meet logical axis names.
"""

import ml_collections

# Mesh axis names (model code never mentions these; only the rules below and sharding.py do).
MESH_AXES = ("data", "fsdp", "tensor")

# Mesh presets: (axis name, size) pairs; -1 means "all remaining devices" (big_vision).
MESH_FSDP = (("data", 1), ("fsdp", -1), ("tensor", 1))
MESH_FSDP_TP2 = (("data", 1), ("fsdp", -1), ("tensor", 2))

# Logical axis -> mesh axes. Every logical name used by the model must appear here (sharding.py
# raises on an unknown name so a typo cannot silently replicate a 7B weight).
#   batch: examples (B or B*G); seq: tokens; embed/vision_embed: hidden sizes D/E; heads/kv_heads:
#   fused head*head_dim output dims; mlp/vision_mlp: F; vocab: V; norm: 1-D norm weights.
FSDP_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("vision_mlp", None),
    ("vocab", None),
    ("norm", None),
)

# FSDP + tensor parallelism on the text decoder. The vision tower stays FSDP-only (its fused qkv must
# not be split on the tensor axis: q, k and v would land on different devices).
FSDP_TP_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vision_mlp", None),
    ("vocab", "tensor"),
    ("norm", None),
)

SHARDING_PRESETS = {"fsdp": FSDP_RULES, "fsdp_tp": FSDP_TP_RULES}
MESH_PRESETS = {"fsdp": MESH_FSDP, "fsdp_tp": MESH_FSDP_TP2}


def _parse_value(text, default):
  """Converts `text` to the type of `default` (bool flags accept true/false/1/0/yes/no)."""
  if isinstance(default, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "y", ""):
      return True
    if low in ("0", "false", "no", "n"):
      return False
    raise ValueError(f"config argument expects a boolean, got {text!r}")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse_arg(arg, lazy=False, **spec):
  """Parses `k=v,flag,k2=v2` into a ConfigDict, typed by the defaults in `spec`.

  A bare `flag` sets a boolean default to True. Unknown keys raise (unless lazy=True, which keeps them
  as strings), so `configs/sgrlvr.py:szie=7b` fails at start-up instead of running the default.

  Args:
    arg: the text after the colon in `--config=file.py:arg`, or None/"".
    lazy: keep unknown keys instead of raising.
    **spec: argument names with their defaults (the type of each default types the value).

  Returns:
    ml_collections.ConfigDict with every key of `spec` (and, if lazy, the unknown ones).
  """
  out = dict(spec)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}")
      out[key] = value if has_value else True
      continue
    if not has_value:
      if not isinstance(spec[key], bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...), got a bare flag")
      out[key] = True
    else:
      out[key] = _parse_value(value.strip(), spec[key])
  return ml_collections.ConfigDict(out)



def base_config(size="7b", frames=16, sharding=""):
  """The SpaceR recipe shared by configs/{sgrlvr,grpo,sft}.py (spec spacer.md sections 3-6).

  Args:
    size: 3b|7b|32b|72b; picks the default checkpoint directory and, for 32b/72b, FSDP+TP.
    frames: max frames per video.
    sharding: "" (by size) | "fsdp" | "fsdp_tp".

  Returns:
    ml_collections.ConfigDict with every key train.py reads.
  """
  if size not in ("3b", "7b", "32b", "72b"):
    raise ValueError(f"config argument size must be 3b|7b|32b|72b, got {size!r}")
  c = ml_collections.ConfigDict()
  c.mode = "grpo"  # "grpo" | "sft"
  c.sft_warmup_steps = 0  # SFT steps on the solutions before RL starts (0 = SpaceR: none).
  c.sft_target = "solution"  # SFT completions: "solution" | "process" (CoT trace + solution).
  c.grad_accum_steps = 1  # Micro-batches per optimizer step, scanned inside the jitted step.
  c.seed = 42
  c.total_steps = 18914  # ceil(151,310 / 8) = one epoch.
  c.log_every_steps = 1
  c.rollout_log_every_steps = 1
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 3
  c.max_skipped_steps = 10  # Non-finite gradient steps in a row before the run stops.
  c.resume = ""  # Checkpoint dir of another run to take the full train state from.
  # Periodic VSI-Bench-format evaluation with the current weights (spacer_jax.evaluate.run).
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=0,  # 0 = off.
      data_dir="",  # VSI-Bench root; "" with data.source=synthetic = the synthetic held-out split.
      protocol="spacer", max_new_tokens=1024, batch_size=8, max_items=0,
      video=ml_collections.ConfigDict()))  # evaluate.run video_kwargs ({} = its defaults).
  c.jax_cache_dir = ""  # Persistent XLA compilation cache ("" = off); speeds up restarts.
  c.export_hf_subdir = ""  # If set, the final weights are also written there in HF format.
  c.use_tensorboard = True
  c.use_progress_bar = True

  c.model = ml_collections.ConfigDict(dict(
      hf_dir=f"/ckpt/Qwen2.5-VL-{size.upper()}-Instruct",
      variant="",  # "tiny" only for tests/smoke; otherwise the architecture comes from hf_dir.
      tiny_overrides=ml_collections.ConfigDict(),
      dtype="bfloat16", param_dtype="float32", ref_param_dtype="bfloat16",
      use_remat=True,
      # Decoder as a lax.scan in train_step / token_logps (one compiled layer; weights keep their
      # names). Off: the 7B plan on v5p-8 was measured unrolled (experiments/2026-12-04_plan_7b_v5p8).
      scan_layers=False,
      text_after_vision="qwen", freeze_vision=False))

  c.data = ml_collections.ConfigDict(dict(
      source="spacer",  # "spacer" (JSONL on disk) | "synthetic" (generated scenes)
      annotations="/data/SpaceR-151k/SpaceR-151k.jsonl",
      media_root="/data/SpaceR-151k",
      cognitive_maps="/data/SpaceR-151k/annotation/cognitive_map.jsonl",
      exclude_list="",
      tokenizer_dir="",  # Default: model.hf_dir.
      batch_size=8,  # Prompts per step (8 GPUs x 1 prompt in the reference).
      max_frames=frames, video_fps=2.0,
      video_min_pixels=128 * 28 * 28, video_max_pixels=128 * 28 * 28,
      image_min_pixels=4 * 28 * 28, image_max_pixels=256 * 28 * 28,
      prompt_buckets=(256, 512, 1024, 2048, 4096, 8192, 16384),
      use_cogmap_prompt=True, shuffle=True, num_workers=4, skip_bad_records=True,
      synthetic_root="",  # Default: {workdir}/data/synthetic.
      synthetic=ml_collections.ConfigDict(dict(num_scenes=256, num_eval_scenes=32,
                                               questions_per_scene=8))))

  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=1024, temperature=1.0, top_p=0.95, top_k=50))

  c.grpo = ml_collections.ConfigDict(dict(
      num_generations=8, num_iterations=1,
      # grpo.GRPOConfig fields (defaults = SpaceR: no clipping, k3 KL with beta 0.04):
      beta=0.04, epsilon=ml_collections.config_dict.placeholder(float),
      epsilon_high=ml_collections.config_dict.placeholder(float),
      loss_agg="seq_mean_token_mean", max_completion_length=ml_collections.config_dict.placeholder(int),
      reward_scaling="group", importance_sampling="token", adv_eps=1e-4, kl_clamp=10.0))

  c.rewards = ml_collections.ConfigDict(dict(
      use_map=True, use_temporal=True, use_length=True,
      # rewards.RewardConfig fields (defaults reproduce SpaceR's quirks; spec 4.9):
      use_article_fix=False, use_first_number_fix=False, use_zero_map_fix=False,
      use_non_sr_map_fix=False, use_empty_gt_map_fix=False, use_nan_fix=False,
      use_overflow_fix=False, temporal_alpha=0.3, temporal_mu=0.8, bonus_threshold=0.1,
      length_bonus=0.2, length_range=(320, 512)))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-6, schedule="cosine", warmup_steps=0, decay_steps=0, wd=0.01, b1=0.9, b2=0.999,
      eps=1e-8, grad_clip=5.0, freeze=()))

  preset = sharding or ("fsdp_tp" if size in ("32b", "72b") else "fsdp")
  if preset not in SHARDING_PRESETS:
    raise ValueError(f"config argument sharding must be fsdp|fsdp_tp, got {preset!r}")
  c.mesh = [list(x) for x in MESH_PRESETS[preset]]
  c.sharding_rules = [list(x) for x in SHARDING_PRESETS[preset]]
  return c


def smoke(c):
  """Shrinks any recipe config to the tiny model on CPU (2 steps, G=2, 8 new tokens, synthetic data).

  The returned config keeps every key of the recipe (so `--config.x.y` overrides that work on the real
  run also work on the smoke run) and only changes sizes, paths and the mesh.
  """
  c.total_steps = 2
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.rollout_log_every_steps = 1
  c.model.hf_dir = ""
  c.model.variant = "tiny"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.ref_param_dtype = "float32"
  c.model.use_remat = False
  c.data.source = "synthetic"
  c.data.annotations = ""
  c.data.media_root = ""
  c.data.cognitive_maps = ""
  c.data.tokenizer_dir = ""
  c.data.batch_size = 2
  c.data.max_frames = 4
  c.data.video_fps = 1.0
  c.data.video_min_pixels = 28 * 28 * 4
  c.data.video_max_pixels = 28 * 28 * 4
  c.data.image_min_pixels = 28 * 28 * 4
  c.data.image_max_pixels = 28 * 28 * 4
  c.data.prompt_buckets = (1024, 2048)
  c.data.num_workers = 0
  c.data.synthetic.num_scenes = 4
  c.data.synthetic.num_eval_scenes = 2
  c.data.synthetic.questions_per_scene = 4
  c.sampling.max_new_tokens = 8
  if "grpo" in c:
    c.grpo.num_generations = 2
  c.optim.lr = 1e-3
  c.mesh = [["data", 1], ["fsdp", -1], ["tensor", 1]]
  return c
