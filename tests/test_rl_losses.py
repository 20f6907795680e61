"""RL losses and estimators against float64 numpy and plain-Python references written here.

The functions run under `jax.jit` (hyperparameters traced where the module allows it), so the file
compiles a few dozen small programs instead of every primitive one by one; that keeps it fast and
checks that everything jits. ValueErrors are checked on the plain functions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import rl_losses

RNG = np.random.default_rng(0)
B, T = 4, 8
PROMPT_LENS, COMPLETION_LENS = (2, 0, 3, 1), (4, 8, 1, 0)  # ragged rows; the last has no tokens


def _mask(prompt_lens=PROMPT_LENS, completion_lens=COMPLETION_LENS, length=T):
  mask = np.zeros((len(prompt_lens), length), np.float32)
  for b, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
    mask[b, p:p + c] = 1
  return mask


MASK = _mask()
ON = MASK > 0

gae = jax.jit(rl_losses.gae)
whiten = jax.jit(rl_losses.whiten, static_argnames="shift_mean")
masked_mean = jax.jit(rl_losses.masked_mean, static_argnames="axis")
aggregate = jax.jit(rl_losses.aggregate, static_argnames=("mode", "max_length"))
clipped_value_loss = jax.jit(rl_losses.clipped_value_loss)
explained_variance = jax.jit(rl_losses.explained_variance)
entropy_from_logits = jax.jit(rl_losses.entropy_from_logits)
group_advantages = jax.jit(rl_losses.group_advantages, static_argnames=("group_size", "normalize"))
rloo_advantages = jax.jit(rl_losses.rloo_advantages, static_argnames="group_size")


@jax.jit
def kl_all(logp, ref, mask):
  """{estimator: (unmasked, masked)} per-token estimates."""
  return {e: (rl_losses.kl_penalty(logp, ref, e), rl_losses.kl_penalty(logp, ref, e, mask=mask))
          for e in rl_losses.KL_ESTIMATORS}


@jax.jit
def policy_all_modes(logp, old, adv, mask, clip_low, clip_high):
  """{aggregation: (loss, metrics)}, plus 'fixed_length_10' with max_length=10."""
  loss = functools.partial(rl_losses.clipped_policy_loss, logp, old, adv, mask, clip_low=clip_low,
                           clip_high=clip_high)
  out = {mode: loss(aggregation=mode) for mode in rl_losses.AGGREGATIONS}
  out["fixed_length_10"] = loss(aggregation="fixed_length", max_length=10)
  return out


def _corrupt(x, fill):
  """x with every masked-out (prompt and padding) position replaced by `fill`."""
  return np.where(ON, x, fill).astype(np.float32)


# -- GAE ---------------------------------------------------------------------------------------


def _gae_ref(rewards, values, mask, gamma, lam):
  """Plain-Python backwards loop over each row's completion tokens; the episode ends after the last."""
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    last_adv, next_value = 0.0, 0.0
    for t in reversed(np.flatnonzero(mask[b])):
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      last_adv = delta + gamma * lam * last_adv
      adv[b, t], next_value = last_adv, float(values[b, t])
  return adv, np.where(mask > 0, adv + values, 0.0)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_a_backwards_loop_on_ragged_rows(gamma, lam):
  rewards, values = RNG.normal(size=(B, T)), RNG.normal(size=(B, T))
  expected_adv, expected_ret = _gae_ref(rewards, values, MASK, gamma, lam)
  # Prompt and padding hold garbage, which must be ignored.
  adv, ret = gae(_corrupt(rewards, np.nan), _corrupt(values, 1e30), MASK, gamma=gamma, lam=lam)
  np.testing.assert_allclose(adv, expected_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, expected_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[~ON] == 0) and np.all(np.asarray(ret)[~ON] == 0)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
  rewards, values = RNG.normal(size=(B, T)), RNG.normal(size=(B, T))
  adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
  to_go = np.where(ON, np.cumsum(np.where(ON, rewards, 0)[:, ::-1], axis=1)[:, ::-1], 0)
  np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adv, np.where(ON, to_go - values, 0), rtol=1e-5, atol=1e-5)


# -- whitening, masked mean, aggregation ----------------------------------------------------------


def test_whiten_has_mean_zero_and_variance_one_on_the_mask():
  x = RNG.normal(3.0, 2.0, size=(B, T))
  mean, std = x[ON].mean(), x[ON].std()
  out = np.asarray(whiten(_corrupt(x, np.inf), MASK))
  np.testing.assert_allclose(out[ON], (x[ON] - mean) / std, rtol=1e-4, atol=1e-5)
  assert abs(out[ON].mean()) < 1e-5 and abs(out[ON].var() - 1) < 1e-4
  assert np.all(out[~ON] == 0)
  kept = np.asarray(whiten(_corrupt(x, -np.inf), MASK, shift_mean=False))
  np.testing.assert_allclose(kept[ON].mean(), mean, rtol=1e-5)
  np.testing.assert_allclose(kept[ON].var(), 1.0, rtol=1e-4)
  assert np.all(kept[~ON] == 0)


def test_masked_mean():
  x = RNG.normal(size=(B, T))
  np.testing.assert_allclose(masked_mean(_corrupt(x, np.nan), MASK), x[ON].mean(), rtol=1e-5)
  rows = np.asarray(masked_mean(_corrupt(x, np.inf), MASK, axis=1))
  expected = [x[b, ON[b]].mean() if ON[b].any() else 0.0 for b in range(B)]  # an empty row gives 0
  np.testing.assert_allclose(rows, expected, rtol=1e-5)


def test_aggregation_modes_against_numpy():
  x = RNG.normal(size=(B, T))
  seq_means = [x[b, ON[b]].mean() for b in range(B) if ON[b].any()]  # the empty last row is left out
  expected = {
      "sequence_mean": np.mean(seq_means),
      "token_mean": x[ON].sum() / ON.sum(),
      "fixed_length": x[ON].sum() / (B * T),
  }
  for mode, value in expected.items():
    np.testing.assert_allclose(aggregate(_corrupt(x, np.inf), MASK, mode), value, rtol=1e-5, err_msg=mode)
  np.testing.assert_allclose(aggregate(x, MASK, "fixed_length", max_length=20), x[ON].sum() / (B * 20), rtol=1e-5)
  with pytest.raises(ValueError, match="mode='mean'"):
    rl_losses.aggregate(x, MASK, "mean")
  with pytest.raises(ValueError, match="max_length=0"):
    rl_losses.aggregate(x, MASK, "fixed_length", max_length=0)


# -- KL -------------------------------------------------------------------------------------------


def test_kl_estimators_match_their_definitions():
  logp, ref = RNG.normal(-3, 2, size=(B, T)), RNG.normal(-3, 2, size=(B, T))
  log_r = ref - logp
  expected = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": (np.exp(log_r) - 1) - log_r}
  plain, masked = kl_all(logp, ref, MASK), kl_all(_corrupt(logp, -np.inf), ref, MASK)
  for name, value in expected.items():
    np.testing.assert_allclose(plain[name][0], value, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(masked[name][1], np.where(ON, value, 0), rtol=1e-5, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="estimator='k4'"):
    rl_losses.kl_penalty(logp, ref, "k4")


def test_k3_is_nonnegative_and_unbiased_on_samples_of_a_categorical_policy():
  wide = RNG.uniform(-20, 20, size=(64, 64))
  assert np.all(np.asarray(kl_all(np.zeros_like(wide), wide, np.ones_like(wide))["k3"][0]) >= 0)
  p, q = np.array([0.4, 0.3, 0.2, 0.1]), np.full(4, 0.25)
  true_kl = np.sum(p * np.log(p / q))  # 0.1064
  tokens = np.random.default_rng(1234).choice(4, size=200_000, p=p)
  logp, ref = np.log(p)[tokens].reshape(400, 500), np.log(q)[tokens].reshape(400, 500)
  estimates = kl_all(logp, ref, np.ones_like(logp))
  # Standard errors of the 200k-sample means: k3 3.6e-4, k1 9.5e-4; the tolerances are > 5 of them.
  assert np.mean(np.asarray(estimates["k3"][0], np.float64)) == pytest.approx(true_kl, abs=2e-3)
  assert np.mean(np.asarray(estimates["k1"][0], np.float64)) == pytest.approx(true_kl, abs=5e-3)


def test_adaptive_kl_coef_follows_ziegler_with_clipping():
  coef, target, horizon, n = 0.1, 6.0, 10_000, 256
  on_device = jax.jit(functools.partial(rl_losses.adaptive_kl_coef, target=target, horizon=horizon))
  cases = {6.6: 0.1, 6.0: 0.0, 5.4: -0.1, 100.0: 0.2, 0.0: -0.2}  # observed KL -> clipped error
  for observed, error in cases.items():
    expected = coef * (1 + error * n / horizon)
    new = rl_losses.adaptive_kl_coef(coef, observed, n, target=target, horizon=horizon)
    assert isinstance(new, float) and new == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(on_device(np.float32(coef), np.float32(observed), n), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="target=0"):
    rl_losses.adaptive_kl_coef(coef, 1.0, n, target=0, horizon=horizon)


# -- clipped objectives ---------------------------------------------------------------------------

# Two rows, T=4: row 0 has a prompt token then 3 completion tokens, row 1 four completion tokens.
POLICY_MASK = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.float32)
RATIOS = np.array([[9.0, 1.5, 0.5, 0.5], [1.5, 1.1, 1.0, 0.9]])
ADVANTAGES = np.array([[7.0, 2.0, 2.0, -1.0], [-1.0, 3.0, -0.5, 1.0]])
# By hand, clip range [0.8, 1.28]; max(-A r, -A clip(r)):
#   r=1.5 A=2:  max(-3.0, -2.56) = -2.56 (clipped)   r=0.5 A=2:  max(-1.0, -1.6) = -1.0
#   r=0.5 A=-1: max(0.5, 0.8) = 0.8 (clipped)        r=1.5 A=-1: max(1.5, 1.28) = 1.5
#   r=1.1 A=3:  -3.3 (inside)   r=1.0 A=-0.5: 0.5   r=0.9 A=1: -0.9
# Per token [-2.56, -1.0, 0.8] and [1.5, -3.3, 0.5, -0.9]: row sums -2.76 and -2.2, total -4.96.


def test_clipped_policy_loss_by_hand():
  old = RNG.normal(-2.0, 0.5, size=(2, 4))
  logp = old + np.log(RATIOS)
  expected = {"token_mean": -4.96 / 7, "sequence_mean": (-2.76 / 3 - 2.2 / 4) / 2, "fixed_length": -4.96 / 8,
              "fixed_length_10": -4.96 / 20}
  out = policy_all_modes(logp, old, ADVANTAGES, POLICY_MASK, 0.2, 0.28)
  for mode, value in expected.items():
    np.testing.assert_allclose(out[mode][0], value, rtol=1e-5, err_msg=mode)
  metrics = out["token_mean"][1]
  np.testing.assert_allclose(metrics["policy/clip_fraction"], 2 / 7, rtol=1e-6)
  r = RATIOS[POLICY_MASK > 0]
  np.testing.assert_allclose(metrics["policy/ratio_mean"], r.mean(), rtol=1e-5)  # = 1.0
  np.testing.assert_allclose(metrics["policy/approx_kl"], np.mean((r - 1) - np.log(r)), rtol=1e-4)


def test_clipped_policy_loss_against_numpy_on_random_inputs():
  logp, old, adv = (RNG.normal(0, 0.3, size=(B, T)) for _ in range(3))
  old = logp + old
  ratio = np.exp(logp - old)
  unclipped, clipped = -adv * ratio, -adv * np.clip(ratio, 0.9, 1.3)
  loss, metrics = policy_all_modes(logp, old, adv, MASK, 0.1, 0.3)["token_mean"]
  np.testing.assert_allclose(loss, np.maximum(unclipped, clipped)[ON].mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["policy/clip_fraction"], np.mean((clipped > unclipped)[ON]), rtol=1e-6)
  with pytest.raises(ValueError, match="clip_low=1.5"):
    rl_losses.clipped_policy_loss(logp, old, adv, MASK, clip_low=1.5, clip_high=0.3)


def test_clipped_value_loss_by_hand():
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  values = np.array([[1.0, 1.0, 0.6, 5.0], [-1.0, -1.0, 5.0, 5.0]], np.float32)
  old = np.array([[0.5, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  returns = np.array([[2.0, 0.0, 3.0, 0.0], [0.0, -3.0, 0.0, 0.0]], np.float32)
  # clip 0.2; (unclipped, clipped) squared errors: (1, 1.69)* (1, 0.49) (5.76, 5.76) (1, 0.04) (4, 7.84)*
  loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2)
  np.testing.assert_allclose(loss, 0.5 * (1.69 + 1 + 5.76 + 1 + 7.84) / 5, rtol=1e-5)
  np.testing.assert_allclose(metrics["value/clip_fraction"], 2 / 5, rtol=1e-6)
  np.testing.assert_allclose(metrics["value/mean"], 0.12, rtol=1e-5)
  v, ret = values[mask > 0].astype(np.float64), returns[mask > 0].astype(np.float64)
  np.testing.assert_allclose(metrics["value/explained_variance"], 1 - np.var(ret - v) / np.var(ret), rtol=1e-5)


def test_explained_variance():
  y, noise = RNG.normal(size=(B, T)), RNG.normal(0, 0.5, size=(B, T))
  pred = y + noise
  expected = 1 - np.var((y - pred)[ON]) / np.var(y[ON])
  np.testing.assert_allclose(explained_variance(_corrupt(pred, np.inf), _corrupt(y, -np.inf), MASK), expected,
                             rtol=1e-4)
  np.testing.assert_allclose(explained_variance(y, y, MASK), 1.0, rtol=1e-6)
  np.testing.assert_allclose(explained_variance(np.full_like(y, y[ON].mean()), y, MASK), 0.0, atol=1e-6)
  assert float(explained_variance(y, np.full_like(y, 2.0), MASK)) == 0.0  # Var[targets] = 0: 0, not nan


# -- entropy --------------------------------------------------------------------------------------


def test_entropy_from_logits_with_masked_vocabulary():
  logits = RNG.normal(0, 2, size=(2, 3, 6))
  logits[0, 1, :3] = -np.inf
  logits[1, 2, 5] = -np.inf
  expected = np.zeros((2, 3))
  for i in np.ndindex(2, 3):
    z = logits[i][np.isfinite(logits[i])]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    expected[i] = -np.sum(p * np.log(p))
  np.testing.assert_allclose(entropy_from_logits(logits), expected, rtol=1e-5)
  from_bf16 = entropy_from_logits(jnp.asarray(logits, jnp.bfloat16))
  assert from_bf16.dtype == jnp.float32
  np.testing.assert_allclose(from_bf16, expected, rtol=3e-2)
  np.testing.assert_allclose(entropy_from_logits(np.zeros((1, 1, 7))), [[np.log(7)]], rtol=1e-6)
  grad = jax.jit(jax.grad(lambda x: rl_losses.entropy_from_logits(x).sum()))(jnp.asarray(logits, jnp.float32))
  assert np.all(np.isfinite(grad))


# -- group baselines ------------------------------------------------------------------------------


def test_group_advantages_use_the_sample_std():
  g = 4
  rewards = RNG.normal(size=3 * g)
  rewards[8:] = 1.0  # a group with one answer: all advantages 0
  expected_std, expected_none = np.zeros(3 * g), np.zeros(3 * g)
  for p in range(3):
    group = rewards[p * g:(p + 1) * g]
    expected_none[p * g:(p + 1) * g] = group - group.mean()
    expected_std[p * g:(p + 1) * g] = (group - group.mean()) / (np.std(group, ddof=1) + 1e-6)
  np.testing.assert_allclose(group_advantages(rewards, g), expected_std, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(group_advantages(rewards, g, normalize="none"), expected_none, atol=1e-6)
  with pytest.raises(ValueError, match="group_size=5"):
    rl_losses.group_advantages(rewards, 5)
  with pytest.raises(ValueError, match="normalize='mad'"):
    rl_losses.group_advantages(rewards, g, normalize="mad")


def test_rloo_advantages():
  np.testing.assert_allclose(rloo_advantages(np.arange(1.0, 7.0), 3), [-1.5, 0, 1.5, -1.5, 0, 1.5])
  rewards, g = RNG.normal(size=10), 5
  expected = [rewards[i] - np.mean([rewards[j] for j in range(i // g * g, i // g * g + g) if j != i])
              for i in range(10)]
  np.testing.assert_allclose(rloo_advantages(rewards, g), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="group_size=1"):
    rl_losses.rloo_advantages(rewards, 1)


# -- masks ----------------------------------------------------------------------------------------


@jax.jit
def _all_losses(logp, old, adv, values, old_values, returns):
  """Every loss and statistic that takes a mask, as one flat dict."""
  out = {}
  for mode, (loss, metrics) in policy_all_modes(logp, old, adv, MASK, 0.2, 0.28).items():
    out.update({f"policy_{mode}": loss, **{f"{mode}_{k}": v for k, v in metrics.items()}})
  loss, metrics = rl_losses.clipped_value_loss(values, old_values, returns, MASK, clip=0.2)
  out.update({"value": loss, **metrics})
  out["kl"] = rl_losses.masked_mean(rl_losses.kl_penalty(logp, old, "k3", mask=MASK), MASK)
  out["whiten"] = rl_losses.whiten(adv, MASK)
  out["gae"], _ = rl_losses.gae(adv, values, MASK, gamma=0.9, lam=0.8)
  out["explained_variance"] = rl_losses.explained_variance(values, returns, MASK)
  return out


@jax.jit
def _grads(logp, old, adv, values, old_values, returns):
  """d(sum of the policy losses)/d logp, d(value loss)/d values, d(mean k3)/d logp."""
  def policy(lp):
    return sum(loss for loss, _ in policy_all_modes(lp, old, adv, MASK, 0.2, 0.28).values())

  def value(v):
    return rl_losses.clipped_value_loss(v, old_values, returns, MASK, clip=0.2)[0]

  def kl(lp):
    return rl_losses.masked_mean(rl_losses.kl_penalty(lp, old, "k3", mask=MASK), MASK)

  return jax.grad(policy)(logp), jax.grad(value)(values), jax.grad(kl)(logp)


def test_masked_positions_change_no_loss_and_no_gradient():
  clean = [RNG.normal(0, 0.3, size=(B, T)).astype(np.float32) for _ in range(6)]
  clean[1] = clean[0] + clean[1]
  # (logprobs, old_logprobs, advantages, values, old_values, returns) at prompt and padding
  fills = [(np.inf, -np.inf, np.inf, -np.inf, 1e30, -1e30), (-np.inf, np.inf, -1e30, 1e30, np.nan, np.inf)]
  reference, reference_grads = _all_losses(*clean), _grads(*clean)
  for fill in fills:
    dirty = [_corrupt(x, f) for x, f in zip(clean, fill)]
    for name, value in _all_losses(*dirty).items():
      np.testing.assert_allclose(value, reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for got, want in zip(_grads(*dirty), reference_grads):
      got = np.asarray(got)
      assert np.all(np.isfinite(got)) and np.all(got[~ON] == 0)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
