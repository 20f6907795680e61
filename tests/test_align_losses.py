"""Preference and reward losses against closed forms computed in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import losses

RNG = np.random.default_rng(0)
PC, PR, RC, RR = (RNG.normal(-20, 5, 6) for _ in range(4))  # summed log-probs of 6 pairs


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _h():
  return (PC - RC) - (PR - RR)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_sigmoid_and_conservative(beta, eps):
  loss, metrics = losses.dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
  h = _h()
  expected = np.mean(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/chosen"], np.mean(beta * (PC - RC)), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/rejected"], np.mean(beta * (PR - RR)), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/margins"], np.mean(beta * h), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/accuracies"], np.mean(h > 0))
  np.testing.assert_allclose(metrics["logps/chosen"], PC.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["logps/rejected"], PR.mean(), rtol=1e-6)


def test_dpo_robust_ipo_hinge():
  beta, eps, h = 0.3, 0.1, _h()
  robust, _ = losses.dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps, loss_type="robust")
  expected = np.mean((-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps))
  np.testing.assert_allclose(robust, expected, rtol=1e-5)
  ipo, _ = losses.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
  np.testing.assert_allclose(ipo, np.mean((h - 1 / (2 * beta)) ** 2), rtol=1e-5)
  hinge, _ = losses.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
  np.testing.assert_allclose(hinge, np.mean(np.maximum(0, 1 - beta * h)), rtol=1e-5)


def test_dpo_is_ln2_when_the_policy_is_the_reference():
  loss, metrics = losses.dpo_loss(PC, PR, PC, PR, beta=0.1)
  assert float(loss) == pytest.approx(np.log(2), abs=1e-7)
  assert float(metrics["rewards/margins"]) == 0.0


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
  grads = jax.grad(lambda c, r: losses.dpo_loss(c, r, RC, RR, beta=0.1)[0], argnums=(0, 1))(jnp.asarray(PC),
                                                                                             jnp.asarray(PR))
  assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)


def test_simpo_and_orpo():
  mc, mr = PC / 10, PR / 10  # per-token means
  loss, _ = losses.simpo_loss(mc, mr, beta=2.0, gamma=0.5)
  np.testing.assert_allclose(loss, np.mean(-_log_sigmoid(2.0 * (mc - mr) - 0.5)), rtol=1e-5)
  nll = -mc
  loss, metrics = losses.orpo_loss(mc, mr, nll, beta=0.2)
  log_odds = lambda m: m - np.log1p(-np.exp(m))
  ratio = log_odds(mc) - log_odds(mr)
  np.testing.assert_allclose(loss, np.mean(nll - 0.2 * _log_sigmoid(ratio)), rtol=1e-5)
  np.testing.assert_allclose(metrics["log_odds_ratio"], ratio.mean(), rtol=1e-4)


def test_reward_loss_margin_and_centering():
  rc, rr, m = RNG.normal(size=5), RNG.normal(size=5), RNG.uniform(0, 1, 5)
  loss, metrics = losses.reward_loss(rc, rr)
  np.testing.assert_allclose(loss, np.mean(-_log_sigmoid(rc - rr)), rtol=1e-5)
  loss, _ = losses.reward_loss(rc, rr, margin=m, center_coef=0.01)
  expected = np.mean(-_log_sigmoid(rc - rr - m)) + 0.01 * np.mean((rc + rr) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(rc > rr))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
