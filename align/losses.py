"""Preference and reward losses on per-sequence log-probabilities and rewards (pure functions).

Every loss returns (loss, metrics) with the metric names users of TRL expect. Inputs are [B]
arrays (RRHF's [B, N]: N responses per prompt); log-probs are summed over completion tokens unless
a docstring says otherwise.

Each loss is a mean over the pairs that count: pair_mask [B] marks them (None: all; padding pairs
do not count, see `pairs_that_count`), and the metrics are means over them. whole_pair_mask is the
whole batch's pair_mask when these pairs are a micro-batch of it: the loss's normalizer, the number
of pairs that count, is then counted on it, so the micro-batches' losses add up to the whole
batch's (train.step.LossFn).
"""

import functools

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def pairs_that_count(chosen_mask: jax.Array, rejected_mask: jax.Array) -> jax.Array:
  """[B, T] completion masks -> [B] bool: the pairs with a token on either side (not padding)."""
  return jnp.any(jnp.asarray(chosen_mask) > 0, axis=1) | jnp.any(jnp.asarray(rejected_mask) > 0, axis=1)


def pair_mean(per_pair: jax.Array, pair_mask: jax.Array | None = None,
              whole_pair_mask: jax.Array | None = None) -> jax.Array:
  """The sum of per_pair [B] over the pairs that count, over the number of pairs that count in the
  whole batch (whole_pair_mask, defaulting to pair_mask; both default to every pair); 0 for none."""
  keep = jnp.ones(jnp.shape(per_pair), bool) if pair_mask is None else jnp.asarray(pair_mask) > 0
  count = jnp.sum(keep) if whole_pair_mask is None else jnp.sum(jnp.asarray(whole_pair_mask) > 0)
  return jnp.sum(jnp.where(keep, per_pair, 0.0)) / jnp.maximum(count, 1)


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, pair_mask):
  mean = functools.partial(pair_mean, pair_mask=pair_mask)
  return {
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": mean(chosen_rewards - rejected_rewards),
      "logps/chosen": mean(chosen_logps),
      "logps/rejected": mean(rejected_logps),
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
    pair_mask: jax.Array | None = None,  # [B]
    whole_pair_mask: jax.Array | None = None,  # [B']
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
      policy_chosen_logps, policy_rejected_logps, pair_mask,
  )
  return pair_mean(losses, pair_mask, whole_pair_mask), metrics


def simpo_loss(
    policy_chosen_mean_logps: jax.Array,  # [B] per-token mean log-probs of the chosen completions
    policy_rejected_mean_logps: jax.Array,  # [B]
    *,
    beta: float,
    gamma: float,
    pair_mask: jax.Array | None = None,  # [B]
    whole_pair_mask: jax.Array | None = None,  # [B']
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimPO (Meng et al. 2024): reference-free, length-normalized:
  -log sigmoid(beta * (mean_c - mean_r) - gamma); rewards are beta * mean log-probs."""
  chosen_rewards = beta * policy_chosen_mean_logps
  rejected_rewards = beta * policy_rejected_mean_logps
  losses = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - gamma)
  metrics = _preference_metrics(jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards),
                                policy_chosen_mean_logps, policy_rejected_mean_logps, pair_mask)
  return pair_mean(losses, pair_mask, whole_pair_mask), metrics


def orpo_loss(
    policy_chosen_mean_logps: jax.Array,  # [B] per-token mean log-probs
    policy_rejected_mean_logps: jax.Array,  # [B]
    chosen_nll: jax.Array,  # [B] the SFT loss on the chosen completions (per-token mean)
    *,
    beta: float,
    pair_mask: jax.Array | None = None,  # [B]
    whole_pair_mask: jax.Array | None = None,  # [B']
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
                                policy_chosen_mean_logps, policy_rejected_mean_logps, pair_mask)
  metrics.update({"nll_loss": pair_mean(chosen_nll, pair_mask), "log_odds_ratio": pair_mean(ratio, pair_mask)})
  return pair_mean(losses, pair_mask, whole_pair_mask), metrics


def reward_loss(
    chosen_rewards: jax.Array,  # [B]
    rejected_rewards: jax.Array,  # [B]
    *,
    margin: jax.Array | None = None,  # [B] or scalar
    center_coef: float = 0.0,
    pair_mask: jax.Array | None = None,  # [B]
    whole_pair_mask: jax.Array | None = None,  # [B']
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry: -log sigmoid(r_c - r_r - m) (margin m as in Llama 2), plus reward centering
  center_coef * mean((r_c + r_r)^2) (Eisenstein et al. 2023), which pins the rewards' offset."""
  diff = chosen_rewards - rejected_rewards
  if margin is not None:
    diff = diff - margin
  per_pair = -jax.nn.log_sigmoid(diff)
  if center_coef:
    per_pair = per_pair + center_coef * jnp.square(chosen_rewards + rejected_rewards)
  mean = functools.partial(pair_mean, pair_mask=pair_mask)
  metrics = {
      "accuracy": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/margins": mean(chosen_rewards - rejected_rewards),
  }
  return pair_mean(per_pair, pair_mask, whole_pair_mask), metrics


def rrhf_loss(
    mean_logps: jax.Array,  # [B, N] per-token mean log-prob of each of a prompt's N responses
    scores: jax.Array,  # [B, N] their scores (higher is better)
    response_mask: jax.Array,  # [B, N] 1 for a response, 0 for padding
    *,
    sft_weight: float = 1.0,
    whole_response_mask: jax.Array | None = None,  # [B', N]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RRHF (Yuan et al. 2023, eq. 2-4), per prompt: sum over its responses i, j with r_i < r_j of
  max(0, p_i - p_j), plus sft_weight * the per-token NLL of its best-scored response (-p_best;
  the first of the best among ties), p being per-token mean log-probs. Padding responses enter no
  pair; a prompt with no response does not count. A mean over the prompts that count (counted on
  whole_response_mask when this is a micro-batch of it)."""
  valid = jnp.asarray(response_mask) > 0
  both = valid[:, :, None] & valid[:, None, :]
  worse = (scores[:, :, None] < scores[:, None, :]) & both  # [B, N, N]: response i scores below response j
  gaps = mean_logps[:, :, None] - mean_logps[:, None, :]  # [B, N, N]: p_i - p_j
  rank = jnp.sum(jnp.where(worse, jax.nn.relu(gaps), 0.0), axis=(1, 2))  # [B]
  best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=1)  # [B]
  best_nll = -jnp.take_along_axis(mean_logps, best[:, None], axis=1)[:, 0]  # [B]
  rows = jnp.any(valid, axis=1)
  whole_rows = None if whole_response_mask is None else jnp.any(jnp.asarray(whole_response_mask) > 0, axis=1)
  mean = functools.partial(pair_mean, pair_mask=rows)
  ordered = jnp.sum(worse, axis=(1, 2))
  right = jnp.sum(worse & (gaps < 0), axis=(1, 2))
  metrics = {
      "rrhf/rank_loss": mean(rank),
      "rrhf/sft_loss": mean(best_nll),
      # The share of scored-apart pairs whose log-probs are in the scores' order.
      "rrhf/accuracy": jnp.sum(jnp.where(rows, right, 0)) / jnp.maximum(jnp.sum(jnp.where(rows, ordered, 0)), 1),
      "logps/mean": jnp.sum(jnp.where(valid, mean_logps, 0.0)) / jnp.maximum(jnp.sum(valid), 1),
  }
  return pair_mean(rank + sft_weight * best_nll, rows, whole_rows), metrics
