"""Losses and estimators for RL on the model's own samples (PPO, GRPO, Dr. GRPO, DAPO, RLOO); pure jnp.

Token-level arrays are [B, T] float32 with a `mask` [B, T]: 1 on the completion tokens that count,
0 on prompt and padding. Masked-out positions contribute nothing to any loss, statistic or
gradient whatever they hold (inf and nan included): inputs are replaced with `jnp.where` *before*
any arithmetic, because a product with 0 would turn an inf into a nan, in the value or in the
gradient. Every function is jit-able (no Python control flow on traced values); the ones that
return (loss, metrics) use the metric names TRL logs.
"""

import functools

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")
GROUP_NORMALIZATIONS = ("std", "none")


def _where(mask, x):
  """x on the mask, 0 elsewhere (and 0 in the gradient there, even where x is inf or nan)."""
  return jnp.where(jnp.asarray(mask) > 0, x, 0.0)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of x over entries where mask is 1 (along `axis`); 0 where there are none."""
  m = jnp.asarray(mask) > 0
  total = jnp.sum(jnp.where(m, x, 0.0), axis=axis)
  count = jnp.sum(m, axis=axis)
  return total / jnp.maximum(count, 1)


def _masked_var(x, mask):
  """Population variance (ddof=0) over the masked entries."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(_where(mask, x) - mean), mask)


def kl_penalty(
    logprobs: jax.Array,  # [B, T] log pi(y_t) of the sampled tokens, the policy that sampled them
    ref_logprobs: jax.Array,  # [B, T] log pi_ref(y_t)
    estimator: str,
    *,
    mask: jax.Array | None = None,  # [B, T]; if given, 0 (value and gradient) outside it
) -> jax.Array:  # [B, T]
  """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL
  divergence"), with log r = log pi_ref - log pi:
    k1 = -log r (unbiased, high variance, can be negative),
    k2 = (log r)^2 / 2 (biased, low variance),
    k3 = (r - 1) - log r (unbiased and >= 0).
  Pass `mask` when masked positions may hold inf: masking the output afterwards would leave a
  nan in the gradient (k3's exp of +inf)."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"estimator={estimator!r} is not one of {KL_ESTIMATORS}")
  log_r = ref_logprobs - logprobs
  if mask is not None:
    log_r = _where(mask, log_r)
  if estimator == "k1":
    return -log_r
  if estimator == "k2":
    return 0.5 * jnp.square(log_r)
  return jnp.expm1(log_r) - log_r


def adaptive_kl_coef(coef, observed_kl, num_steps, *, target: float, horizon: float):
  """The adaptive KL controller of Ziegler et al. 2019 (sec. 2.2), as TRL's AdaptiveKLController:
  e = clip(KL / target - 1, -0.2, 0.2); coef <- coef * (1 + e * num_steps / horizon).
  Python floats in give a Python float out; jnp scalars (traced or not) give a jnp scalar."""
  if not target > 0:
    raise ValueError(f"target={target} must be > 0")
  if not horizon > 0:
    raise ValueError(f"horizon={horizon} must be > 0")
  error = observed_kl / target - 1
  if isinstance(error, (int, float)):  # a Python number: stay off device
    error = min(max(error, -0.2), 0.2)
  else:
    error = jnp.clip(error, -0.2, 0.2)
  return coef * (1 + error * num_steps / horizon)


def gae(
    rewards: jax.Array,  # [B, T] per-token rewards (e.g. -beta * KL, plus the score on the last token)
    values: jax.Array,  # [B, T] V(s_t) from the value head
    mask: jax.Array,  # [B, T]
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:  # advantages, returns: [B, T] each, 0 outside the mask
  """Generalized advantage estimation (Schulman et al. 2016, eqs. 11-16):
  delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns = A + V.
  The episode ends after the last masked token of a row (V and A beyond it are 0); rewards and
  values outside the mask are ignored. Runs as one `lax.scan` over the reversed time axis. A hole
  in the middle of a row's mask would act as an episode boundary (completions are contiguous)."""
  m = jnp.asarray(mask) > 0
  r = jnp.where(m, rewards, 0.0).astype(jnp.float32)
  v = jnp.where(m, values, 0.0).astype(jnp.float32)

  def step(carry, xs):  # carry: V_{t+1}, A_{t+1}, each [B], already 0 past the episode's end
    next_value, next_adv = carry
    r_t, v_t, m_t = xs
    adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
    adv = jnp.where(m_t, adv, 0.0)
    return (v_t, adv), adv  # v_t is 0 off the mask, so a prompt position ends the recursion

  zeros = jnp.zeros(r.shape[0], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)  # [T, B]
  advantages = adv_tb.T
  returns = jnp.where(m, advantages + v, 0.0)
  return advantages, returns


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) with the mean and the population variance (ddof=0) over the
  masked entries, so the result has mean 0 and variance 1 there (TRL uses ddof=1; the two differ
  by n / (n - 1)). shift_mean=False adds the mean back (TRL's whitening of rewards). 0 off the mask."""
  mean = masked_mean(x, mask)
  out = (_where(mask, x) - mean) * jax.lax.rsqrt(_masked_var(x, mask) + eps)
  if not shift_mean:
    out = out + mean
  return _where(mask, out)


def normalizer(mask: jax.Array, mode: str, *, max_length: int | None = None) -> jax.Array:  # scalar float32
  """What `aggregate` divides by over `mask` [B, T]: the sequences with at least one token
  (sequence_mean), the tokens (token_mean), or B * max_length, max_length defaulting to T (fixed_length)."""
  if mode not in AGGREGATIONS:
    raise ValueError(f"mode={mode!r} is not one of {AGGREGATIONS}")
  m = jnp.asarray(mask) > 0
  if mode == "sequence_mean":
    return jnp.sum(jnp.any(m, axis=1)).astype(jnp.float32)
  if mode == "token_mean":
    return jnp.sum(m).astype(jnp.float32)
  batch, length = m.shape
  max_length = length if max_length is None else max_length
  if max_length <= 0:
    raise ValueError(f"max_length={max_length} must be positive")
  return jnp.asarray(batch * max_length, jnp.float32)


def aggregate(
    per_token_loss: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    mode: str,
    *,
    max_length: int | None = None,
    whole_mask: jax.Array | None = None,  # [B', T]: the whole batch's, when these rows are a micro-batch of it
) -> jax.Array:  # scalar
  """Reduce a per-token loss to a scalar:
  - sequence_mean: each sequence's mean over its tokens, then the mean over sequences that have
      at least one token (GRPO, Shao et al. 2024); long completions count less per token.
  - token_mean: sum over all masked tokens / their number (DAPO, Yu et al. 2025, sec. 3.3).
  - fixed_length: sum over masked tokens / (B * max_length), max_length defaulting to T
      (Dr. GRPO, Liu et al. 2025): a constant normalizer, so no length bias.
  The normalizer (`normalizer`) is counted on whole_mask when given: the sum over this batch is then
  its share of the whole batch's aggregate, and the shares of its micro-batches add up to it."""
  whole_count = normalizer(mask if whole_mask is None else whole_mask, mode, max_length=max_length)
  m = jnp.asarray(mask) > 0
  if mode == "sequence_mean":
    total = jnp.sum(masked_mean(per_token_loss, m, axis=1))  # a sequence without tokens adds 0
  else:
    total = jnp.sum(jnp.where(m, per_token_loss, 0.0))
  return total / jnp.maximum(whole_count, 1.0)


def clipped_surrogate(
    logprobs: jax.Array,  # [B, T] log pi_theta(y_t), being trained
    old_logprobs: jax.Array,  # [B, T] log pi_old(y_t), the policy that sampled the tokens
    advantages: jax.Array,  # [B, T] (broadcast a per-sequence advantage before the call)
    mask: jax.Array,  # [B, T]
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:  # per-token loss [B, T] (0 off the mask), metrics
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss, with DAPO's
  decoupled clip range (Yu et al. 2025, eq. 10, "clip-higher"): with ratio = pi_theta / pi_old,
  per-token loss = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)).
  policy/approx_kl is k3 with log r = log pi_theta - log pi_old, i.e. an estimate of
  KL(pi_old || pi_theta) from pi_old's samples, always >= 0 (as CleanRL logs it)."""
  if isinstance(clip_low, (int, float)) and not 0 <= clip_low < 1:
    raise ValueError(f"clip_low={clip_low} must be in [0, 1)")
  if isinstance(clip_high, (int, float)) and not clip_high >= 0:
    raise ValueError(f"clip_high={clip_high} must be >= 0")
  log_ratio = _where(mask, logprobs - old_logprobs)  # before exp, so masked infs never reach it
  ratio = jnp.exp(log_ratio)
  adv = _where(mask, advantages)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
  per_token = _where(mask, jnp.maximum(unclipped, clipped))
  metrics = {
      "policy/clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "policy/approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
      "policy/ratio_mean": masked_mean(ratio, mask),
  }
  return per_token, jax.lax.stop_gradient(metrics)


def clipped_policy_loss(
    logprobs: jax.Array,  # [B, T]
    old_logprobs: jax.Array,  # [B, T]
    advantages: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str = "token_mean",
    max_length: int | None = None,  # for aggregation='fixed_length'; defaults to T
    whole_mask: jax.Array | None = None,  # [B', T], see `aggregate`
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`clipped_surrogate` reduced to a scalar by `aggregate` (a share of the whole batch's with
  whole_mask); metrics['policy/loss'] is the aggregate over this batch alone."""
  per_token, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                         clip_high=clip_high)
  reduce = functools.partial(aggregate, per_token, mask, aggregation, max_length=max_length)
  metrics["policy/loss"] = jax.lax.stop_gradient(reduce())
  return reduce(whole_mask=whole_mask), metrics


def clipped_value_loss(
    values: jax.Array,  # [B, T] V_theta(s_t), being trained
    old_values: jax.Array,  # [B, T] the values at rollout time
    returns: jax.Array,  # [B, T] targets (from `gae`)
    mask: jax.Array,  # [B, T]
    *,
    clip: float,
    whole_mask: jax.Array | None = None,  # [B', T], see `aggregate`
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped value loss (as in OpenAI baselines and TRL's PPOTrainer):
  0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2), mean over masked tokens (the
  whole batch's with whole_mask, as `aggregate`); metrics['value/loss'] is the mean over this batch."""
  v, old, ret = _where(mask, values), _where(mask, old_values), _where(mask, returns)
  v_clipped = jnp.clip(v, old - clip, old + clip)
  loss_unclipped = jnp.square(v - ret)
  loss_clipped = jnp.square(v_clipped - ret)
  reduce = functools.partial(aggregate, 0.5 * jnp.maximum(loss_unclipped, loss_clipped), mask, "token_mean")
  loss = reduce(whole_mask=whole_mask)
  metrics = {
      "value/loss": reduce(),
      "value/clip_fraction": masked_mean((loss_clipped > loss_unclipped).astype(jnp.float32), mask),
      "value/explained_variance": explained_variance(v, ret, mask),
      "value/mean": masked_mean(v, mask),
  }
  return loss, jax.lax.stop_gradient(metrics)


def explained_variance(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var[targets - predictions] / Var[targets] over the masked entries: 1 is perfect, 0 no
  better than the targets' mean, < 0 worse. Where Var[targets] is 0 this returns 0.0 rather than
  the nan of SB3/CleanRL, so the metric stays finite for logging and averaging."""
  var_targets = _masked_var(targets, mask)
  var_residual = _masked_var(_where(mask, targets) - _where(mask, predictions), mask)
  safe = jnp.where(var_targets > 0, var_targets, 1.0)
  return jnp.where(var_targets > 0, 1 - var_residual / safe, 0.0)


def entropy_from_logits(logits: jax.Array) -> jax.Array:  # [B, T, V] -> [B, T]
  """-sum_v p_v log p_v in float32; -inf logits (masked vocabulary) contribute 0, in the value
  and in the gradient (0 * -inf would be nan)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  p = jnp.exp(logp)
  finite = jnp.isfinite(logp)
  return -jnp.sum(jnp.where(finite, p * jnp.where(finite, logp, 0.0), 0.0), axis=-1)


def _groups(rewards, group_size):  # [B] -> [B // G, G]
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be >= 1")
  (batch,) = rewards.shape
  if batch % group_size:
    raise ValueError(f"batch size {batch} is not a multiple of group_size={group_size}")
  return jnp.asarray(rewards, jnp.float32).reshape(batch // group_size, group_size)


def group_advantages(
    rewards: jax.Array,  # [B], rows p*G .. p*G + G - 1 answer prompt p
    group_size: int,
    *,
    normalize: str = "std",
    eps: float = 1e-6,
) -> jax.Array:  # [B]
  """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2):
  normalize='std': (r - mean_group) / (std_group + eps), std with ddof=1 (torch.std, as TRL);
  normalize='none': r - mean_group (Dr. GRPO, Liu et al. 2025, which drops the std's bias)."""
  if normalize not in GROUP_NORMALIZATIONS:
    raise ValueError(f"normalize={normalize!r} is not one of {GROUP_NORMALIZATIONS}")
  if normalize == "std" and group_size < 2:
    raise ValueError(f"group_size={group_size} must be >= 2 for the sample std (ddof=1)")
  r = _groups(rewards, group_size)  # [B // G, G]
  centered = r - jnp.mean(r, axis=1, keepdims=True)
  if normalize == "std":
    centered = centered / (jnp.std(r, axis=1, keepdims=True, ddof=1) + eps)
  return centered.reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:  # [B] -> [B]
  """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to basics", eq. 5):
  A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j over the G samples of the same prompt."""
  if group_size < 2:
    raise ValueError(f"group_size={group_size} must be >= 2 for a leave-one-out baseline")
  r = _groups(rewards, group_size)  # [B // G, G]
  baseline = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - baseline).reshape(-1)
