"""Pure GRPO math (jnp): group advantages, token log-probs, k3 KL, the policy loss and its variants.

The default `GRPOConfig()` is SpaceR's objective exactly (docs/spacer_recipe.md, "GRPO objective"), i.e.
SG_RLVR_trainer.py at OuyangKun10/SpaceR b623af5:
  L551-552  x = clamp(ref_logp - logp, -10, 10); kl = exp(x) - x - 1            (k3 estimator)
  L633-643  A = (R - mean_G R) / (std_G R + 1e-4)    with torch's unbiased std (ddof = 1)
            loss_t = -(exp(logp - logp.detach()) * A - beta * kl_t),   beta = 0.04
            loss = mean_i( sum_t loss_t m_t / sum_t m_t )    (token mean per sequence, then mean)
Variants (each behind a field of GRPOConfig): PPO clipping with epsilon / epsilon_high against
stored old log-probs (mu > 1 updates per batch), loss aggregation token-mean and Dr. GRPO's
seq-mean-token-sum-norm, reward scaling by the batch std or not at all, GSPO's sequence-level
importance ratio, and beta = 0 (no reference model).

Axis legend: B sequences (prompts x G), T completion tokens, V vocabulary.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# SG_RLVR_trainer.py L633-643 / L551-552 (see module docstring).
ADV_EPS = 1e-4
KL_CLAMP = 10.0
BETA = 0.04

LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
REWARD_SCALINGS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Objective switches; the defaults are SpaceR's.

  Attributes:
    beta: KL coefficient; 0 drops the KL term and the reference log-probs may be None.
    epsilon: lower clip range of the PPO ratio; None = no clipping (SpaceR: the ratio is identically
      1 in value, so its gradient is that of log-prob).
    epsilon_high: upper clip range (DAPO's clip-higher); None = epsilon.
    loss_agg: "seq_mean_token_mean" (SpaceR), "token_mean" (sum over all tokens / number of tokens)
      or "seq_mean_token_sum_norm" (Dr. GRPO: sum / (B * max_completion_length)).
    max_completion_length: the Dr. GRPO normaliser; None = the padded length T.
    reward_scaling: "group" (divide by the group std, SpaceR), "batch" (by the std of the whole
      batch) or "none" (Dr. GRPO).
    importance_sampling: "token" or "sequence" (GSPO: the ratio is the exp of the per-sequence mean
      log-ratio, shared by all tokens of the sequence).
    adv_eps: added to the std (not the variance).
    kl_clamp: |log-ratio| bound inside k3.
  """
  beta: float = BETA
  epsilon: float | None = None
  epsilon_high: float | None = None
  loss_agg: str = "seq_mean_token_mean"
  max_completion_length: int | None = None
  reward_scaling: str = "group"
  importance_sampling: str = "token"
  adv_eps: float = ADV_EPS
  kl_clamp: float = KL_CLAMP

  def __post_init__(self):
    for name, value, allowed in (("loss_agg", self.loss_agg, LOSS_AGGS),
                                 ("reward_scaling", self.reward_scaling, REWARD_SCALINGS),
                                 ("importance_sampling", self.importance_sampling,
                                  IMPORTANCE_LEVELS)):
      if value not in allowed:
        raise ValueError(f"GRPOConfig.{name} must be one of {allowed}, got {value!r}")
    if self.beta < 0:
      raise ValueError(f"GRPOConfig.beta must be >= 0, got {self.beta}")


def compute_advantages(rewards, group_size: int, scaling: str = "group", eps: float = ADV_EPS):
  """Group-relative advantages (R - mean_G R) / (std R + eps), std unbiased.

  Args:
    rewards: float[B*G], grouped by prompt (G consecutive entries per prompt).
    group_size: G.
    scaling: "group" (std of the group, SpaceR), "batch" (std of all B*G rewards) or "none".
    eps: added to the std.
  Returns:
    float32[B*G]. A group of identical rewards gets advantage 0. G == 1 has no defined std (torch
    gives NaN); this returns 0 advantages for it.
  """
  if scaling not in REWARD_SCALINGS:
    raise ValueError(f"scaling must be one of {REWARD_SCALINGS}, got {scaling!r}")
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got "
                     f"shape {r.shape}")
  g = r.reshape(-1, group_size)
  # Centre on the first reward before averaging so that a group of identical rewards gives exactly
  # 0 (a float32 mean of 8 x 1.7 is not exactly 1.7, and dividing that residue by std + 1e-4 ~ 1e-4
  # would leave advantages of ~1e-3).
  shifted = g - g[:, :1]
  centred = shifted - shifted.mean(1, keepdims=True)
  if group_size == 1:
    return jnp.zeros_like(r)
  if scaling == "group":
    std = jnp.sqrt((centred ** 2).sum(1, keepdims=True) / (group_size - 1))
    centred = centred / (std + eps)
  elif scaling == "batch":
    centred = centred / (jnp.std(r, ddof=1) + eps)
  return centred.reshape(-1)


def kl_k3(logp, ref_logp, clamp: float = KL_CLAMP):
  """k3 KL estimator exp(x) - x - 1 with x = clip(ref_logp - logp, -clamp, clamp).

  Scalars in, a float out; arrays in, an array out.
  """
  if np.isscalar(logp) and np.isscalar(ref_logp):
    x = min(max(float(ref_logp) - float(logp), -clamp), clamp)
    return math.exp(x) - x - 1
  x = jnp.clip(jnp.asarray(ref_logp) - jnp.asarray(logp), -clamp, clamp)
  return jnp.exp(x) - x - 1


def _is_token(tokens, v):
  """bool[..., V]: position t's token is vocabulary entry v. A comparison with a [1, .., V] iota
  that XLA fuses into its consumer (jax.nn.one_hot's broadcast int32 [..., V] iota was kept as a
  9.3 GiB buffer in the 7B train step)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, (1,) * tokens.ndim + (v,), tokens.ndim)
  return tokens[..., None].astype(jnp.int32) == iota


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pick(v, logits, tokens):
  """logits[..., tokens] as a masked sum: no gather (whose gradient is a scatter), no one-hot."""
  return jnp.sum(jnp.where(_is_token(tokens, v), logits, 0.0), axis=-1)


def _pick_fwd(v, logits, tokens):
  return _pick(v, logits, tokens), tokens  # only the token ids are kept for the backward


def _pick_bwd(v, tokens, g):
  # The cotangent is g at each row's token and 0 elsewhere, built where it is consumed.
  return jnp.where(_is_token(tokens, v), g[..., None], 0.0).astype(g.dtype), None


_pick.defvjp(_pick_fwd, _pick_bwd)


def token_logps(logits, tokens):
  """log softmax(logits)[tokens] as logits[tokens] - logsumexp(logits), in float32.

  The picked logit is a masked sum over the vocabulary with a custom gradient (the mask times the
  cotangent): a gather (take_along_axis) would backprop through a scatter, which costs 1-3 s per
  step on CPU at 8 x 256 x 32k, and a one-hot contraction materialises an int32 [..., V] iota on
  TPU. The masked sum is also exact on TPU, where a float32 one-hot matmul may run in bf16 passes.
  Args:
    logits: float[B, T, V] (any float dtype; computed in float32).
    tokens: int[B, T].
  Returns:
    float32[B, T].
  """
  logits = logits.astype(jnp.float32)
  return _pick(logits.shape[-1], logits, tokens) - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits):
  """Entropy of softmax(logits) per position: float32[B, T]."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, -1)
  return -(jnp.exp(logp) * logp).sum(-1)


def _aggregate(per_token, mask, config):
  """Reduce [B, T] per-token losses to a scalar as config.loss_agg says."""
  tokens = mask.sum(1)
  if config.loss_agg == "seq_mean_token_mean":
    # torch divides by the mask sum; an all-masked row (batch padding) would be NaN there, 0 here.
    return ((per_token * mask).sum(1) / jnp.maximum(tokens, 1.0)).mean()
  if config.loss_agg == "token_mean":
    return (per_token * mask).sum() / jnp.maximum(tokens.sum(), 1.0)
  length = config.max_completion_length or per_token.shape[1]
  return (per_token * mask).sum() / (per_token.shape[0] * length)


def _seq_mean(x, mask):
  return ((x * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)).mean()


def compute_loss(logps, old_logps, ref_logps, advantages, completion_mask,
                 config: GRPOConfig = GRPOConfig(), entropy=None):
  """GRPO policy loss (SpaceR default; variants per `config`) and scalar metrics.

  Args:
    logps: float[B, T] policy log-probs of the completion tokens (differentiated).
    old_logps: float[B, T] log-probs stored at rollout (mu > 1 updates), or None: then
      stop_gradient(logps), so the ratio is 1 in value (SpaceR, single update).
    ref_logps: float[B, T] reference log-probs, or None when config.beta == 0.
    advantages: float[B].
    completion_mask: [B, T] 1 for completion tokens up to and including the first <|im_end|>.
    config: GRPOConfig.
    entropy: optional float[B, T] per-token entropy (`token_entropy(logits)`), only logged.
  Returns:
    (loss, metrics): scalar loss; metrics dict of scalars (kl, clip fractions, ratio, entropy, ...).
  """
  mask = jnp.asarray(completion_mask).astype(jnp.float32)
  ok = mask > 0
  # Zero the masked entries first: a -inf at a pad position would otherwise give NaN gradients
  # through exp() even though the mask multiplies its value away.
  logps = jnp.where(ok, logps, 0.0)
  old = jax.lax.stop_gradient(logps) if old_logps is None else jnp.where(ok, old_logps, 0.0)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]
  log_ratio = logps - old
  if config.importance_sampling == "sequence":
    # GSPO: one ratio per sequence, exp(mean_t log-ratio), gradient through all its tokens.
    log_ratio = ((log_ratio * mask).sum(1, keepdims=True) / jnp.maximum(mask.sum(1, keepdims=True),
                                                                          1.0))
    log_ratio = jnp.broadcast_to(log_ratio, logps.shape)
  ratio = jnp.exp(log_ratio)
  if config.epsilon is None:
    objective = ratio * adv
    low = high = jnp.zeros_like(mask)
  else:
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    clipped = jnp.clip(ratio, 1 - config.epsilon, 1 + eps_high)
    objective = jnp.minimum(ratio * adv, clipped * adv)
    low = ((ratio < 1 - config.epsilon) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1 + eps_high) & (adv > 0)).astype(jnp.float32)
  per_token = -objective
  metrics = {}
  if config.beta > 0:
    if ref_logps is None:
      raise ValueError("compute_loss: config.beta > 0 needs ref_logps")
    kl = kl_k3(logps, jnp.where(ok, ref_logps, 0.0), config.kl_clamp)
    per_token = per_token + config.beta * kl
    metrics["kl"] = _seq_mean(kl, mask)
  elif ref_logps is not None:
    metrics["kl"] = _seq_mean(kl_k3(logps, jnp.where(ok, ref_logps, 0.0), config.kl_clamp), mask)
  loss = _aggregate(per_token, mask, config)
  n_tokens = jnp.maximum(mask.sum(), 1.0)
  metrics.update(
      loss=loss,
      policy_loss=_aggregate(-objective, mask, config),
      clip_low=(low * mask).sum() / n_tokens,
      clip_high=(high * mask).sum() / n_tokens,
      clip_fraction=((low + high) * mask).sum() / n_tokens,
      ratio_mean=(ratio * mask).sum() / n_tokens,
      completion_length=mask.sum(1).mean(),
      advantage_mean=adv.mean(),
      advantage_abs_mean=jnp.abs(adv).mean())
  if entropy is not None:
    metrics["entropy"] = _seq_mean(jnp.where(ok, entropy, 0.0), mask)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
