"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A): how large a batch must be before its gradient is more signal than noise.

With G the true gradient and Sigma the per-example gradient covariance, a batch of B examples has
E|g_B|^2 = |G|^2 + tr(Sigma) / B. Two batch sizes give unbiased estimates of both terms, and the
simple noise scale B_noise = tr(Sigma) / |G|^2: below it, a step mostly follows noise.
"""

import numpy as np


def noise_scale(minibatch_sq_norms, mean_grad_sq_norm: float, b: int) -> dict[str, float]:
  """|G|^2, tr(Sigma) and B_noise from K disjoint minibatch gradients of b examples each: the
  squared norm of each ([K]) and of their mean (a batch of K * b examples)."""
  k = len(minibatch_sq_norms)
  if k < 2 or b < 1:
    raise ValueError(f"noise_scale needs at least 2 minibatches of at least 1 example, got K={k}, b={b}")
  small, big = float(np.mean(minibatch_sq_norms)), float(mean_grad_sq_norm)
  b_big = k * b
  trace = (small - big) / (1 / b - 1 / b_big)
  signal = (b_big * big - b * small) / (b_big - b)
  return {"|G|^2": signal, "tr(Sigma)": trace, "B_noise": trace / signal if signal > 0 else float("inf"),
          "|g_b|^2": small}
