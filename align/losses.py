"""Preference and reward losses on per-sequence log-probabilities and rewards (pure functions).

Every loss returns (loss, metrics) with the metric names users of TRL expect. Inputs are [B]
arrays; log-probs are summed over completion tokens unless a docstring says otherwise.
"""

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
  return {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "logps/chosen": jnp.mean(chosen_logps),
      "logps/rejected": jnp.mean(rejected_logps),
  }


def dpo_loss(
    policy_chosen_logps: jax.Array,  # [B]
    policy_rejected_logps: jax.Array,  # [B]
    reference_chosen_logps: jax.Array,  # [B]
    reference_rejected_logps: jax.Array,  # [B]
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DPO family on h = (pi_c - ref_c) - (pi_r - ref_r), the policy-minus-reference log-ratio margin.

  - sigmoid (DPO, Rafailov et al. 2023; with eps = label_smoothing, conservative DPO):
      -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
  - robust (rDPO, Chowdhury et al. 2024: unbiased under preference flips with rate eps < 1/2):
      (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
  - ipo (IPO, Azar et al. 2023): (h - 1 / (2 beta))^2. The log-probs are used as given; the
      method's loss function passes *per-token mean* log-probs for IPO (TRL's convention), so
      the target margin 1/(2 beta) does not scale with completion length.
  - hinge (SLiC-style): max(0, 1 - beta h).
  Implicit rewards are beta * (pi - ref) (detached), as in the DPO paper.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
  if not 0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
  chosen_ratio = policy_chosen_logps - reference_chosen_logps
  rejected_ratio = policy_rejected_logps - reference_rejected_logps
  h = chosen_ratio - rejected_ratio
  eps = label_smoothing
  if loss_type == "sigmoid":
    losses = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
  elif loss_type == "robust":
    losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)
  elif loss_type == "ipo":
    losses = jnp.square(h - 1 / (2 * beta))
  else:
    losses = jax.nn.relu(1 - beta * h)
  metrics = _preference_metrics(
      jax.lax.stop_gradient(beta * chosen_ratio), jax.lax.stop_gradient(beta * rejected_ratio),
      policy_chosen_logps, policy_rejected_logps,
  )
  return jnp.mean(losses), metrics


def simpo_loss(
    policy_chosen_mean_logps: jax.Array,  # [B] per-token mean log-probs of the chosen completions
    policy_rejected_mean_logps: jax.Array,  # [B]
    *,
    beta: float,
    gamma: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimPO (Meng et al. 2024): reference-free, length-normalized:
  -log sigmoid(beta * (mean_c - mean_r) - gamma); rewards are beta * mean log-probs."""
  chosen_rewards = beta * policy_chosen_mean_logps
  rejected_rewards = beta * policy_rejected_mean_logps
  losses = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - gamma)
  metrics = _preference_metrics(jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards),
                                policy_chosen_mean_logps, policy_rejected_mean_logps)
  return jnp.mean(losses), metrics


def orpo_loss(
    policy_chosen_mean_logps: jax.Array,  # [B] per-token mean log-probs
    policy_rejected_mean_logps: jax.Array,  # [B]
    chosen_nll: jax.Array,  # [B] the SFT loss on the chosen completions (per-token mean)
    *,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ORPO (Hong et al. 2024): nll_chosen - beta * log sigmoid(log odds_c - log odds_r),
  odds = p / (1 - p) with p = exp(per-token mean log-prob)."""
  def log_odds(mean_logps):
    return mean_logps - jnp.log1p(-jnp.exp(jnp.minimum(mean_logps, -1e-6)))

  ratio = log_odds(policy_chosen_mean_logps) - log_odds(policy_rejected_mean_logps)
  odds_term = jax.nn.log_sigmoid(ratio)
  losses = chosen_nll - beta * odds_term
  chosen_rewards = beta * policy_chosen_mean_logps
  rejected_rewards = beta * policy_rejected_mean_logps
  metrics = _preference_metrics(jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards),
                                policy_chosen_mean_logps, policy_rejected_mean_logps)
  metrics.update({"nll_loss": jnp.mean(chosen_nll), "log_odds_ratio": jnp.mean(ratio)})
  return jnp.mean(losses), metrics


def reward_loss(
    chosen_rewards: jax.Array,  # [B]
    rejected_rewards: jax.Array,  # [B]
    *,
    margin: jax.Array | None = None,  # [B] or scalar
    center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry: -log sigmoid(r_c - r_r - m) (margin m as in Llama 2), plus reward centering
  center_coef * mean((r_c + r_r)^2) (Eisenstein et al. 2023), which pins the rewards' offset."""
  diff = chosen_rewards - rejected_rewards
  if margin is not None:
    diff = diff - margin
  loss = jnp.mean(-jax.nn.log_sigmoid(diff))
  if center_coef:
    loss = loss + center_coef * jnp.mean(jnp.square(chosen_rewards + rejected_rewards))
  metrics = {
      "accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
  }
  return loss, metrics
