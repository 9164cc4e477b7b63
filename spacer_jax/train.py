"""SG-RLVR / GRPO / SFT trainer: `python -m spacer_jax.train --config=configs/sgrlvr.py --workdir=DIR`.

`train_and_evaluate(config, workdir)` is the whole run, importable from notebooks and tests; `main`
only parses the flags, calls it, then runs `config.post_train` if the config names one (the demo's
held-out evaluation). A run, top to bottom in `train_and_evaluate`: workdir record, mesh, tokenizer,
abstract model (spacer_jax/modeling.py), optimizer and state shardings (`make_train_setup`), data,
restore or init (the initial weights come from `modeling.load_params`: the HF checkpoint, or random
init for the tiny model), jitted functions, the loop. The pure functions at module level are what gets
jitted:

  train_step(state, batch, ref_logps) -> (state, metrics)   donates state; explicit shardings.
      Vision tower + prompt embedding once per prompt (a jax.vjp, so its backward also runs once),
      then a lax.scan over micro-batches of completion rows (gradient accumulation inside the step);
      each row gathers its prompt's embeddings, the LM forward gives per-token log-probs, the loss is
      grpo.compute_loss (GRPO) or token cross-entropy (SFT). The accumulated embedding cotangent goes
      through the vision vjp once. AdamW update; non-finite gradients skip the update and are logged.
  token_logps(params, batch) -> float32[R, Tc]               reference (beta > 0) / old-policy log-probs.

Rollouts use sampling.py's jitted prefill/decode on the same weights (rollout.py is the host glue).

Multi-process jobs (one process per host or per GPU; spacer_jax/distributed.py): `main` joins the
job from --coordinator_address/--num_processes/--process_id or the cluster's environment. Every
process runs this same loop: it reads its block of each global batch, the jitted functions span the
global mesh, and every logged value is global; process 0 writes the workdir's files, orbax writes
the checkpoint from all processes, and a SIGTERM on any of them stops all after one common step
(checkpoint.Preemption).

State: {"step": int32, "params": {hf_key: array}, "opt_state": optax state of the trainable subset,
"rng": uint32[2]}. Parameters are stored in `config.model.param_dtype` (float32 master weights) and
the model computes in `config.model.dtype` (bfloat16 on accelerators); Adam moments are float32.
"""

import dataclasses
import functools
import importlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from spacer_jax import checkpoint, cli, config_lib, distributed, grpo, lora
from spacer_jax import metrics as metrics_lib, modeling, optim, rollout, sampling, sharding, tree_utils
from spacer_jax.models import layers, qwen2_5_vl

_DROPOUT_STREAM = 0x4C6F5241  # "LoRA": folded into the step key for LoRA dropout masks

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


def _in_iteration(weights, mb, num_micro):
  """(weights, mb) as one micro-batch iteration sees them (as given with one micro-batch, where
  there is no loop): an optimization barrier ties the weights
  to the iteration's rows, so XLA cannot hoist their FSDP all-gathers out of the micro-batch loop as
  loop-invariant code, where gathered weights of many layers would be live at once during the loop.
  Measured with the TPU compiler (python -m spacer_jax.plan, 7B with LoRA on a v5e-8, 4
  micro-batches): the reference log-probs need more than 15.76 GiB per chip without the barrier (the
  16 GB chip rejects them) and 14.44 GiB with it. An identity for the values and their gradients."""
  return jax.lax.optimization_barrier((weights, mb)) if num_micro > 1 else (weights, mb)


def token_logps(params, batch, *, graphdef, paths, num_micro=1):
  """Per-token log-probs of the completions under `params` (no gradient): float32[R, Tc]."""
  pe = _prompt_embeds(tree_utils.merge_model(graphdef, params, paths), batch)

  def body(_, mb):
    # The model is merged inside the scan body: nnx.remat (use_remat) cannot split a module whose
    # Variables belong to the enclosing trace.
    p, mb = _in_iteration(params, mb, num_micro)
    model = tree_utils.merge_model(graphdef, p, paths)
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

  # LoRA dropout (a no-op without adapters or at rate 0): one key per step, one per micro-batch;
  # a stream of its own (rollouts use fold_in(rng, step)).
  dropout_key = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), _DROPOUT_STREAM)

  def embed_fn(tr):
    return _prompt_embeds(tree_utils.merge_model(graphdef, {**tr, **frozen}, paths), batch)

  # Vision + prompt embeddings once per prompt; its backward runs once, on the summed cotangent.
  with layers.lora_dropout(jax.random.fold_in(dropout_key, num_micro)):
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

  def body(carry, xs):
    i, mb = xs
    g_acc, pe_acc, m_acc = carry
    (tr, fr), mb = _in_iteration((trainable, frozen), mb, num_micro)
    with layers.lora_dropout(jax.random.fold_in(dropout_key, i)):
      (_, m), (g, g_pe) = grad_fn(tr, fr, pe, mb)
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
  (g_sum, pe_sum, m_sum), _ = jax.lax.scan(body, init, (jnp.arange(num_micro), rows))
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
# The pieces of a run (host code; `train_and_evaluate` calls them in order, the planner reuses them).
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phases:
  """How a run's steps split into SFT and GRPO, and GRPO's group settings."""
  mode: str  # "grpo" | "sft"
  total_steps: int
  sft_steps: int  # steps 1..sft_steps are SFT
  num_generations: int  # G
  num_iterations: int  # mu: optimizer steps per GRPO batch

  @property
  def rl_steps(self):
    return self.total_steps - self.sft_steps

  def phase(self, step):
    return "sft" if step <= self.sft_steps else "grpo"

  @property
  def decay_steps(self):
    """Optimizer updates the schedule spans: one per SFT step, mu per GRPO step."""
    return self.sft_steps + self.rl_steps * self.num_iterations


def make_phases(config):
  mode = config.mode
  if mode not in ("grpo", "sft"):
    raise ValueError(f"config.mode must be grpo|sft, got {mode!r}")
  sft_steps = config.total_steps if mode == "sft" else int(config.sft_warmup_steps)
  return Phases(mode=mode, total_steps=int(config.total_steps), sft_steps=sft_steps,
                num_generations=int(config.grpo.num_generations),
                num_iterations=int(config.grpo.num_iterations))




def model_source(config):
  """What `modeling.load_params` reads the initial weights from: the HF checkpoint, or random init
  for the tiny model."""
  return modeling.RANDOM if config.model.variant else config.model.hf_dir


def make_tokenizer(config, workdir):
  """The run's tokenizer, also saved as {workdir}/tokenizer so the workdir is self-contained
  (evaluate, generate and convert read it from there). In a multi-process job process 0 writes the
  files, then the others read them."""
  from spacer_jax.data import tokenizer as tokenizer_lib  # Host-only dependency (tokenizers).
  out = os.path.join(workdir, modeling.RUN_TOKENIZER_DIR)

  def make():
    if config.model.variant:
      # Tiny/smoke/demo runs use the project's offline BPE (deterministic), built once per workdir.
      src = config.data.tokenizer_dir or out
      if os.path.exists(os.path.join(src, "tokenizer.json")):
        return tokenizer_lib.load_tokenizer(src)
      return tokenizer_lib.build_offline_tokenizer(out_dir=src)
    src = modeling.tokenizer_dir(config.model.hf_dir, config.data.tokenizer_dir)
    tokenizer = tokenizer_lib.load_tokenizer(src)
    if distributed.is_primary():
      tokenizer_lib.copy_tokenizer_files(src, out)
    return tokenizer

  return distributed.primary_first(make)


def make_model_config(config, tokenizer):
  """The architecture: `qwen2_5_vl.tiny` (ids from the tokenizer) or the checkpoint's config.json.

  tokenizer=None (the planner, which needs no weights or tokenizer files on its host): no tokenizer
  check, and without a config.json in config.model.hf_dir the published Qwen2.5-VL of the size the
  directory names (modeling.published_config).
  """
  common = dict(use_remat=bool(config.model.use_remat), scan_layers=bool(config.model.scan_layers),
                vision_patch_groups=bool(config.model.vision_patch_groups),
                text_after_vision=config.model.text_after_vision)
  if config.model.variant == "tiny":
    ids = tokenizer.special_ids()
    eos = ids.pop("eos_token_id")
    return qwen2_5_vl.tiny(**ids, eos_token_id=(eos,), **common,
                           **config.model.tiny_overrides.to_dict())
  if config.model.variant:
    raise ValueError(f"config.model.variant must be '' or 'tiny', got {config.model.variant!r}")
  if tokenizer is None:
    if not os.path.isfile(os.path.join(config.model.hf_dir, "config.json")):
      return modeling.published_config(config.model.hf_dir, **common)
    return modeling.model_config(config.model.hf_dir, **common)
  cfg = modeling.model_config(config.model.hf_dir, **common)
  modeling.check_tokenizer(tokenizer, cfg, where="config.data.tokenizer_dir / config.model.hf_dir")
  return cfg


def make_abstract_model(config, tokenizer, mesh):
  """modeling.AbstractModel of the policy on `mesh`, in config.model.{dtype, param_dtype}."""
  return modeling.abstract_model(
      make_model_config(config, tokenizer), dtype=config.model.dtype,
      param_dtype=config.model.param_dtype, mesh=mesh, rules=config_lib.sharding_rules(config))


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The trained model, its optimizer, the train state's abstract value and the reference policy.

  state = {"step": int32, "params": {hf_key: array}, "opt_state": optax state of the trainable
  params, "rng": uint32[2]}.

  The reference policy (GRPO's KL term, only when beta > 0) is the initial model: `reference` is its
  graph (the base model without LoRA adapters), the parameters the optimizer never changes are read
  from the policy's own state (`ref_shared_keys`, no copy: with LoRA, the whole frozen base), and
  only the trained base parameters are loaded once more (`ref_loaded_keys`, in
  config.model.ref_param_dtype: without LoRA, every unfrozen parameter).
  """
  abstract: Any  # modeling.AbstractModel of the policy (with its LoRA adapters, if any)
  tx: Any
  schedule: Any
  trainable_keys: tuple
  abstract_state: Any  # pytree of ShapeDtypeStruct with shardings
  state_shardings: Any
  reference: Any = None  # modeling.AbstractModel of the reference (None without one)
  ref_shared_keys: tuple = ()
  ref_loaded_keys: tuple = ()

  def ref_params(self, params, loaded):
    """The reference policy's params: shared entries of the policy's `params` + `loaded`."""
    return {**{k: params[k] for k in self.ref_shared_keys}, **loaded}


def make_train_setup(config, abstract, phases):
  """LoRA adapters (config.lora.rank > 0), the optimizer over the trainable parameters (regex
  freeze, schedule over every update), the sharded abstract train state and the reference policy.

  Args:
    config: the run config.
    abstract: modeling.AbstractModel of the base model (`make_abstract_model`).
    phases: `make_phases(config)`.
  """
  freeze = tuple(config.optim.freeze) + ((r"^visual\.",) if config.model.freeze_vision else ())
  lora_config = config_lib.make_lora_config(config)
  if lora_config is not None:
    abstract = modeling.with_lora(abstract, lora_config)
    candidates = lora.trainable_keys(abstract.params, lora_config)
  else:
    candidates = list(abstract.params)
  trainable_keys = tuple(optim.trainable_keys(candidates, freeze))
  if not trainable_keys:
    raise ValueError("nothing to train: config.optim.freeze / model.freeze_vision freeze every "
                     "trainable parameter" + (" (LoRA adapters included)" if lora_config else ""))
  trainable = {k: abstract.params[k] for k in trainable_keys}
  tx, schedule = optim.make_optimizer(
      trainable, lr=config.optim.lr, total_steps=config.optim.decay_steps or phases.decay_steps,
      schedule=config.optim.schedule, warmup_steps=config.optim.warmup_steps, wd=config.optim.wd,
      b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
      grad_clip=config.optim.grad_clip,
      # optim.rl_lr > 0 restarts the schedule at the first GRPO step: the SFT warm-up and RL each
      # get their own decay.
      restart_step=phases.sft_steps if phases.rl_steps else 0, restart_lr=config.optim.rl_lr)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  repl = sharding.replicated(abstract.mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, {k: abstract.shardings[k] for k in trainable_keys},
      transform_non_params=lambda _: repl)
  state_shardings = {"step": repl, "params": abstract.shardings, "opt_state": opt_shardings,
                     "rng": repl}
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract.params,
       "opt_state": abstract_opt, "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))},
      state_shardings)
  reference, shared, loaded = None, (), ()
  if phases.rl_steps > 0 and config.grpo.beta > 0:
    reference = abstract.base.with_param_dtype(config.model.ref_param_dtype)
    shared = tuple(k for k in reference.params if k not in trainable)
    loaded = tuple(k for k in reference.params if k in trainable)
  return TrainSetup(abstract=abstract, tx=tx, schedule=schedule, trainable_keys=trainable_keys,
                    abstract_state=abstract_state, state_shardings=state_shardings,
                    reference=reference, ref_shared_keys=shared, ref_loaded_keys=loaded)


def init_state(params, setup, seed):
  """A fresh train state around `params` (already on their shardings)."""
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(
      {k: params[k] for k in setup.trainable_keys})
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
          "rng": jax.random.PRNGKey(seed)}


def batch_shardings(tb, mesh, rules):
  """Shardings of a TrainBatch: per-row and per-prompt arrays and the pixel rows over the batch
  axes (where they divide; the sampler lays the pixels out the same way, so in a multi-process job
  each process's pixels stay on its devices, and with vision patch groups each device holds its
  own group's), the vision index arrays with a patch-group axis over the batch axes too, the other
  vision index arrays replicated (the vision tower constrains its own activations). Works on
  arrays and on ShapeDtypeStructs."""
  batched = ROW_KEYS + ("prompt_ids", "prompt_mask", "pixel_values", "pixel_values_videos")
  repl = sharding.replicated(mesh)
  out = {}
  for k, v in tb.items():
    if k in ("image_vis", "video_vis"):
      grouped = qwen2_5_vl.grouped_vision_keys(v)
      out[k] = {name: sharding.batch_sharding(mesh, rules, np.shape(a)) if name in grouped
                else repl for name, a in v.items()}
    else:
      out[k] = (sharding.batch_shardings(v, mesh, rules) if k in batched
                else jax.tree.map(lambda _: repl, v))
  return out


def hbm_budget_options(budget_bytes):
  """XLA:TPU compile options that make the compiler plan a program within `budget_bytes` per chip.

  The TPU compiler plans against the chip's whole HBM and, when memory is free, spends it for
  speed (measured by `python -m spacer_jax.plan`: the 32B train step took 75.6 GiB of temporaries
  when the whole v5p chip was offered). Buffers that stay resident beside a function's arguments
  (the reference weights during train_step, the optimizer state during the log-prob passes) are
  invisible to it, so the trainer and the planner compile with the chip's HBM less them.
  """
  return {"xla_tpu_max_hbm_size_mib": str(max(int(budget_bytes // 2 ** 20), 1))}


def resident_bytes(setup, state, ref_loaded):
  """Bytes per device that stay resident through a step beside each jitted function's arguments.

  Works on live arrays (the trainer) and on ShapeDtypeStructs with shardings (the planner), so
  both compile every function within the same budget (`tpu_budget_options`).

  Returns a dict: `state` (params + optimizer state), `optimizer`, `ref_params` (the reference's
  own copy of the trained params, `ref_loaded`) and, per function, what stays beside it:
  `train_step` (the reference copy), `policy_passes` (the sampler and the old log-probs, called on
  the policy params: the optimizer state and the reference copy), `ref_logps` (called on the
  reference params: the state less the frozen params the reference shares with the policy).
  """
  state_b = tree_utils.bytes_per_device(state)
  opt_b = state_b - tree_utils.bytes_per_device(state["params"])
  ref_b = tree_utils.bytes_per_device(ref_loaded)
  shared_b = tree_utils.bytes_per_device({k: state["params"][k] for k in setup.ref_shared_keys})
  return dict(state=state_b, optimizer=opt_b, ref_params=ref_b, train_step=ref_b,
              policy_passes=opt_b + ref_b, ref_logps=state_b - shared_b)


def tpu_budget_options(resident_bytes):
  """`hbm_budget_options` for this process's TPU (its usable HBM less `resident_bytes` per chip),
  None on other backends (their compilers take no such option)."""
  device = jax.local_devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform == "tpu" else None
  return hbm_budget_options(limit - resident_bytes) if limit else None


def make_train_step(abstract, setup, *, mode, grpo_config, num_micro, batch_shardings_,
                    ref_shardings, compiler_options=None):
  """The jitted, state-donating train_step of one phase with explicit in/out shardings.

  compiler_options: e.g. `tpu_budget_options(reference bytes per chip)`."""
  return jax.jit(
      functools.partial(train_step, graphdef=abstract.graphdef, paths=abstract.paths, tx=setup.tx,
                        trainable_keys=setup.trainable_keys, mode=mode, grpo_config=grpo_config,
                        num_micro=num_micro),
      in_shardings=(setup.state_shardings, batch_shardings_, ref_shardings),
      out_shardings=(setup.state_shardings, sharding.replicated(abstract.mesh)),
      donate_argnums=(0,), compiler_options=compiler_options)


def make_logps_fn(abstract, num_micro, compiler_options=None):
  """The jitted `token_logps` (reference and old-policy log-probs)."""
  return jax.jit(functools.partial(token_logps, graphdef=abstract.graphdef, paths=abstract.paths,
                                   num_micro=num_micro), compiler_options=compiler_options)


def load_records(config, workdir):
  """Training records (sources.Record list) and their load-time BadRecords; generates the synthetic
  dataset on first use."""
  from spacer_jax.data import sources
  if config.data.source == "synthetic":
    from spacer_jax.data import synthetic
    paths = synthetic.generate_dataset(synthetic_root(config, workdir), synthetic.SyntheticConfig.demo(
        **config.data.synthetic.to_dict()), progress=False)
    annotations, media_root, maps = paths.train_jsonl, paths.root, paths.cognitive_map
  else:
    annotations, media_root = config.data.annotations, config.data.media_root
    maps = config.data.cognitive_maps or None
  bad = sources.BadRecords(strict=not config.data.skip_bad_records)
  records = sources.load_spacer(annotations, media_root=media_root, cognitive_map_path=maps, bad=bad,
                                allow_media_outside_root=config.data.allow_media_outside_root)
  if not config.data.use_cogmap_prompt:
    # Plain GRPO: every record gets the QUESTION_TEMPLATE prompt (no map instructions).
    records = sources.without_map_prompt(records)
  if not records:
    raise ValueError(f"no usable records in {annotations} (skipped: {dict(bad.counts)})")
  return records, bad


def synthetic_root(config, workdir):
  """Where a synthetic run's dataset lives (config.data.synthetic_root, default {workdir}/data/synthetic)."""
  return config.data.synthetic_root or os.path.join(workdir, "data", "synthetic")


def _eval_data_dir(config, workdir):
  """config.eval.data_dir, or the synthetic held-out split (VSI-Bench format) of a synthetic run."""
  if config.eval.data_dir or not config.eval.every_steps:
    return config.eval.data_dir
  from spacer_jax.data import synthetic  # Synthetic data (config_lib.validate checks the rest).
  return synthetic.dataset_paths(synthetic_root(config, workdir)).eval_root


def _rollout(phase, step, *, state, batch, sampler, abstract, tokenizer, config, phases,
             reward_config, grpo_config):
  """One step's TrainBatch: the SFT targets, or G sampled and scored completions per prompt."""
  if phase == "sft":
    return rollout.sft_batch(sampler, batch, tokenizer=tokenizer,
                             max_new_tokens=config.sampling.max_new_tokens,
                             target=config.sft_target)
  return rollout.run(
      sampler, abstract.state(state["params"]), batch, tokenizer=tokenizer,
      num_generations=phases.num_generations, max_new_tokens=config.sampling.max_new_tokens,
      rng=jax.random.fold_in(state["rng"], step), reward_config=reward_config,
      use_temporal=phases.rl_steps > 0 and bool(config.rewards.use_temporal),
      use_map=bool(config.rewards.use_map), reward_scaling=grpo_config.reward_scaling,
      adv_eps=grpo_config.adv_eps)


def _update(phase, state, tb, *, get_step, logps_fn, ref_logps_fn, phases):
  """The optimizer step(s) of one batch: reference/old-policy log-probs, then mu updates.

  ref_logps_fn(params, tb): the reference policy's log-probs given the policy's params, or None.
  """
  ref = (ref_logps_fn(state["params"], tb) if phase == "grpo" and ref_logps_fn is not None
         else None)
  if phase == "grpo" and phases.num_iterations > 1:
    tb["old_logps"] = logps_fn(state["params"], tb)
  step_fn = get_step(phase, tb, ref)
  with jax.transfer_guard("disallow"):
    for _ in range(phases.num_iterations if phase == "grpo" else 1):
      state, metrics = step_fn(state, tb, ref)
  return state, jax.device_get(metrics)


def _step_scalars(step, phase, *, step_metrics, roll_metrics, timers, train_tokens, setup, phases,
                  compiled, bad, batch, wall):
  """Everything one logged step writes to metrics.jsonl / TensorBoard."""
  mu = phases.num_iterations if phase == "grpo" else 1
  updates_before = min(step - 1, phases.sft_steps) + max(step - 1 - phases.sft_steps, 0) * \
      phases.num_iterations
  # Process-local values (each process's skipped records, its devices' memory) over all processes.
  local = distributed.allgather_objects((batch.get("bad_records", {}), metrics_lib.memory_scalars()))
  bad_in_batches = {k: sum(p[0].get(k, 0) for p in local) for k in sorted({k for p in local
                                                                           for k in p[0]})}
  memory = {k: max(p[1][k] for p in local if k in p[1]) for k in local[0][1]}
  scalars = {**{f"train/{k}": v for k, v in step_metrics.items()}, **roll_metrics, **timers,
             "train/lr": float(setup.schedule(updates_before)), "train/updates_per_step": mu,
             "phase_sft": float(phase == "sft"), **bad.metrics("data/bad_records_at_load"),
             **bad_in_batches, "time/step_s": wall}
  if "rollout/tokens" in roll_metrics:
    scalars["rollout/tokens_per_s"] = roll_metrics["rollout/tokens"] / max(
        timers.get("time/rollout_s", wall), 1e-9)
  scalars["train/tokens_per_s"] = train_tokens / max(timers.get("time/train_s", wall), 1e-9)
  scalars.update({f"compiles/{k}": v for k, v in compiled.items()})
  scalars.update(memory)
  return scalars


# ------------------------------------------------------------------------------------------------
# train_and_evaluate
# ------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir):
  """Trains as `config` says in `workdir`, resuming from its last checkpoint; returns the final state.

  The workdir gets config.json, git_commit.txt, model_config.json, tokenizer/, metrics.jsonl,
  rollouts.jsonl, TensorBoard events and ckpt/ (see the README).
  """
  from spacer_jax import evaluate  # Imported here: it pulls in the video decoder.
  from spacer_jax.data import pipeline

  # == Workdir record ===========================================================================
  workdir = os.path.abspath(workdir)  # orbax needs absolute paths; a relative --workdir is common.
  # Every problem of the config (values, combinations, missing paths) at once, before any work.
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  if not config.model.variant:
    modeling.model_config(config.model.hf_dir)  # a checkpoint of the right architecture
  if config.jax_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.jax_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # Multi-process jobs (spacer_jax/distributed.py): process 0 writes every file of the workdir
  # (orbax writes each process's shards of the checkpoint); all values logged are global.
  primary = distributed.is_primary()
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
    with open(os.path.join(workdir, "git_commit.txt"), "w") as f:
      f.write(metrics_lib.git_commit() + "\n")
  phases = make_phases(config)
  grpo_config = config_lib.make_grpo_config(config)
  reward_config = config_lib.make_reward_config(config)

  # == Mesh, tokenizer, model ===================================================================
  mesh = sharding.make_mesh(config.mesh)
  rules = config_lib.sharding_rules(config)
  logging.info("mesh %s on %s (%d processes)", dict(mesh.shape), jax.devices()[0].platform,
               jax.process_count())
  tokenizer = make_tokenizer(config, workdir)
  setup = make_train_setup(config, make_abstract_model(config, tokenizer, mesh), phases)
  abstract = setup.abstract  # the policy, with its LoRA adapters if any
  if primary:
    with open(os.path.join(workdir, modeling.RUN_MODEL_CONFIG), "w") as f:
      json.dump(abstract.config.to_hf_dict(), f, indent=2)
    if abstract.lora is not None:
      with open(os.path.join(workdir, modeling.RUN_LORA_CONFIG), "w") as f:
        json.dump(abstract.lora.to_dict(), f, indent=2)
    with open(os.path.join(workdir, "params.txt"), "w") as f:
      f.write(abstract.describe() + "\n")
  logging.info("%s parameters (%d tensors; shapes, logical axes and shardings in %s), %s trained",
               f"{abstract.param_count:,}", len(abstract.params), os.path.join(workdir, "params.txt"),
               f"{tree_utils.param_count({k: abstract.params[k] for k in setup.trainable_keys}):,}")
  source = model_source(config)
  adapter = config.lora.adapter_dir or None

  # Parameter and batch shardings are explicit (abstract.shardings / batch_shardings). Activation
  # constraints inside the model (layers.constrain) resolve with the same rules through
  # sharding.logical_to_spec; they are active where the jitted functions are traced, in the loop
  # (under nnx.logical_axis_rules), and not while models are built (flax would shard them eagerly).
  with jax.set_mesh(mesh):
    # == Data ===================================================================================
    records, bad = load_records(config, workdir)
    logging.info("%d training records (%d skipped at load: %s)", len(records), bad.total,
                 dict(bad.counts))
    records_by_id = {r.id: r for r in records}  # rollout metrics look up each prompt's record
    eval_dir = _eval_data_dir(config, workdir)
    train_iter = pipeline.make_iterator(
        records, tokenizer, config_lib.make_data_config(
            config, phases.rl_steps > 0 and bool(config.rewards.use_temporal),
            jax.process_count()), seed=config.seed)

    # == Restore or init (resume order: checkpoint.restore_or_init) ==============================
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, modeling.RUN_CKPT_DIR),
                                   max_to_keep=config.keep_ckpts)
    state, origin = checkpoint.restore_or_init(
        ckpt, setup.abstract_state,
        lambda: init_state(modeling.load_params(source, abstract, seed=config.seed,
                                                adapter=adapter), setup, config.seed),
        train_iter, resume_dir=config.resume, strict=config.resume_strict)
    start = int(state["step"]) + 1
    logging.info(_start_message(origin, start - 1, phases.total_steps, config, source))
    # The reference policy is the initial model: its frozen parameters are the policy's own (with
    # LoRA, the whole base), the trained ones are reloaded from the source (never checkpointed).
    ref_loaded = (modeling.load_params(source, setup.reference, seed=config.seed,
                                       keys=setup.ref_loaded_keys)
                  if setup.ref_loaded_keys else {})

    # == Jitted functions =========================================================================
    sampler = sampling.Sampler(
        abstract.merge(), temperature=config.sampling.temperature, top_k=config.sampling.top_k,
        top_p=config.sampling.top_p, mesh=mesh, cache_dtype=abstract.dtype, vision_budget="auto",
        stop_ids=(tokenizer.eos_token_id, tokenizer.pad_token_id))
    num_micro = int(config.grad_accum_steps)
    step_fns = {}
    # On TPU each function is compiled within the HBM the step leaves it (hbm_budget_options):
    # what stays resident beside its arguments, per chip, as the planner counts it.
    resident = resident_bytes(setup, state, ref_loaded)

    def get_step(phase, tb, ref):
      # Built at the first batch of each phase: the batch shardings come from its (static) shapes.
      if phase not in step_fns:
        shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
        step_fns[phase] = make_train_step(
            abstract, setup, mode=phase, grpo_config=grpo_config, num_micro=num_micro,
            batch_shardings_=shard_of(tb), ref_shardings=shard_of(ref),
            compiler_options=tpu_budget_options(resident["train_step"]))
      return step_fns[phase]

    logps_fn = make_logps_fn(abstract, num_micro, tpu_budget_options(resident["policy_passes"]))
    ref_fn = None if setup.reference is None else make_logps_fn(
        setup.reference, num_micro, tpu_budget_options(resident["ref_logps"]))

    def ref_logps_fn(params, tb):
      return ref_fn(setup.ref_params(params, ref_loaded), tb)

    def compiled():
      counts = {**{f"train_step_{k}": int(v._cache_size()) for k, v in step_fns.items()},  # pylint: disable=protected-access
                "token_logps": int(logps_fn._cache_size()), **sampling.compile_counts()}  # pylint: disable=protected-access
      if ref_fn is not None:
        counts["token_logps_ref"] = int(ref_fn._cache_size())  # pylint: disable=protected-access
      return counts

    # == Loop =====================================================================================
    writer = metrics_lib.MetricWriter(
        workdir, start_step=start, use_tensorboard=config.use_tensorboard, active=primary,
        wandb=config.wandb.to_dict() if config.get("wandb") else None, config=config.to_dict())
    bar = metrics_lib.progress(start, config.total_steps,
                               disable=not (config.use_progress_bar and primary))
    skipped_in_row = 0
    with checkpoint.Preemption(ckpt) as preemption, nnx.logical_axis_rules(rules):
      for step in range(start, phases.total_steps + 1):
        phase, t0 = phases.phase(step), time.perf_counter()
        with writer.timed("data"):
          batch = next(train_iter)
        with writer.timed("rollout"):
          tb, roll_metrics, samples = _rollout(
              phase, step, state=state, batch=batch, sampler=sampler, abstract=abstract,
              tokenizer=tokenizer, config=config, phases=phases, reward_config=reward_config,
              grpo_config=grpo_config)
        tb.pop("sampler_logps")
        train_tokens = float(np.sum(tb["completion_mask"]))  # host: tb is the global batch
        tb = jax.device_put(tb, batch_shardings(tb, mesh, rules))
        with writer.timed("train"):
          state, step_metrics = _update(
              phase, state, tb, get_step=get_step, logps_fn=logps_fn,
              ref_logps_fn=None if ref_fn is None else ref_logps_fn, phases=phases)
        skipped_in_row = skipped_in_row + 1 if step_metrics["skipped"] else 0
        if skipped_in_row > config.max_skipped_steps:
          raise FloatingPointError(f"{skipped_in_row} steps in a row (up to step {step}) had "
                                   f"non-finite gradients; see {writer.metrics_path}")
        bar.update(1)
        if metrics_lib.every(step, config.log_every_steps) or step == phases.total_steps:
          scalars = _step_scalars(
              step, phase, step_metrics=step_metrics, roll_metrics=roll_metrics,
              timers=writer.pop_timers(), train_tokens=train_tokens, setup=setup, phases=phases,
              compiled=compiled(),
              bad=bad, batch=batch, wall=time.perf_counter() - t0)
          if phase == "grpo":  # VSI-Bench task scores of the rollouts (VSI-style questions)
            scalars.update(evaluate.vsibench.rollout_task_scores(samples, records_by_id))
          if step == start:
            bar.clear()  # the log line on a line of its own, not inside the progress bar's
            logging.info("memory after step %d: %s", step, ", ".join(
                f"{k.split('/')[1]} {v:.2f} GiB" for k, v in scalars.items()
                if k.startswith("memory/")))
            bar.refresh()
          # A skipped (non-finite) update is logged as such; anything else non-finite stops the run.
          writer.write(step, scalars, nonfinite_ok=tuple(k for k in scalars if k.startswith(
              "train/")) if step_metrics["skipped"] else ())
          bar.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                          reward=f"{roll_metrics.get('reward/total', 0.0):.3f}")
        if metrics_lib.every(step, config.rollout_log_every_steps):
          writer.write_samples(step, samples)
        stop = preemption.reached(step)  # the same step on every process
        if (metrics_lib.every(step, config.ckpt_every_steps) or step == phases.total_steps
            or stop):
          ckpt.save(step, state, train_iter)
        if stop:
          logging.warning("preemption notice (%s): saved step %d, exiting",
                          f"signal {preemption.signum}" if preemption.signum else "another process",
                          step)
          break
        if metrics_lib.every(step, config.eval.every_steps):
          with writer.timed("eval"):
            scores = evaluate.run(
                abstract.merge(), tokenizer, data_dir=eval_dir, benchmark=config.eval.benchmark,
                protocol=config.eval.protocol, aggregation=config.eval.aggregation,
                image_kwargs=config.eval.image.to_dict() or None,
                max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                params=abstract.state(state["params"]), mesh=mesh,
                workdir=os.path.join(workdir, "eval", f"step_{step}"),
                video_kwargs=config.eval.video.to_dict() or None,
                max_items=config.eval.max_items, progress=False)
          writer.write(step, {**evaluate.scalars(scores, prefix="eval/"), **writer.pop_timers()})
    bar.close()
    ckpt.close()
    writer.close()
  export_peft = abstract.lora is not None and bool(config.lora.export_subdir)
  wants_export = not preemption.requested and (config.export_hf_subdir or export_peft)
  if wants_export and jax.process_count() > 1:
    # The exports read the whole model on one host; in a multi-process job every process would have
    # to take part. The checkpoint is complete: export it afterwards on any one host.
    logging.warning("config.export_hf_subdir / lora.export_subdir: multi-process run, not exported; "
                    "run `python -m spacer_jax.convert --workdir=%s --out=DIR` on one host", workdir)
  elif wants_export:
    if config.export_hf_subdir:
      # Through the converter, which reads a LoRA run with its adapters merged into the base weights.
      from spacer_jax import convert  # pylint: disable=g-import-not-at-top
      convert.export_hf(workdir, os.path.join(workdir, config.export_hf_subdir))
    if export_peft:
      lora.save_peft(state["params"], abstract, os.path.join(workdir, config.lora.export_subdir),
                     base_model_name_or_path=config.model.hf_dir or None)
  logging.info("done: %s", workdir)
  return state, preemption.requested


def _start_message(origin, step, total_steps, config, source):
  """One line: where the state came from and which steps this process trains."""
  where = {"workdir": f"resumed from this workdir's checkpoint at step {step}",
           "resume": f"state of step {step} from config.resume={config.resume}",
           "init": "initial weights from " + ("random init" if source == modeling.RANDOM
                                              else str(source))}[origin]
  if step >= total_steps:
    return (f"{where}: nothing to train (total_steps={total_steps}; raise "
            f"--config.total_steps to continue)")
  return f"{where}; training steps {step + 1}..{total_steps}"


def run_post_train(config, workdir):
  """Calls `config.post_train` ("module:function", e.g. the demo's "spacer_jax.demo:finish") with
  (config, workdir); the trainer itself knows nothing about what it does."""
  module, _, name = config.post_train.partition(":")
  if not module or not name:
    raise ValueError(f"config.post_train={config.post_train!r}: expected 'module:function'")
  return getattr(importlib.import_module(module), name)(config, os.path.abspath(workdir))


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required")
  distributed.initialize_from_flags()
  if config.get("post_train") and jax.process_count() > 1:
    raise app.UsageError(f"config.post_train={config.post_train!r} (e.g. the demo's held-out "
                         "evaluation) runs in single-process jobs only")
  try:
    _, interrupted = train_and_evaluate(config, workdir)
  except config_lib.ConfigError as e:  # every problem in one message, without a traceback
    raise SystemExit(f"error: {e}") from None
  if config.get("post_train") and not interrupted:
    run_post_train(config, workdir)


def define_flags(fv=flags.FLAGS):
  """--config and --workdir; defined only when run as a program, so other modules (the demo, the
  planner, tests) import this one without defining them twice."""
  config_flags.DEFINE_config_file("config", None, "Training config: a file (configs/sgrlvr.py[:args], "
                                  "packaged configs are found from any directory) or a short name "
                                  "(sgrlvr:smoke).", lock_config=True, flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); rerun to resume.",
                      flag_values=fv)
  distributed.define_flags(fv)


if __name__ == "__main__":
  cli.run(main, define_flags, __doc__)
