"""Tests for spacer_jax.grpo: NumPy golden port of SG_RLVR_trainer.py L551-552 / L633-643,
gradient properties (zero advantages, masking, analytic and finite-difference gradients) and every
variant."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spacer_jax import grpo

B, T, G = 4, 6, 2


def _golden_advantages(rewards, g):
  """SG_RLVR_trainer.py L633-637: torch .std() is unbiased; 1e-4 is added to the std."""
  r = np.asarray(rewards, np.float64).reshape(-1, g)
  mean = r.mean(1, keepdims=True)
  std = r.std(1, ddof=1, keepdims=True)
  return ((r - mean) / (std + 1e-4)).reshape(-1)


def _golden_loss_and_grad(logp, ref, adv, mask, beta=0.04):
  """L551-552 and L638-643 in NumPy: loss value and its analytic gradient w.r.t. logp.

  ratio = exp(logp - logp.detach()) is 1 in value with d ratio / d logp = 1.
  """
  x = np.clip(ref - logp, -10, 10)
  kl = np.exp(x) - x - 1
  per_token = -(1.0 * adv[:, None] - beta * kl)
  n = mask.sum(1)
  loss = ((per_token * mask).sum(1) / n).mean()
  inside = (np.abs(ref - logp) < 10).astype(np.float64)
  dkl = -(np.exp(x) - 1) * inside                      # d kl / d logp
  grad = (-adv[:, None] + beta * dkl) * mask / n[:, None] / logp.shape[0]
  return loss, grad


def _case(seed=0, b=B, t=T):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 3.0, (b, t))
  ref = logp + rng.normal(0, 0.5, (b, t))
  adv = rng.normal(0, 1, b)
  mask = np.ones((b, t))
  for i in range(b):
    mask[i, rng.integers(1, t + 1):] = 0
  return logp, ref, adv, mask


def _loss_fn(config, old=None, ref_given=True):
  def f(logp, ref, adv, mask):
    return grpo.compute_loss(logp, old, ref if ref_given else None, adv, mask, config)[0]
  return f


def test_constants_cite_reference():
  assert grpo.ADV_EPS == 1e-4 and grpo.KL_CLAMP == 10.0 and grpo.BETA == 0.04
  c = grpo.GRPOConfig()
  assert (c.beta, c.epsilon, c.loss_agg, c.reward_scaling, c.importance_sampling) == (
      0.04, None, "seq_mean_token_mean", "group", "token")


def test_advantages_golden_and_vector_24():
  rewards = np.array([3.25, 2.3, 1.0, 0.0, 2.5, 1.0, 1.5, 1.0, 0.5, 0.5, 0.5, 0.5, 0, 1, 2, 3])
  np.testing.assert_allclose(grpo.compute_advantages(rewards, 8), _golden_advantages(rewards, 8),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grpo.compute_advantages(rewards[:8], 8),
                             [1.606544, 0.698757, -0.543478, -1.499043, 0.889870, -0.543478,
                              -0.065695, -0.543478], atol=1e-6)
  assert np.all(np.asarray(grpo.compute_advantages(np.full(8, 1.7), 8)) == 0)


def test_advantages_scaling_variants():
  r = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
  g = r.reshape(-1, 3)
  centred = (g - g.mean(1, keepdims=True)).reshape(-1)
  np.testing.assert_allclose(grpo.compute_advantages(r, 3, "none"), centred, rtol=1e-6)
  np.testing.assert_allclose(grpo.compute_advantages(r, 3, "batch"),
                             centred / (r.std(ddof=1) + 1e-4), rtol=1e-6)
  with pytest.raises(ValueError, match="scaling"):
    grpo.compute_advantages(r, 3, "rank")
  with pytest.raises(ValueError, match="multiple of group_size"):
    grpo.compute_advantages(r, 4)


@pytest.mark.parametrize("logp,ref,expected", [
    (-1, -1.5, 0.106531), (-1.5, -1, 0.148721), (-1, -1, 0.0), (-20, -1, 22015.465795),
    (-1, -20, 9.000045)])
def test_k3_vector_25(logp, ref, expected):
  assert grpo.kl_k3(logp, ref) == pytest.approx(expected, abs=1e-6)
  assert isinstance(grpo.kl_k3(logp, ref), float)
  arr = grpo.kl_k3(jnp.array([logp], jnp.float32), jnp.array([ref], jnp.float32))
  np.testing.assert_allclose(arr, [expected], rtol=1e-5, atol=1e-5)


def test_default_loss_and_gradient_equal_numpy_golden():
  logp, ref, adv, mask = _case()
  loss, grad = jax.value_and_grad(_loss_fn(grpo.GRPOConfig()))(
      *(jnp.asarray(a, jnp.float32) for a in (logp, ref, adv, mask)))
  want_loss, want_grad = _golden_loss_and_grad(logp, ref, adv, mask)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_clamped_kl_has_zero_kl_gradient():
  logp = np.array([[-20.0, -1.0]])
  ref = np.array([[-1.0, -1.0]])
  grad = jax.grad(_loss_fn(grpo.GRPOConfig()))(*(jnp.asarray(a, jnp.float32) for a in (
      logp, ref, np.zeros(1), np.ones((1, 2)))))
  np.testing.assert_array_equal(grad, 0.0)


def test_zero_advantage_ratio_one_gives_zero_policy_gradient():
  logp, _, _, mask = _case(1)
  args = [jnp.asarray(a, jnp.float32) for a in (logp, logp, np.zeros(B), mask)]
  grad = jax.grad(_loss_fn(grpo.GRPOConfig()))(*args)       # ref == policy: KL gradient 0 too
  np.testing.assert_array_equal(grad, 0.0)
  grad = jax.grad(_loss_fn(grpo.GRPOConfig(beta=0.0), ref_given=False))(*args)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("config", [
    grpo.GRPOConfig(), grpo.GRPOConfig(loss_agg="token_mean"),
    grpo.GRPOConfig(loss_agg="seq_mean_token_sum_norm"), grpo.GRPOConfig(epsilon=0.2),
    grpo.GRPOConfig(importance_sampling="sequence", epsilon=3e-4)])
def test_masked_tokens_get_zero_gradient(config):
  logp, ref, adv, mask = _case(2)
  logp = np.where(mask > 0, logp, -np.inf)          # garbage at pads must not leak NaN
  ref = np.where(mask > 0, ref, np.nan)
  old = jnp.asarray(np.where(mask > 0, logp + 0.1, np.inf), jnp.float32)
  grad = jax.grad(_loss_fn(config, old=old))(*(jnp.asarray(a, jnp.float32) for a in (
      logp, ref, adv, mask)))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
  assert np.any(np.asarray(grad)[mask > 0] != 0)


def test_loss_aggregation_variants_golden():
  logp, ref, adv, mask = _case(3)
  x = np.clip(ref - logp, -10, 10)
  per_token = -(adv[:, None] - 0.04 * (np.exp(x) - x - 1))
  args = [jnp.asarray(a, jnp.float32) for a in (logp, ref, adv, mask)]
  token_mean = _loss_fn(grpo.GRPOConfig(loss_agg="token_mean"))(*args)
  assert float(token_mean) == pytest.approx((per_token * mask).sum() / mask.sum(), rel=1e-5)
  dr = _loss_fn(grpo.GRPOConfig(loss_agg="seq_mean_token_sum_norm"))(*args)
  assert float(dr) == pytest.approx((per_token * mask).sum() / (B * T), rel=1e-5)
  dr_len = _loss_fn(grpo.GRPOConfig(loss_agg="seq_mean_token_sum_norm",
                                    max_completion_length=100))(*args)
  assert float(dr_len) == pytest.approx((per_token * mask).sum() / (B * 100), rel=1e-5)


def test_ppo_clipping_with_old_logps():
  """mu > 1: ratio vs stored old log-probs, clipped at [1 - eps, 1 + eps_high]."""
  logp = np.log(np.array([[1.5, 0.5, 1.1, 1.0]]) * 0.3)      # ratios 1.5, 0.5, 1.1, 1.0 vs old
  old = np.log(np.full((1, 4), 0.3))
  mask = np.ones((1, 4))
  for adv, eps_high, clipped_tokens in ((1.0, None, [0]), (-1.0, None, [1]), (1.0, 0.6, [])):
    config = grpo.GRPOConfig(beta=0.0, epsilon=0.2, epsilon_high=eps_high)
    f = lambda lp: grpo.compute_loss(lp, jnp.asarray(old, jnp.float32), None,
                                     jnp.array([adv]), mask, config)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    ratio = np.exp(logp - old)[0]
    hi = 1 + (0.2 if eps_high is None else eps_high)
    want = -np.minimum(ratio * adv, np.clip(ratio, 0.8, hi) * adv).mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    want_grad = np.where(np.isin(np.arange(4), clipped_tokens), 0.0, -adv * ratio / 4)
    np.testing.assert_allclose(np.asarray(grad)[0], want_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["clip_fraction"]) == pytest.approx(len(clipped_tokens) / 4)


def test_clipping_without_old_logps_equals_default():
  logp, ref, adv, mask = _case(4)
  args = [jnp.asarray(a, jnp.float32) for a in (logp, ref, adv, mask)]
  g0 = jax.grad(_loss_fn(grpo.GRPOConfig()))(*args)
  g1 = jax.grad(_loss_fn(grpo.GRPOConfig(epsilon=0.2)))(*args)
  np.testing.assert_allclose(g0, g1, rtol=1e-6, atol=1e-8)


def test_gspo_sequence_ratio():
  logp, ref, adv, mask = _case(5)
  old = logp - np.random.default_rng(0).normal(0, 0.05, logp.shape)
  config = grpo.GRPOConfig(beta=0.0, importance_sampling="sequence")
  loss = _loss_fn(config, old=jnp.asarray(old, jnp.float32), ref_given=False)(
      *(jnp.asarray(a, jnp.float32) for a in (logp, ref, adv, mask)))
  s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))          # one ratio per sequence
  assert float(loss) == pytest.approx(np.mean(-s * adv), rel=1e-5)


def test_beta_zero_needs_no_reference_and_beta_positive_does():
  logp, _, adv, mask = _case(6)
  loss, metrics = grpo.compute_loss(jnp.asarray(logp), None, None, jnp.asarray(adv), mask,
                                    grpo.GRPOConfig(beta=0.0))
  assert float(loss) == pytest.approx(-adv.mean(), rel=1e-5) and "kl" not in metrics
  with pytest.raises(ValueError, match="ref_logps"):
    grpo.compute_loss(jnp.asarray(logp), None, None, jnp.asarray(adv), mask, grpo.GRPOConfig())
  with pytest.raises(ValueError, match="loss_agg"):
    grpo.GRPOConfig(loss_agg="sum")


@pytest.mark.parametrize("config", [
    grpo.GRPOConfig(), grpo.GRPOConfig(loss_agg="token_mean", epsilon=0.2, epsilon_high=0.28),
    grpo.GRPOConfig(loss_agg="seq_mean_token_sum_norm"),
    grpo.GRPOConfig(importance_sampling="sequence", epsilon=0.2)])
def test_gradient_matches_finite_differences(config):
  """d loss / d logits through token_logps, against central differences (float32, smooth point)."""
  rng = np.random.default_rng(7)
  v = 5
  logits = rng.normal(0, 1, (2, 3, v)).astype(np.float32)
  tokens = rng.integers(0, v, (2, 3))
  ref = np.asarray(grpo.token_logps(jnp.asarray(logits + rng.normal(0, 0.3, logits.shape)),
                                    tokens))
  old = np.asarray(grpo.token_logps(jnp.asarray(logits + rng.normal(0, 0.05, logits.shape)),
                                    tokens))
  adv = np.array([0.7, -1.2], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)

  @jax.jit
  def f(lg):
    lp = grpo.token_logps(lg, tokens)
    return grpo.compute_loss(lp, old, ref, adv, mask, config)[0]

  grad = np.asarray(jax.grad(f)(jnp.asarray(logits)))
  h = 1e-2
  fd = np.zeros_like(logits)
  for idx in np.ndindex(logits.shape):
    e = np.zeros_like(logits)
    e[idx] = h
    fd[idx] = (float(f(jnp.asarray(logits + e))) - float(f(jnp.asarray(logits - e)))) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-4)


def test_token_logps_one_hot_equals_log_softmax_and_has_no_scatter():
  rng = np.random.default_rng(8)
  logits = jnp.asarray(rng.normal(0, 2, (2, 4, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, (2, 4)))
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(grpo.token_logps(logits, tokens), want, rtol=1e-6, atol=1e-6)
  grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda lg: grpo.token_logps(lg, tokens).sum()))(logits))
  assert "scatter" not in grad_jaxpr
  p = jax.nn.softmax(logits)
  np.testing.assert_allclose(grpo.token_entropy(logits), -(p * jnp.log(p)).sum(-1), rtol=1e-5)


def test_metrics():
  logp, ref, adv, mask = _case(9)
  ent = np.full((B, T), 2.0)
  _, m = grpo.compute_loss(jnp.asarray(logp), None, jnp.asarray(ref), jnp.asarray(adv), mask,
                           grpo.GRPOConfig(), entropy=jnp.asarray(ent))
  x = np.clip(ref - logp, -10, 10)
  kl = np.exp(x) - x - 1
  assert float(m["kl"]) == pytest.approx(((kl * mask).sum(1) / mask.sum(1)).mean(), rel=1e-5)
  assert float(m["entropy"]) == pytest.approx(2.0)
  assert float(m["ratio_mean"]) == pytest.approx(1.0) and float(m["clip_fraction"]) == 0.0
  assert float(m["completion_length"]) == pytest.approx(mask.sum(1).mean())


def test_loss_is_jittable_with_static_config():
  logp, ref, adv, mask = _case(10)
  f = jax.jit(grpo.compute_loss, static_argnames="config")
  loss, _ = f(logp, None, ref, adv, mask, config=grpo.GRPOConfig(epsilon=0.2))
  assert np.isfinite(float(loss))
  assert dataclasses.is_dataclass(grpo.GRPOConfig) and hash(grpo.GRPOConfig())
