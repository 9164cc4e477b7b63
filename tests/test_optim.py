"""optim: the learning-rate schedule, including the restart at the RL phase after an SFT warm-up."""

import math

import pytest

from spacer_jax import optim


def _cosine(lr, s, total):
  return lr * 0.5 * (1 + math.cos(math.pi * s / total))


def test_one_cosine_over_the_run():
  s = optim.make_schedule(6e-3, 200)
  for step in (0, 50, 150, 199):
    assert float(s(step)) == pytest.approx(_cosine(6e-3, step, 200), rel=1e-5, abs=1e-9)


def test_schedule_restarts_at_the_rl_phase():
  s = optim.make_schedule(6e-3, 350, restart_step=300, restart_lr=6e-4)
  for step in (0, 100, 299):  # SFT: its own cosine over 300 steps, down to ~0 at its end
    assert float(s(step)) == pytest.approx(_cosine(6e-3, step, 300), rel=1e-5, abs=1e-9)
  for step in (300, 325, 349):  # RL: a fresh cosine from 6e-4 over the last 50 steps
    assert float(s(step)) == pytest.approx(_cosine(6e-4, step - 300, 50), rel=1e-5, abs=1e-9)
  # Warmup belongs to the first phase only.
  w = optim.make_schedule(1.0, 20, warmup_steps=4, restart_step=10, restart_lr=0.5)
  assert float(w(0)) == 0.0 and float(w(4)) == pytest.approx(1.0) and float(w(10)) == pytest.approx(0.5)
  # No restart without a positive restart_lr, or at/after the last step.
  for kw in (dict(restart_step=300, restart_lr=0.0), dict(restart_step=350, restart_lr=6e-4)):
    assert float(optim.make_schedule(6e-3, 350, **kw)(300)) == pytest.approx(
        _cosine(6e-3, 300, 350), rel=1e-5)
