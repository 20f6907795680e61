"""The gradient noise scale estimator on synthetic gradients with a known mean and covariance."""

import numpy as np
import pytest

from train.noise_scale import noise_scale


def test_noise_scale_recovers_a_known_signal_and_covariance():
  rng = np.random.default_rng(0)
  signal = np.array([1.0, 0.0, 0.0, 0.0])  # |G|^2 = 1
  variances = np.array([1.0, 2.0, 3.0, 4.0])  # tr(Sigma) = 10, so B_noise = 10
  k, b, trials = 400, 4, 20
  estimates = []
  for _ in range(trials):
    per_example = signal + rng.normal(size=(k, b, 4)) * np.sqrt(variances)
    minibatch = per_example.mean(axis=1)  # [K, 4]: gradients of K minibatches of b examples
    mean = minibatch.mean(axis=0)
    estimates.append(noise_scale(np.sum(minibatch**2, axis=1), float(mean @ mean), b))
  assert np.mean([e["|G|^2"] for e in estimates]) == pytest.approx(1.0, abs=0.05)
  assert np.mean([e["tr(Sigma)"] for e in estimates]) == pytest.approx(10.0, rel=0.03)
  assert np.mean([e["B_noise"] for e in estimates]) == pytest.approx(10.0, rel=0.1)
  # |g_b|^2 = |G|^2 + tr(Sigma) / b in expectation
  assert np.mean([e["|g_b|^2"] for e in estimates]) == pytest.approx(1.0 + 10.0 / b, rel=0.03)


def test_noise_scale_names_bad_input():
  with pytest.raises(ValueError, match="K=1"):
    noise_scale([1.0], 1.0, 4)
