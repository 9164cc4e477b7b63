"""Shared config fragments: argument parsing, mesh and sharding-rule presets, smoke().

Configs are ml_collections files with a `get_config(arg)` function. `parse_arg` turns the
text after the colon of `--config=configs/sgrlvr.py:size=7b,smoke` into a ConfigDict with typed values;
the presets below are the only place mesh axis names meet logical axis names.
"""

import importlib.util
import os

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

# LoRA target presets (config.lora.targets), regexes over module names; see spacer_jax/lora.py.
#   text: q/k/v/o and gate/up/down of every decoder layer; vision: the ViT blocks' qkv/proj and MLP;
#   merger: the vision merger's two layers; all: the three.
LORA_TARGETS = {
    "text": (r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$",
             r"^model\.layers\.\d+\.mlp\.(gate|up|down)_proj$"),
    "vision": (r"^visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)$",),
    "merger": (r"^visual\.merger\.fc[12]$",),
}
LORA_TARGETS["all"] = LORA_TARGETS["text"] + LORA_TARGETS["vision"] + LORA_TARGETS["merger"]
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


def load_config_module(path):
  """Imports a config file (`configs/x.py`) by path, as config_flags does, and returns the module.

  For what config_flags does not expose: a config's `sweep(add)` (spacer_jax.sweep) and one config
  building on another (configs/ablation.py).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  name = "spacer_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sharding_rules(config):
  """`config.sharding_rules` as a tuple of (logical name, mesh axis | tuple of mesh axes | None)."""
  return tuple((n, tuple(a) if isinstance(a, (list, tuple)) else a) for n, a in config.sharding_rules)


def make_reward_config(config):
  """rewards.RewardConfig from `config.rewards` (the library never sees a ConfigDict)."""
  from spacer_jax import rewards  # pylint: disable=g-import-not-at-top
  r = config.rewards
  return rewards.RewardConfig(
      use_article_fix=r.use_article_fix, use_first_number_fix=r.use_first_number_fix,
      use_zero_map_fix=r.use_zero_map_fix, use_non_sr_map_fix=r.use_non_sr_map_fix,
      use_empty_gt_map_fix=r.use_empty_gt_map_fix, use_nan_fix=r.use_nan_fix,
      use_overflow_fix=r.use_overflow_fix, use_stop_token_mask_fix=r.use_stop_token_mask_fix,
      temporal_alpha=r.temporal_alpha,
      temporal_mu=r.temporal_mu, bonus_threshold=r.bonus_threshold,
      length_bonus=r.length_bonus if r.use_length else 0.0, length_range=tuple(r.length_range))


def make_grpo_config(config):
  """grpo.GRPOConfig from `config.grpo`."""
  from spacer_jax import grpo  # pylint: disable=g-import-not-at-top
  g = config.grpo
  return grpo.GRPOConfig(
      beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high, loss_agg=g.loss_agg,
      max_completion_length=g.max_completion_length, reward_scaling=g.reward_scaling,
      importance_sampling=g.importance_sampling, adv_eps=g.adv_eps, kl_clamp=g.kl_clamp)


def make_lora_config(config):
  """lora.LoraConfig from `config.lora`, or None when config.lora.rank is 0 (LoRA off)."""
  from spacer_jax import lora  # pylint: disable=g-import-not-at-top
  c = config.lora
  if not c.rank:
    return None
  return lora.LoraConfig(
      rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout), targets=tuple(c.targets),
      train_also=tuple(c.train_also), base_param_dtype=c.base_param_dtype or None,
      use_rslora=bool(c.use_rslora))


def make_data_config(config, temporal, process_count=1):
  """pipeline.DataConfig from `config.data`; `data.batch_size` is global, split over processes."""
  from spacer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  d = config.data
  if d.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={d.batch_size} (prompts per step, all processes) "
                     f"does not split over {process_count} processes")
  return pipeline.DataConfig(
      batch_size=d.batch_size // process_count, buckets=tuple(d.prompt_buckets),
      fps=d.video_fps, max_frames=d.max_frames, video_min_pixels=d.video_min_pixels,
      video_max_pixels=d.video_max_pixels, image_min_pixels=d.image_min_pixels,
      image_max_pixels=d.image_max_pixels, temporal=temporal, num_workers=d.num_workers,
      shuffle=d.shuffle, strict=not d.skip_bad_records)


def base_config(size="7b", frames=16, sharding="", lora=0, lora_targets="text"):
  """The SpaceR recipe shared by spacer_jax/configs/{sgrlvr,grpo,sft}.py (docs/spacer_recipe.md,
  "Hyper-parameters").

  Args:
    size: 3b|7b|32b|72b; picks the default checkpoint directory and, for 32b/72b, FSDP+TP.
    frames: max frames per video.
    sharding: "" (by size) | "fsdp" | "fsdp_tp".
    lora: LoRA rank (0: full fine-tuning).
    lora_targets: LORA_TARGETS presets joined by "+" (e.g. "text+vision").

  Returns:
    ml_collections.ConfigDict with every key train.py reads.
  """
  if size not in ("3b", "7b", "32b", "72b"):
    raise ValueError(f"config argument size must be 3b|7b|32b|72b, got {size!r}")
  unknown = [n for n in lora_targets.split("+") if n not in LORA_TARGETS]
  if unknown:
    raise ValueError(f"config argument lora_targets: unknown {unknown}; use {sorted(LORA_TARGETS)} "
                     "joined by '+'")
  c = ml_collections.ConfigDict()
  c.mode = "grpo"  # "grpo" | "sft"
  c.sft_warmup_steps = 0  # SFT steps on the solutions before RL starts (0 = SpaceR: none).
  c.sft_target = "solution"  # SFT completions: "solution" | "process" (CoT trace + solution).
  # Micro-batches per optimizer step, scanned inside the jitted step. 32B and 72B take 4: planned
  # for v5p-32 / v5p-64 (README "Will it fit?"), 32B's train step needs >= 107.5 GiB per chip in one
  # micro-batch and 86.9 GiB in 4 (experiments/2026-12-04_plan_7b_v5p8).
  c.grad_accum_steps = 4 if size in ("32b", "72b") else 1
  c.seed = 42
  c.total_steps = 18914  # ceil(151,310 / 8) = one epoch.
  c.log_every_steps = 1
  c.rollout_log_every_steps = 1
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 3
  c.max_skipped_steps = 10  # Non-finite gradient steps in a row before the run stops.
  c.resume = ""  # Checkpoint dir of another run to take the full train state from.
  # An unreadable newest checkpoint (truncated/missing file, corrupt metadata) stops the run instead
  # of being logged, moved aside to ckpt/<step>.unreadable and skipped for the newest readable one.
  c.resume_strict = False
  # Periodic evaluation with the current weights (spacer_jax.evaluate.run), per-task scores logged
  # as eval/<task>. Any benchmark of EVAL_BENCHMARKS; max_items > 0 evaluates a subset.
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=0,  # 0 = off.
      benchmark="vsibench",
      data_dir="",  # Benchmark root; "" with data.source=synthetic = the synthetic VSI held-out split.
      protocol="spacer", aggregation="code", max_new_tokens=1024, batch_size=8, max_items=0,
      video=ml_collections.ConfigDict(),  # evaluate.run video_kwargs ({} = its defaults).
      image=ml_collections.ConfigDict()))  # evaluate.run image_kwargs ({} = its defaults).
  c.jax_cache_dir = ""  # Persistent XLA compilation cache ("" = off); speeds up restarts.
  c.export_hf_subdir = ""  # If set, the final step is exported there as an HF directory (convert.py).
  c.post_train = ""  # "module:function" that train.py's main calls with (config, workdir) afterwards.
  c.use_tensorboard = True
  c.use_progress_bar = True
  # Weights & Biases, beside metrics.jsonl and TensorBoard (metrics.WandbWriter): off while project is
  # "" (wandb is then never imported; pip install 'spacer_jax[wandb]' to use it). mode: "online",
  # "offline" (files under {workdir}/wandb, `wandb sync` them later) or "disabled".
  c.wandb = dict(project="", entity="", name="", tags=(), group="", notes="", mode="online")

  c.model = ml_collections.ConfigDict(dict(
      hf_dir=f"/ckpt/Qwen2.5-VL-{size.upper()}-Instruct",
      variant="",  # "tiny" only for tests/smoke; otherwise the architecture comes from hf_dir.
      tiny_overrides=ml_collections.ConfigDict(),
      dtype="bfloat16", param_dtype="float32", ref_param_dtype="bfloat16",
      use_remat=True,
      # Decoder as a lax.scan in train_step / token_logps (one compiled layer; weights keep their
      # names). Off up to 32B (their plans were measured unrolled); on for 72B, whose plan on a
      # v5p-64 was made with it (experiments/2026-12-04_plan_7b_v5p8: the unrolled 72B train step
      # needed more than 23.5 GB of host memory to compile there).
      scan_layers=size == "72b",
      # Vision tower over per-device patch groups on a mesh (no activation all-reduces; the 7B
      # step on v5p-8: experiments/2026-12-04_plan_7b_v5p8). Multi-process runs keep one group.
      vision_patch_groups=True,
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
      # A record whose media path is absolute or resolves outside media_root (`..`, symlinks) is a
      # bad record unless this is True (for datasets laid out that way on purpose).
      allow_media_outside_root=False,
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
      # rewards.RewardConfig fields (defaults reproduce SpaceR's quirks;
      # docs/spacer_recipe.md, "Reward quirks"):
      use_article_fix=False, use_first_number_fix=False, use_zero_map_fix=False,
      use_non_sr_map_fix=False, use_empty_gt_map_fix=False, use_nan_fix=False,
      use_overflow_fix=False, use_stop_token_mask_fix=False,
      temporal_alpha=0.3, temporal_mu=0.8, bonus_threshold=0.1,
      length_bonus=0.2, length_range=(320, 512)))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-6, schedule="cosine", warmup_steps=0, decay_steps=0, wd=0.01, b1=0.9, b2=0.999,
      eps=1e-8, grad_clip=5.0, freeze=(),
      # > 0 with sft_warmup_steps: the schedule spans the SFT steps (peak lr) and starts again at the
      # first GRPO step with peak rl_lr. 0 = one schedule over the whole run.
      rl_lr=0.0))

  # LoRA (spacer_jax/lora.py; README "LoRA"): rank 0 = off (full fine-tuning). Only the adapters
  # (and `train_also` parameters) are trained and held by the optimizer; the frozen base is stored in
  # base_param_dtype and is also GRPO's reference policy (no second copy of the weights).
  c.lora = ml_collections.ConfigDict(dict(
      rank=lora, alpha=32.0, dropout=0.0,
      # Regexes searched in the Linear layers' names (LORA_TARGETS presets; lora_targets= argument).
      targets=tuple(dict.fromkeys(t for n in lora_targets.split("+") for t in LORA_TARGETS[n])),
      train_also=(),  # regexes over parameter names trained in full (e.g. r"^lm_head\.")
      base_param_dtype="bfloat16", use_rslora=False,
      adapter_dir="",  # start from this peft adapter (adapter_config.json + safetensors)
      export_subdir="adapter"))  # the final adapters in peft format ("" = off)

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
  c.lora.base_param_dtype = "float32"
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


# ------------------------------------------------------------------------------------------------
# Start-up validation of a training config.
# ------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
  """A config that cannot train; `problems` lists every offending field (one line each)."""

  def __init__(self, problems):
    self.problems = list(problems)
    n = len(self.problems)
    super().__init__(f"the config has {n} problem{'s' * (n != 1)}:\n"
                     + "\n".join(f"  {p}" for p in self.problems))


def _get(config, field):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def problems(config, *, num_devices=None, process_count=1, check_paths=True):
  """Every reason why `config` (a train.py config) cannot train, each naming its field.

  Checks types and ranges of the values train.py reads (batch size, steps, generations, buckets,
  learning rate, ...), the combinations that cannot work (num_generations < 2 or temperature <= 0
  when any GRPO step runs, grad_accum_steps not dividing the rows of a step, sft_warmup_steps
  beyond total_steps, a mesh that does not fit the devices) and that every checkpoint and data
  path exists. Nothing is compiled or loaded.

  Args:
    config: the ConfigDict of spacer_jax/configs/{sgrlvr,grpo,sft}.py (after command-line overrides).
    num_devices: number of devices the mesh must cover (None: not checked).
    process_count: number of processes (hosts); data.batch_size must divide among them.
    check_paths: False skips the data and checkpoint paths (python -m spacer_jax.plan checks a
      config on a host that has neither).

  Returns:
    A list of "config.<field> = <value>: <what is wrong>" strings; empty when the config is fine.
  """
  import os  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  out = []

  def bad(field, what):
    try:
      value = repr(_get(config, field))
    except (KeyError, AttributeError):
      value = "<missing>"
    out.append(f"config.{field} = {value}: {what}")

  def check(field, ok, what):
    """Records `what` for `field` unless ok(value); a missing field is a problem too."""
    try:
      value = _get(config, field)
    except (KeyError, AttributeError):
      bad(field, "missing")
      return None
    try:
      good = ok(value)
    except TypeError:
      good = False
    if not good:
      bad(field, what)
    return value if good else None

  def path(field, inner=None):
    if not check_paths:
      return
    value = _get(config, field)
    if not value or not os.path.exists(value):
      bad(field, f"does not exist; set --config.{field}=...")
    elif inner and not os.path.exists(os.path.join(value, inner)):
      bad(field, f"has no {inner}; set --config.{field}=...")

  positive_int = lambda x: _is_int(x) and x >= 1  # noqa: E731
  non_negative_int = lambda x: _is_int(x) and x >= 0  # noqa: E731

  # -- steps and mode --------------------------------------------------------------------------
  mode = check("mode", lambda x: x in ("grpo", "sft"), "must be 'grpo' or 'sft'")
  total = check("total_steps", positive_int, "must be an integer >= 1")
  warmup = check("sft_warmup_steps", non_negative_int, "must be an integer >= 0")
  if mode == "grpo" and total is not None and warmup is not None and warmup > total:
    bad("sft_warmup_steps", f"is more than total_steps = {total}")
  # Which phases run (both are assumed where the step counts themselves are wrong).
  has_sft = mode == "sft" or (mode == "grpo" and warmup != 0)
  has_rl = mode == "grpo" and (total is None or warmup is None or total > warmup)
  if has_sft:
    check("sft_target", lambda x: x in ("solution", "process"), "must be 'solution' or 'process'")
  for field in ("log_every_steps", "rollout_log_every_steps", "ckpt_every_steps", "eval.every_steps",
                "max_skipped_steps"):
    check(field, non_negative_int, "must be an integer >= 0 (0 = never)")
  check("keep_ckpts", positive_int, "must be an integer >= 1")
  accum = check("grad_accum_steps", positive_int, "must be an integer >= 1")
  if config.get("resume"):
    path("resume")
  if config.get("wandb") and config.wandb.get("project"):
    import importlib.util  # pylint: disable=g-import-not-at-top
    check("wandb.mode", lambda x: x in ("online", "offline", "disabled"),
          "must be 'online', 'offline' or 'disabled'")
    if importlib.util.find_spec("wandb") is None:
      bad("wandb.project", "is set but wandb is not installed: pip install 'spacer_jax[wandb]'")

  # -- data --------------------------------------------------------------------------------------
  batch = check("data.batch_size", positive_int, "must be an integer >= 1")
  if batch is not None and batch % process_count:
    bad("data.batch_size", f"is not divisible by the {process_count} processes")
  source = check("data.source", lambda x: x in ("spacer", "synthetic"),
                 "must be 'spacer' or 'synthetic'")
  if source == "spacer":
    path("data.annotations")
    path("data.media_root")
    if config.rewards.get("use_map") and config.data.get("cognitive_maps"):
      path("data.cognitive_maps")
  if config.data.get("tokenizer_dir"):
    path("data.tokenizer_dir")
  buckets = check("data.prompt_buckets",
                  lambda x: len(x) > 0 and all(_is_int(b) and b >= 1 for b in x)
                  and all(a < b for a, b in zip(x, x[1:])),
                  "must be a non-empty, strictly increasing sequence of positive integers")
  del buckets
  check("data.max_frames", lambda x: _is_int(x) and x >= 2, "must be an integer >= 2")
  check("data.video_fps", lambda x: _is_number(x) and x > 0, "must be > 0")
  for kind in ("video", "image"):
    lo = check(f"data.{kind}_min_pixels", positive_int, "must be an integer >= 1")
    hi = check(f"data.{kind}_max_pixels", positive_int, "must be an integer >= 1")
    if lo is not None and hi is not None and lo > hi:
      bad(f"data.{kind}_min_pixels", f"is more than data.{kind}_max_pixels = {hi}")
  check("data.num_workers", non_negative_int, "must be an integer >= 0")

  # -- model ---------------------------------------------------------------------------------------
  variant = check("model.variant", lambda x: x in ("", "tiny"),
                  "must be '' (architecture from model.hf_dir) or 'tiny'")
  if variant == "":
    path("model.hf_dir", "config.json")
  for field in ("model.dtype", "model.param_dtype", "model.ref_param_dtype"):
    check(field, lambda x: x in ("float32", "bfloat16", "float16", "float64"),
          "must be float32, bfloat16, float16 or float64")

  # -- sampling and GRPO (only where a GRPO step runs) -------------------------------------------
  check("sampling.max_new_tokens", positive_int, "must be an integer >= 1")
  g = None
  if has_rl:
    from spacer_jax import grpo  # pylint: disable=g-import-not-at-top
    during = "when any GRPO step runs (total_steps > sft_warmup_steps)"
    g = check("grpo.num_generations", lambda x: _is_int(x) and x >= 2,
              f"must be an integer >= 2 {during}: advantages compare completions within a group")
    check("grpo.num_iterations", positive_int, "must be an integer >= 1")
    check("sampling.temperature", lambda x: _is_number(x) and x > 0,
          f"must be > 0 {during}: greedy samples make every advantage 0")
    check("sampling.top_p", lambda x: _is_number(x) and 0 < x <= 1, "must be in (0, 1]")
    check("sampling.top_k", non_negative_int, "must be an integer >= 0 (0 = off)")
    check("grpo.beta", lambda x: _is_number(x) and x >= 0, "must be >= 0")
    for field in ("grpo.epsilon", "grpo.epsilon_high"):
      check(field, lambda x: x is None or (_is_number(x) and x > 0), "must be None or > 0")
    check("grpo.max_completion_length", lambda x: x is None or positive_int(x),
          "must be None or an integer >= 1")
    check("grpo.loss_agg", lambda x: x in grpo.LOSS_AGGS, f"must be one of {grpo.LOSS_AGGS}")
    scaling = check("grpo.reward_scaling", lambda x: x in grpo.REWARD_SCALINGS,
                    f"must be one of {grpo.REWARD_SCALINGS}")
    check("grpo.importance_sampling", lambda x: x in grpo.IMPORTANCE_LEVELS,
          f"must be one of {grpo.IMPORTANCE_LEVELS}")
    check("grpo.adv_eps", lambda x: _is_number(x) and (x > 0 or (x == 0 and scaling == "none")),
          "must be > 0 (a group of equal rewards has std 0)")
    check("grpo.kl_clamp", lambda x: _is_number(x) and x > 0, "must be > 0")
    check("rewards.length_range",
          lambda x: len(x) == 2 and all(_is_int(v) for v in x) and x[0] <= x[1],
          "must be (lo, hi) integers with lo <= hi")
  if accum is not None and batch is not None:
    for steps, rows, what in ((has_sft, batch, "data.batch_size (rows of an SFT step)"),
                              (has_rl, batch * g if g else None,
                               f"data.batch_size x grpo.num_generations = {batch} x {g} (rows of "
                               "a GRPO step)")):
      if steps and rows and rows % accum:
        bad("grad_accum_steps", f"does not divide {what} = {rows}")

  # -- optimizer ---------------------------------------------------------------------------------
  check("optim.lr", lambda x: _is_number(x) and x >= 0, "must be >= 0")
  check("optim.wd", lambda x: _is_number(x) and x >= 0, "must be >= 0")
  for field in ("optim.b1", "optim.b2"):
    check(field, lambda x: _is_number(x) and 0 <= x < 1, "must be in [0, 1)")
  check("optim.eps", lambda x: _is_number(x) and x > 0, "must be > 0")
  check("optim.grad_clip", lambda x: x is None or (_is_number(x) and x >= 0),
        "must be >= 0 (0 = no clipping)")
  check("optim.schedule", lambda x: x in ("cosine", "linear", "constant"),
        "must be cosine, linear or constant")
  check("optim.warmup_steps", non_negative_int, "must be an integer >= 0")
  check("optim.decay_steps", non_negative_int, "must be an integer >= 0 (0 = total_steps)")
  for i, pattern in enumerate(config.optim.get("freeze") or ()):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      bad("optim.freeze", f"entry {i} ({pattern!r}) is not a regular expression: {e}")

  # -- LoRA (only when on) ---------------------------------------------------------------------------
  rank = check("lora.rank", non_negative_int, "must be an integer >= 0 (0 = full fine-tuning)")
  if rank:
    check("lora.alpha", lambda x: _is_number(x) and x > 0, "must be > 0")
    check("lora.dropout", lambda x: _is_number(x) and 0 <= x < 1, "must be in [0, 1)")
    check("lora.base_param_dtype", lambda x: x in ("", "float32", "bfloat16", "float16"),
          "must be float32, bfloat16, float16 or '' (= model.param_dtype)")
    check("lora.targets", lambda x: len(x) > 0, "must name at least one layer (presets: "
          "config_lib.LORA_TARGETS)")
    for field in ("lora.targets", "lora.train_also"):
      for i, pattern in enumerate(config.lora.get(field.split(".")[1]) or ()):
        try:
          re.compile(pattern)
        except (re.error, TypeError) as e:
          bad(field, f"entry {i} ({pattern!r}) is not a regular expression: {e}")
    if config.lora.get("adapter_dir"):
      path("lora.adapter_dir", "adapter_config.json")

  # -- periodic evaluation ---------------------------------------------------------------------
  if config.eval.get("every_steps"):
    bench = check("eval.benchmark", lambda x: x in EVAL_BENCHMARKS,
                  f"must be one of {EVAL_BENCHMARKS}")
    protocols = ("spacer", "spacer_default") + (("official",) if bench == "vsibench" else ())
    check("eval.protocol", lambda x: x in protocols, f"must be one of {protocols} for {bench}")
    check("eval.aggregation", lambda x: x in ("code", "readme"), "must be 'code' or 'readme'")
    check("eval.batch_size", positive_int, "must be an integer >= 1")
    check("eval.max_new_tokens", positive_int, "must be an integer >= 1")
    check("eval.max_items", non_negative_int, "must be an integer >= 0 (0 = all)")
    if config.eval.get("data_dir"):
      path("eval.data_dir")
    elif source == "spacer" or bench != "vsibench":
      bad("eval.data_dir", f"must be set (a {bench} directory) when eval.every_steps > 0; only a "
          "synthetic run has a default (its held-out split, for vsibench)")

  # -- mesh ------------------------------------------------------------------------------------------
  mesh = config.get("mesh")
  try:
    names = [str(n) for n, _ in mesh]
    sizes = [int(s) for _, s in mesh]
  except (TypeError, ValueError):
    bad("mesh", "must be a list of (axis name, size) pairs")
  else:
    if sorted(names) != sorted(MESH_AXES):
      bad("mesh", f"must name each of the axes {MESH_AXES} once")
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
      bad("mesh", "sizes must be >= 1, with at most one -1 (= all remaining devices)")
    elif num_devices is not None:
      import math  # pylint: disable=g-import-not-at-top
      known = math.prod(s for s in sizes if s != -1)
      if (-1 in sizes and num_devices % known) or (-1 not in sizes and known != num_devices):
        bad("mesh", f"does not fit the {num_devices} devices")
  return out


def validate(config, *, num_devices=None, process_count=1, check_paths=True):
  """Raises ConfigError listing every problem of `config` (see `problems`); returns None if fine."""
  found = problems(config, num_devices=num_devices, process_count=process_count,
                   check_paths=check_paths)
  if found:
    raise ConfigError(found)


# ---------------------------------------------------------------------------------------------------
# Evaluation (python -m spacer_jax.evaluate; spacer_jax/configs/eval_*.py).
# ---------------------------------------------------------------------------------------------------

# The benchmarks spacer_jax.evaluate runs (config value -> module, see evaluate.BENCHMARKS).
EVAL_BENCHMARKS = ("vsibench", "stibench", "sparbench", "videomme", "tempcompass", "longvideobench")
# Generation budget of each protocol: SpaceR-Eval thinking / default mode, VSI-Bench's official one.
EVAL_MAX_NEW_TOKENS = {"spacer": 1024, "spacer_default": 128, "official": 16}
# Where train.py leaves things in a demo workdir: model_config.json + ckpt/ at the top, the offline
# tokenizer, and the synthetic dataset whose held-out split is in VSI-Bench format.
DEMO_TOKENIZER_SUBDIR = "tokenizer"
DEMO_SYNTHETIC_SUBDIR = "data/synthetic"  # train.py's default config.data.synthetic_root


def eval_config(arg=None, benchmark="vsibench"):
  """The evaluation config of spacer_jax/configs/eval_*.py.

  Args:
    arg: `benchmark=NAME,protocol=P,aggregation=code|readme,demo,demo_workdir=DIR` (all optional).
      protocol "" = "spacer" (SpaceR-Eval's thinking mode); "spacer_default" = its non-thinking mode;
      "official" = VSI-Bench's own protocol (vsibench only). demo evaluates a `train.py` demo workdir
      on its synthetic VSI-Bench split.
    benchmark: the default of the `benchmark=` argument (each spacer_jax/configs/eval_X.py sets its
      own).
  """
  arg = parse_arg(arg, benchmark=benchmark, protocol="", aggregation="code", demo=False,
                  demo_workdir="")
  if arg.benchmark not in EVAL_BENCHMARKS:
    raise ValueError(f"benchmark={arg.benchmark!r}: use one of {EVAL_BENCHMARKS}")
  protocol = arg.protocol or "spacer"
  if protocol not in EVAL_MAX_NEW_TOKENS or (protocol == "official" and arg.benchmark != "vsibench"):
    raise ValueError(f"protocol={protocol!r}: use spacer or spacer_default"
                     + (" or official" if arg.benchmark == "vsibench" else ""))
  if arg.aggregation not in ("code", "readme"):
    raise ValueError(f"aggregation={arg.aggregation!r}: use code or readme")
  spacer = protocol != "official"
  c = ml_collections.ConfigDict()
  c.benchmark = arg.benchmark
  c.model_dir = ""        # HF checkpoint (config.json + safetensors) or trainer checkpoint dir.
  c.tokenizer_dir = ""    # default: model_dir.
  c.data_dir = ""         # The benchmark's directory (its layout: the benchmark module's docstring).
  c.protocol = protocol
  c.aggregation = arg.aggregation  # "code": as SpaceR-Eval computes it; "readme": its README tables.
  c.max_new_tokens = EVAL_MAX_NEW_TOKENS[protocol]
  # SpaceR-Eval's greedy decoding carries Qwen2.5-VL's generation_config repetition penalty.
  c.repetition_penalty = 1.05 if spacer else 1.0
  c.batch_size = 8        # global; a multiple of the device count shards rows over devices.
  c.dtype = "bfloat16"
  c.cache_dtype = ""      # "" = dtype.
  c.mesh = "fsdp"         # MESH_PRESETS / SHARDING_PRESETS key.
  c.prompt_buckets = (512, 1024, 2048, 4096, 8192)
  # spacer_eval: SpaceR-Eval's frames (<= 32 at 1 fps, long side 448 with its width/height swap,
  # then qwen-vl-utils' image budget 3,136..200,704 pixels). pipeline: the training video path.
  c.video = ml_collections.ConfigDict(dict(
      sampler="spacer_eval" if spacer else "pipeline",
      fps=1.0, min_frames=4, max_frames=32, max_side=448, swap_hw=True,
      min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28 if spacer else 448 * 336,
  ))
  # Images (SPAR-Bench): qwen-vl-utils' image budget.
  c.image = ml_collections.ConfigDict(dict(min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28))
  c.name = ""             # table row label; default: basename of model_dir.
  c.allow_missing_videos = True
  c.allow_outside_data_dir = False  # media paths that resolve outside data_dir are bad records.
  c.max_items = 0         # 0 = all questions.
  c.num_workers = 2       # media decoding threads.
  c.progress = True

  if arg.demo:
    if arg.benchmark != "vsibench" or not arg.demo_workdir:
      raise ValueError("the demo evaluation is benchmark=vsibench with demo_workdir=DIR (the demo's"
                       " --workdir)")
    from spacer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    c.model_dir = arg.demo_workdir
    c.tokenizer_dir = f"{arg.demo_workdir}/{DEMO_TOKENIZER_SUBDIR}"
    c.data_dir = synthetic.dataset_paths(f"{arg.demo_workdir}/{DEMO_SYNTHETIC_SUBDIR}").eval_root
    c.max_new_tokens = {"spacer": 128, "spacer_default": 32, "official": 16}[protocol]
    c.repetition_penalty = 1.0  # as the trainer's in-run evaluation
    c.dtype = "float32"
    c.prompt_buckets = (256, 512, 1024, 2048)
    # SyntheticConfig.demo(): 4 frames of 56x56 at 2 fps; keep every frame at full size.
    c.video = ml_collections.ConfigDict(dict(
        sampler="pipeline", fps=2.0, min_frames=4, max_frames=4, max_side=448, swap_hw=True,
        min_pixels=56 * 56, max_pixels=56 * 56))
    c.name = "demo"
  return c
