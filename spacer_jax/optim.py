"""Optimizer: optax AdamW + global-norm clipping + cosine schedule, with a regex freeze mask.

Defaults reproduce the SpaceR run (docs/spacer_recipe.md, "Hyper-parameters"; HF Trainer
`adamw_torch`): lr 1e-6 with cosine decay to 0 and no warmup (lr(s) = lr * 0.5 * (1 + cos(pi * s /
S))), betas (0.9, 0.999), eps 1e-8, decoupled weight decay 0.01 that skips biases and norm weights by name (the HF Trainer's
`get_decay_parameter_names` patterns), and global grad-norm clipping at 5.0.

Frozen parameters (regexes such as r"^visual\\.") are removed from the optimizer entirely: the train
step differentiates only the trainable subset, so a frozen vision tower costs no gradient memory and
no optimizer state. Optimizer state is float32 whatever the parameter dtype.
"""

import re

import jax.numpy as jnp
import optax

# HF Trainer (transformers >= 4.48) excludes these names from weight decay. Note that `norm1`, `norm2`
# and `merger.ln_q` of the vision tower do not match, so HF decays them; we reproduce that.
HF_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def make_schedule(lr, total_steps, schedule="cosine", warmup_steps=0, end_lr=0.0, *, restart_step=0,
                  restart_lr=0.0):
  """Learning-rate schedule (step -> lr).

  Args:
    lr: peak learning rate.
    total_steps: S, the number of optimizer steps the decay spans (>= 1).
    schedule: "cosine" (HF get_cosine_schedule_with_warmup), "linear" (HF default scheduler, used by
      the SFT baseline) or "constant".
    warmup_steps: linear warmup from 0 (SpaceR: 0).
    end_lr: final value.
    restart_step, restart_lr: when both are > 0 (and restart_step < S), the schedule spans the first
      `restart_step` steps only and starts again there with peak `restart_lr` (no warmup) over the
      remaining S - restart_step steps: an SFT warm-up and the RL phase after it each get their own
      decay instead of RL inheriting the tail of one decay over both.

  Returns:
    optax schedule.
  """
  if restart_lr > 0 and 0 < restart_step < total_steps:
    return optax.join_schedules(
        [make_schedule(lr, restart_step, schedule, warmup_steps, end_lr),
         make_schedule(restart_lr, total_steps - restart_step, schedule, 0, end_lr)], [restart_step])
  total_steps = max(int(total_steps), 1)
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0)
  elif schedule == "linear":
    main = optax.linear_schedule(lr, end_lr, decay_steps)
  elif schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optim.schedule must be cosine|linear|constant, got {schedule!r}")
  if warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])
  return main


def trainable_keys(keys, freeze=()):
  """Sorted keys that match none of the `freeze` regexes (re.search semantics)."""
  regs = [re.compile(p) for p in freeze]
  return sorted(k for k in keys if not any(r.search(k) for r in regs))


def decay_mask(params, no_decay=HF_NO_DECAY):
  """`{key: bool}`: True where weight decay applies (lower-cased key matches none of `no_decay`)."""
  regs = [re.compile(p) for p in no_decay]
  return {k: not any(r.search(k.lower()) for r in regs) for k in params}


def make_optimizer(params, *, lr=1e-6, total_steps=1, schedule="cosine", warmup_steps=0, wd=0.01,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=5.0, no_decay=HF_NO_DECAY, restart_step=0,
                   restart_lr=0.0):
  """AdamW with clipping and schedule over the (trainable) flat param dict.

  Args:
    params: flat `{key: array or ShapeDtypeStruct}` of the trainable parameters.
    lr, total_steps, schedule, warmup_steps, restart_step, restart_lr: see `make_schedule`.
    wd: decoupled weight decay (multiplied by the lr, as torch AdamW).
    b1, b2, eps: Adam constants.
    grad_clip: max global grad norm (0 or None disables).
    no_decay: regexes of keys excluded from weight decay.

  Returns:
    (optax.GradientTransformation, schedule).
  """
  sched = make_schedule(lr, total_steps, schedule, warmup_steps, restart_step=restart_step,
                        restart_lr=restart_lr)
  mask = decay_mask(params, no_decay)
  chain = []
  if grad_clip:
    chain.append(optax.clip_by_global_norm(float(grad_clip)))
  chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask,
                           mu_dtype=jnp.float32))
  return optax.chain(*chain), sched

