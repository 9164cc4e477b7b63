"""SG-RLVR / GRPO / SFT trainer: `python -m spacer_jax.train --config=configs/sgrlvr.py --workdir=DIR`.

One main() in banner sections (STYLE 3.8): workdir record, mesh, tokenizer, model, shardings, state
init/resume, data, jitted functions, the loop. The pure functions at module level are what gets jitted:

  train_step(state, batch, ref_logps) -> (state, metrics)   donates state; explicit shardings.
      Vision tower + prompt embedding once per prompt (a jax.vjp, so its backward also runs once),
      then a lax.scan over micro-batches of completion rows (gradient accumulation inside the step);
      each row gathers its prompt's embeddings, the LM forward gives per-token log-probs, the loss is
      grpo.compute_loss (GRPO) or token cross-entropy (SFT). The accumulated embedding cotangent goes
      through the vision vjp once. AdamW update; non-finite gradients skip the update and are logged.
  token_logps(params, batch) -> float32[R, Tc]               reference (beta > 0) / old-policy log-probs.

Rollouts use sampling.py's jitted prefill/decode on the same weights (rollout.py is the host glue).

State: {"step": int32, "params": {hf_key: array}, "opt_state": optax state of the trainable subset,
"rng": uint32[2]}. Parameters are stored in `config.model.param_dtype` (float32 master weights) and
the model computes in `config.model.dtype` (bfloat16 on accelerators); Adam moments are float32.
"""

import dataclasses
import functools
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from spacer_jax import checkpoint, grpo, metrics as metrics_lib, optim, rollout, sharding, tree_utils

# Keys of a TrainBatch that have one entry per completion row (split into micro-batches).
ROW_KEYS = ("completion_ids", "completion_mask", "attention_mask", "position_ids", "prompt_index",
            "advantages", "old_logps", "ref_logps")


# ------------------------------------------------------------------------------------------------
# Pure functions (jitted in main).
# ------------------------------------------------------------------------------------------------
def _prompt_embeds(model, batch):
  """Vision features (once per prompt) scattered into the prompt embeddings: [B, Tp, D]."""
  img = vid = None
  if "pixel_values" in batch:
    img = model.get_vision_features(batch["pixel_values"], batch["image_vis"])
  if "pixel_values_videos" in batch:
    vid = model.get_vision_features(batch["pixel_values_videos"], batch["video_vis"])
  return model.embed(batch["prompt_ids"], image_features=img, video_features=vid)


def _row_logits(model, prompt_embeds, mb):
  """Logits of the completion tokens of a micro-batch of rows: float32[m, Tc, V]."""
  pe = jnp.take(prompt_embeds, mb["prompt_index"], axis=0)  # [m, Tp, D]
  ce = model.embed(mb["completion_ids"])  # [m, Tc, D]
  x = jnp.concatenate([pe, ce.astype(pe.dtype)], axis=1)  # [m, Tp+Tc, D]
  positions = jnp.transpose(mb["position_ids"], (1, 0, 2))  # [3, m, Tp+Tc]
  hidden, _ = model.forward_embeds(x, positions, mb["attention_mask"])
  tp = pe.shape[1]
  # Token t of the completion is predicted at position Tp + t - 1.
  return model.logits(hidden[:, tp - 1:-1])  # [m, Tc, V]


def _micro(rows, num_micro):
  """[R, ...] -> [M, R/M, ...] for every row array."""
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"{x.shape[0]} rows are not divisible by grad_accum_steps={num_micro}")
    return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
  return jax.tree.map(split, rows)


def _rows(batch, ref_logps=None):
  rows = {k: batch[k] for k in ROW_KEYS if k in batch and k != "ref_logps"}
  if ref_logps is not None:
    rows["ref_logps"] = ref_logps
  return rows


def token_logps(params, batch, *, graphdef, paths, num_micro=1):
  """Per-token log-probs of the completions under `params` (no gradient): float32[R, Tc]."""
  pe = _prompt_embeds(tree_utils.merge_model(graphdef, params, paths), batch)

  def body(_, mb):
    # The model is merged inside the scan body: nnx.remat (use_remat) cannot split a module whose
    # Variables belong to the enclosing trace.
    model = tree_utils.merge_model(graphdef, params, paths)
    return None, grpo.token_logps(_row_logits(model, pe, mb), mb["completion_ids"])

  _, out = jax.lax.scan(body, None, _micro(_rows(batch), num_micro))
  return out.reshape(-1, out.shape[-1])


def _loss(trainable, frozen, prompt_embeds, mb, *, graphdef, paths, mode, grpo_config):
  """Loss of one micro-batch of rows and its metrics."""
  model = tree_utils.merge_model(graphdef, {**trainable, **frozen}, paths)
  logits = _row_logits(model, prompt_embeds, mb)
  logps = grpo.token_logps(logits, mb["completion_ids"])
  mask = mb["completion_mask"]
  if mode == "sft":
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = -(logps * mask).sum() / tokens
    return loss, {"loss": loss, "sft/nll": loss, "sft/tokens": mask.sum()}
  entropy = grpo.token_entropy(jax.lax.stop_gradient(logits))
  return grpo.compute_loss(logps, mb.get("old_logps"), mb.get("ref_logps"), mb["advantages"], mask,
                           grpo_config, entropy=entropy)


def train_step(state, batch, ref_logps, *, graphdef, paths, tx, trainable_keys, mode, grpo_config,
               num_micro=1):
  """One optimizer step on a TrainBatch. Returns (new state, scalar metrics)."""
  params = state["params"]
  trainable = {k: params[k] for k in trainable_keys}
  frozen = {k: v for k, v in params.items() if k not in trainable}

  def embed_fn(tr):
    return _prompt_embeds(tree_utils.merge_model(graphdef, {**tr, **frozen}, paths), batch)

  # Vision + prompt embeddings once per prompt; its backward runs once, on the summed cotangent.
  pe, embed_vjp = jax.vjp(embed_fn, trainable)
  loss_fn = functools.partial(_loss, graphdef=graphdef, paths=paths, mode=mode,
                              grpo_config=grpo_config)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
  rows = _micro(_rows(batch, ref_logps), num_micro)
  # Token-mean losses (SFT, loss_agg="token_mean") are means over each micro-batch's tokens:
  # re-weight them by the micro-batch's share of the batch's tokens so that the accumulated
  # gradient is the global token mean (what transformers' num_items_in_batch does). Per-sequence
  # aggregations over equal row counts are exact without it.
  token_mean = mode == "sft" or grpo_config.loss_agg == "token_mean"
  total_tokens = jnp.maximum(batch["completion_mask"].sum(), 1.0)

  def body(carry, mb):
    g_acc, pe_acc, m_acc = carry
    (_, m), (g, g_pe) = grad_fn(trainable, frozen, pe, mb)
    if token_mean and num_micro > 1:
      w = num_micro * mb["completion_mask"].sum() / total_tokens
      g = jax.tree.map(lambda x: x * w.astype(x.dtype), g)
      g_pe = g_pe * w.astype(g_pe.dtype)
      m = {k: v * w if k in ("loss", "sft/nll") else v for k, v in m.items()}
    return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g), pe_acc + g_pe,
            jax.tree.map(jnp.add, m_acc, m)), None

  m_shape = jax.eval_shape(lambda: loss_fn(trainable, frozen, pe, jax.tree.map(lambda x: x[0], rows)))[1]
  # Accumulate in float32 whatever the compute dtype.
  init = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable),
          jnp.zeros(pe.shape, jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))
  (g_sum, pe_sum, m_sum), _ = jax.lax.scan(body, init, rows)
  inv = 1.0 / num_micro
  (g_embed,) = embed_vjp((pe_sum * inv).astype(pe.dtype))
  grads = jax.tree.map(lambda a, b: a * inv + b.astype(jnp.float32), g_sum, g_embed)
  metrics = jax.tree.map(lambda x: x * inv, m_sum)

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state["opt_state"], trainable)
  new_tr = optax.apply_updates(trainable, updates)
  # A non-finite gradient (overflow, a NaN reward slipping through) skips the whole update.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_tr = keep(new_tr, trainable)
  new_opt = keep(new_opt, state["opt_state"])
  metrics.update(
      grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32),
      param_norm=optax.global_norm(new_tr),
      update_norm=jnp.where(finite, optax.global_norm(updates), 0.0))
  new_state = {"step": state["step"] + 1, "params": {**params, **new_tr}, "opt_state": new_opt,
               "rng": state["rng"]}
  return new_state, metrics


# ------------------------------------------------------------------------------------------------
# Host helpers (config -> library keyword arguments; only train.py reads the ConfigDict).
# ------------------------------------------------------------------------------------------------
def make_reward_config(config):
  """rewards.RewardConfig from `config.rewards` (the library never sees a ConfigDict)."""
  from spacer_jax import rewards as rewards_lib  # pylint: disable=g-import-not-at-top
  r = config.rewards
  return rewards_lib.RewardConfig(
      use_article_fix=r.use_article_fix, use_first_number_fix=r.use_first_number_fix,
      use_zero_map_fix=r.use_zero_map_fix, use_non_sr_map_fix=r.use_non_sr_map_fix,
      use_empty_gt_map_fix=r.use_empty_gt_map_fix, use_nan_fix=r.use_nan_fix,
      use_overflow_fix=r.use_overflow_fix, temporal_alpha=r.temporal_alpha,
      temporal_mu=r.temporal_mu, bonus_threshold=r.bonus_threshold,
      length_bonus=r.length_bonus if r.use_length else 0.0, length_range=tuple(r.length_range))


def _check_paths(config):
  """Fails at start-up, naming the config field, when a checkpoint or data path is missing."""
  need = []
  if not config.model.variant:
    need.append(("config.model.hf_dir", config.model.hf_dir, "config.json"))
  if config.data.source == "spacer":
    need.append(("config.data.annotations", config.data.annotations, None))
    need.append(("config.data.media_root", config.data.media_root, None))
    if config.rewards.use_map and config.data.cognitive_maps:
      need.append(("config.data.cognitive_maps", config.data.cognitive_maps, None))
  elif config.data.source != "synthetic":
    raise ValueError(f"config.data.source must be spacer|synthetic, got {config.data.source!r}")
  if config.data.tokenizer_dir:
    need.append(("config.data.tokenizer_dir", config.data.tokenizer_dir, None))
  for field, path, inner in need:
    if not path or not os.path.exists(path) or (inner and not os.path.exists(os.path.join(path, inner))):
      what = f"{path!r}" + (f" (no {inner})" if path and inner and os.path.exists(path) else "")
      raise FileNotFoundError(f"{field} = {what} does not exist; set --{field}=...")


def _git_commit():
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _tokenizer(config, workdir):
  from spacer_jax.data import tokenizer as tokenizer_lib  # Host-only dependency (tokenizers).
  if config.model.variant:
    # Tiny/smoke/demo runs use the project's offline BPE; it is written to the workdir so evaluation
    # (and a resumed run) reads exactly the same vocabulary.
    tok_dir = config.data.tokenizer_dir or os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
      return tokenizer_lib.load_tokenizer(tok_dir)
    return tokenizer_lib.build_offline_tokenizer(out_dir=tok_dir)
  return tokenizer_lib.load_tokenizer(config.data.tokenizer_dir or config.model.hf_dir)


def _model_config(config, tokenizer):
  from spacer_jax.models import qwen2_5_vl
  common = dict(use_remat=bool(config.model.use_remat), scan_layers=bool(config.model.scan_layers),
                text_after_vision=config.model.text_after_vision)
  if config.model.variant == "tiny":
    ids = tokenizer.special_ids()
    eos = ids.pop("eos_token_id")
    return qwen2_5_vl.tiny(**ids, eos_token_id=(eos,), **common,
                           **config.model.tiny_overrides.to_dict())
  if config.model.variant:
    raise ValueError(f"config.model.variant must be '' or 'tiny', got {config.model.variant!r}")
  return qwen2_5_vl.Qwen2_5_VLConfig.from_hf_json(config.model.hf_dir, **common)


def _records(config, workdir):
  """Training records (sources.Record list); generates the synthetic dataset on first use."""
  from spacer_jax.data import prompts, sources
  if config.data.source == "synthetic":
    from spacer_jax.data import synthetic
    root = config.data.synthetic_root or os.path.join(workdir, "data", "synthetic")
    paths = synthetic.generate_dataset(root, synthetic.SyntheticConfig.demo(
        **config.data.synthetic.to_dict()), progress=False)
    annotations, media_root, maps = paths.train_jsonl, paths.root, paths.cognitive_map
  else:
    annotations, media_root = config.data.annotations, config.data.media_root
    maps = config.data.cognitive_maps or None
  bad = sources.BadRecords(strict=not config.data.skip_bad_records)
  records = sources.load_spacer(annotations, media_root=media_root, cognitive_map_path=maps, bad=bad)
  if not config.data.use_cogmap_prompt:
    # Plain GRPO: every record gets the QUESTION_TEMPLATE prompt (no map instructions).
    records = [dataclasses.replace(r, prompt=prompts.spacer_prompt(r.problem, r.problem_type,
                                                                   r.options, "", ()))
               for r in records]
  if not records:
    raise ValueError(f"no usable records in {annotations} (skipped: {dict(bad.counts)})")
  return records, bad


def _data_config(config, temporal):
  from spacer_jax.data import pipeline
  d = config.data
  return pipeline.DataConfig(
      batch_size=d.batch_size // jax.process_count(), buckets=tuple(d.prompt_buckets),
      fps=d.video_fps, max_frames=d.max_frames, video_min_pixels=d.video_min_pixels,
      video_max_pixels=d.video_max_pixels, image_min_pixels=d.image_min_pixels,
      image_max_pixels=d.image_max_pixels, temporal=temporal, num_workers=d.num_workers,
      shuffle=d.shuffle, strict=not d.skip_bad_records)


def _bucket(n):
  return 1 << max(int(n) - 1, 0).bit_length()


def vision_budget(cfg, batch):
  """Static pad-to sizes for prepare_vision_inputs: pixel rows are already at the pipeline's budget;
  window and frame counts are rounded up to powers of two, so a batch recompiles only when a new
  bucket is reached."""
  from spacer_jax.models import positions
  out = {}
  for kind, pix, grid in (("video", "pixel_values_videos", "video_grid_thw"),
                          ("image", "pixel_values", "image_grid_thw")):
    if not rollout.present(batch, pix, grid):
      continue
    g = np.asarray(batch[grid], np.int64).reshape(-1, 3)
    _, cu_win = positions.window_index(g, window_size=cfg.window_size, patch_size=cfg.patch_size,
                                       spatial_merge_size=cfg.spatial_merge_size)
    out[kind] = dict(num_patches=int(np.asarray(batch[pix]).shape[0]),
                     num_windows=_bucket(len(cu_win) - 1), num_frames=_bucket(int(g[:, 0].sum())),
                     frame_len=_bucket(int((g[:, 1] * g[:, 2]).max())))
  return out


def _compiles(fns):
  return {f"compiles/{name}": int(fn._cache_size()) for name, fn in fns.items()}  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required")
  workdir = os.path.abspath(workdir)  # orbax needs absolute paths; a relative --workdir is common.
  from spacer_jax import evaluate, sampling  # Imported here: they pull in the model code.
  from spacer_jax.data import pipeline
  from spacer_jax.models import qwen2_5_vl

  # == Workdir record ===========================================================================
  _check_paths(config)
  if config.jax_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.jax_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  with open(os.path.join(workdir, "git_commit.txt"), "w") as f:
    f.write(_git_commit() + "\n")
  mode = config.mode
  if mode not in ("grpo", "sft"):
    raise ValueError(f"config.mode must be grpo|sft, got {mode!r}")
  sft_steps = config.total_steps if mode == "sft" else int(config.sft_warmup_steps)
  rl_steps = config.total_steps - sft_steps
  g = int(config.grpo.num_generations)
  mu = int(config.grpo.num_iterations)
  grpo_config = grpo.GRPOConfig(
      beta=config.grpo.beta, epsilon=config.grpo.epsilon, epsilon_high=config.grpo.epsilon_high,
      loss_agg=config.grpo.loss_agg, max_completion_length=config.grpo.max_completion_length,
      reward_scaling=config.grpo.reward_scaling,
      importance_sampling=config.grpo.importance_sampling, adv_eps=config.grpo.adv_eps,
      kl_clamp=config.grpo.kl_clamp)
  reward_config = make_reward_config(config)
  use_ref = rl_steps > 0 and config.grpo.beta > 0

  # == Tokenizer and model ======================================================================
  tokenizer = _tokenizer(config, workdir)
  cfg = _model_config(config, tokenizer)
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
  dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
  # Abstract model before the mesh context: with a mesh set, nnx.eval_shape would read the logical
  # names as mesh axes (they are resolved with config.sharding_rules below instead).
  abstract_model = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VL(
      cfg, rngs=nnx.Rngs(config.seed), dtype=dtype, param_dtype=param_dtype))
  graphdef, abstract_params, paths = tree_utils.split_model(abstract_model)

  # == Mesh =====================================================================================
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple((n, tuple(a) if isinstance(a, (list, tuple)) else a) for n, a in config.sharding_rules)
  logging.info("mesh %s on %s", dict(mesh.shape), jax.devices()[0].platform)
  # Parameter and batch shardings are explicit (tree_shardings / put_batch). Activation constraints
  # inside the model (layers.constrain) resolve with the same rules through
  # sharding.logical_to_spec; they are active where the jitted functions are traced, in the loop
  # (under nnx.logical_axis_rules), and not while models are built (flax would shard them eagerly).
  with jax.set_mesh(mesh):
    logical = sharding.param_logical_axes(nnx.split(abstract_model)[1])
    param_shardings = sharding.tree_shardings(abstract_params, mesh, rules, logical)
    logging.info("parameters: %s\n%s", f"{tree_utils.param_count(abstract_params):,}",
                 sharding.describe(abstract_params, param_shardings, logical))

    # == Optimizer and state shardings ==========================================================
    freeze = tuple(config.optim.freeze) + ((r"^visual\.",) if config.model.freeze_vision else ())
    trainable_keys = optim.trainable_keys(abstract_params, freeze)
    decay = config.optim.decay_steps or config.total_steps * (1 if mode == "sft" else mu)
    tx, schedule = optim.make_optimizer(
        {k: abstract_params[k] for k in trainable_keys}, lr=config.optim.lr, total_steps=decay,
        schedule=config.optim.schedule, warmup_steps=config.optim.warmup_steps, wd=config.optim.wd,
        b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
        grad_clip=config.optim.grad_clip)
    abstract_opt = jax.eval_shape(tx.init, {k: abstract_params[k] for k in trainable_keys})
    repl = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, {k: param_shardings[k] for k in trainable_keys},
        transform_non_params=lambda _: repl)
    state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings,
                       "rng": repl}

    @functools.lru_cache(maxsize=None)
    def random_init(p_dtype):
      # Tiny model only. unsafe_rbg: XLA compiles threefry for ~100 params 2-3x slower on CPU, and
      # this init only has to be deterministic, not a particular stream.
      def init():
        with jax.default_prng_impl("unsafe_rbg"):
          return tree_utils.split_model(qwen2_5_vl.Qwen2_5_VL(
              cfg, rngs=nnx.Rngs(config.seed), dtype=dtype, param_dtype=p_dtype))[1]
      return jax.jit(init, out_shardings=param_shardings)

    def load_params(p_dtype):
      if config.model.variant:
        # Random init placed directly on its shardings (a fresh copy on every call: the policy's
        # buffers are donated to train_step, the reference's must survive).
        return random_init(jnp.dtype(p_dtype))()
      model = qwen2_5_vl.load_hf(config.model.hf_dir, dtype=dtype, param_dtype=p_dtype, mesh=mesh,
                                 rules=rules, use_remat=bool(config.model.use_remat),
                                 scan_layers=bool(config.model.scan_layers),
                                 text_after_vision=config.model.text_after_vision)
      return tree_utils.split_model(model)[1]

    def init_state():
      params = load_params(param_dtype)
      opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(
          {k: params[k] for k in trainable_keys})
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
              "rng": jax.random.PRNGKey(config.seed)}

    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "params": abstract_params,
                                "opt_state": abstract_opt, "rng": jax.random.PRNGKey(0)}),
        state_shardings)

    # == Data =====================================================================================
    records, bad = _records(config, workdir)
    logging.info("%d training records (%d skipped at load: %s)", len(records), bad.total,
                 dict(bad.counts))
    eval_dir = config.eval.data_dir
    if config.eval.every_steps and not eval_dir:
      if config.data.source != "synthetic":
        raise ValueError("config.eval.every_steps > 0 needs config.eval.data_dir (a VSI-Bench root)")
      from spacer_jax.data import synthetic
      eval_dir = synthetic.dataset_paths(
          config.data.synthetic_root or os.path.join(workdir, "data", "synthetic")).eval_root
    demo = None
    if "demo" in config:
      from spacer_jax import demo  # The CPU demo's extras (SFT traces, held-out summary).
    traces = demo.load_traces(config, workdir) if demo else None
    temporal = rl_steps > 0 and bool(config.rewards.use_temporal)
    train_iter = pipeline.make_iterator(records, tokenizer, _data_config(config, temporal),
                                        seed=config.seed)

    # == Restore or init (resume order: checkpoint.restore_or_init) ==============================
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=config.keep_ckpts)
    state, source = checkpoint.restore_or_init(ckpt, abstract_state, init_state, train_iter,
                                               resume_dir=config.resume)
    start = int(state["step"]) + 1
    logging.info("state from %s; starting at step %d of %d", source, start, config.total_steps)
    # The reference policy is the initial model, reloaded (never checkpointed).
    ref_params = load_params(jnp.dtype(config.model.ref_param_dtype)) if use_ref else None

    # == Jitted functions =========================================================================
    sampler = sampling.Sampler(
        abstract_model, temperature=config.sampling.temperature, top_k=config.sampling.top_k,
        top_p=config.sampling.top_p, mesh=mesh, cache_dtype=dtype,
        stop_ids=(tokenizer.eos_token_id, tokenizer.pad_token_id))
    num_micro = int(config.grad_accum_steps)
    step_fns = {}

    def get_step(phase, tb, ref):
      # Built at the first batch of each phase: the batch shardings come from its (static) shapes.
      if phase not in step_fns:
        shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
        step_fns[phase] = jax.jit(
            functools.partial(train_step, graphdef=graphdef, paths=paths, tx=tx,
                              trainable_keys=tuple(trainable_keys), mode=phase,
                              grpo_config=grpo_config, num_micro=num_micro),
            in_shardings=(state_shardings, shard_of(tb), shard_of(ref)),
            out_shardings=(state_shardings, repl), donate_argnums=(0,))
      return step_fns[phase]

    logps_fn = jax.jit(functools.partial(token_logps, graphdef=graphdef, paths=paths,
                                         num_micro=num_micro))

    def put_batch(tb):
      # One explicit transfer: per-row and per-prompt arrays over the batch axes (where they divide),
      # pixels and vision index arrays replicated (the vision tower constrains its own activations).
      batched = ROW_KEYS + ("prompt_ids", "prompt_mask")
      shard = {k: (sharding.batch_shardings(v, mesh, rules) if k in batched
                   else jax.tree.map(lambda _: repl, v)) for k, v in tb.items()}
      return jax.device_put(tb, shard)

    # == Loop =====================================================================================
    writer = metrics_lib.MetricWriter(workdir, start_step=start,
                                      use_tensorboard=config.use_tensorboard)
    bar = metrics_lib.progress(start, config.total_steps, disable=not config.use_progress_bar)
    skipped_in_row = 0
    logged_memory = False
    with checkpoint.PreemptionGuard() as guard, nnx.logical_axis_rules(rules):
      for step in range(start, config.total_steps + 1):
        phase = "sft" if step <= sft_steps else "grpo"
        t0 = time.perf_counter()
        with writer.timed("data"):
          batch = next(train_iter)
        params_state = tree_utils.to_state(state["params"], paths)
        sampler.vision_budget = vision_budget(cfg, batch)
        with writer.timed("rollout"):
          if phase == "sft":
            if traces is not None:
              batch = demo.attach_traces(batch, traces)
            tb, roll_metrics, samples = rollout.sft_batch(
                sampler, batch, tokenizer=tokenizer, max_new_tokens=config.sampling.max_new_tokens,
                target=config.sft_target)
          else:
            rng = jax.random.fold_in(state["rng"], step)
            tb, roll_metrics, samples = rollout.run(
                sampler, params_state, batch, tokenizer=tokenizer, num_generations=g,
                max_new_tokens=config.sampling.max_new_tokens, rng=rng,
                reward_config=reward_config, use_temporal=temporal, use_map=bool(config.rewards.use_map),
                reward_scaling=grpo_config.reward_scaling, adv_eps=grpo_config.adv_eps)
        tb.pop("sampler_logps")
        tb = put_batch(tb)
        ref = None
        with writer.timed("train"):
          if phase == "grpo" and use_ref:
            ref = logps_fn(ref_params, tb)
          if phase == "grpo" and mu > 1:
            tb["old_logps"] = logps_fn(state["params"], tb)
          with jax.transfer_guard("disallow"):
            for _ in range(mu if phase == "grpo" else 1):
              state, step_metrics = get_step(phase, tb, ref)(state, tb, ref)
          step_metrics = jax.device_get(step_metrics)
        skipped_in_row = skipped_in_row + 1 if step_metrics["skipped"] else 0
        if skipped_in_row > config.max_skipped_steps:
          raise FloatingPointError(f"{skipped_in_row} steps in a row (up to step {step}) had "
                                   f"non-finite gradients; see {writer.metrics_path}")
        bar.update(1)
        if metrics_lib.every(step, config.log_every_steps) or step == config.total_steps:
          timers = writer.pop_timers()
          scalars = {**{f"train/{k}": v for k, v in step_metrics.items()}, **roll_metrics, **timers,
                     "train/lr": float(schedule(max(step - 1, 0) * (mu if phase == "grpo" else 1))),
                     "phase_sft": float(phase == "sft"),
                     **bad.metrics("data/bad_records_at_load"),
                     **batch.get("bad_records", {})}
          wall = time.perf_counter() - t0
          scalars["time/step_s"] = wall
          if "rollout/tokens" in roll_metrics:
            scalars["rollout/tokens_per_s"] = roll_metrics["rollout/tokens"] / max(
                timers.get("time/rollout_s", wall), 1e-9)
          scalars["train/tokens_per_s"] = float(np.asarray(tb["completion_mask"]).sum()) / max(
              timers.get("time/train_s", wall), 1e-9)
          scalars.update(_compiles({"train_step_" + k: v for k, v in step_fns.items()}))
          scalars.update(_compiles({"token_logps": logps_fn, "prefill": sampling._prefill,  # pylint: disable=protected-access
                                    "decode": sampling._decode}))  # pylint: disable=protected-access
          memory = metrics_lib.memory_scalars()
          scalars.update(memory)
          if not logged_memory:
            logged_memory = True
            logging.info("memory after step %d: %s", step, ", ".join(
                f"{k.split('/')[1]} {v:.2f} GiB" for k, v in memory.items()))
          # A skipped (non-finite) update is logged as such; anything else non-finite stops the run.
          writer.write(step, scalars, nonfinite_ok=tuple(k for k in scalars if k.startswith(
              "train/")) if step_metrics["skipped"] else ())
          bar.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                          reward=f"{roll_metrics.get('reward/total', 0.0):.3f}")
        if metrics_lib.every(step, config.rollout_log_every_steps):
          writer.write_samples(step, samples)
        if (metrics_lib.every(step, config.ckpt_every_steps) or step == config.total_steps
            or guard.requested):
          ckpt.save(step, state, train_iter)
        if guard.requested:
          logging.warning("signal %s: saved step %d, exiting", guard.signum, step)
          break
        if metrics_lib.every(step, config.eval.every_steps):
          with writer.timed("eval"):
            scores = evaluate.run(
                abstract_model, tokenizer, data_dir=eval_dir, protocol=config.eval.protocol,
                max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                params=tree_utils.to_state(state["params"], paths), mesh=mesh,
                workdir=os.path.join(workdir, "eval", f"step_{step}"),
                video_kwargs=config.eval.video.to_dict() or None,
                max_items=config.eval.max_items, progress=False)
          writer.write(step, {**evaluate.scalars(scores, prefix="eval/"), **writer.pop_timers()})
    bar.close()
    ckpt.close()
    writer.close()
    if demo and not guard.requested:
      demo.finish(config, workdir)
    if config.export_hf_subdir and not guard.requested:
      out = os.path.join(workdir, config.export_hf_subdir)
      qwen2_5_vl.save_hf(tree_utils.merge_model(graphdef, state["params"], paths), out)
      tokenizer.backend.save(os.path.join(out, "tokenizer.json"))
  logging.info("done: %s", workdir)


if __name__ == "__main__":
  app.run(main)
