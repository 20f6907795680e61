"""GRPO's dynamic sampling (DAPO): which rows an iteration trains on, over which sampling rounds,
and why dropping a group whose rewards are all alike changes the gradient's scale only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import grpo, rl_losses
from configs.align.common import align_config

GROUP = 2


def _config(want, *, max_rounds=8, sampling_prompts=4):
  c = align_config("grpo")
  c.rl.samples_per_prompt = GROUP
  c.rl.prompts_per_iteration = want
  c.grpo.dynamic_sampling = True
  c.grpo.sampling_prompts = sampling_prompts
  c.grpo.max_sampling_rounds = max_rounds
  return c


def _rounds(scores_by_round):
  """A sample_round whose round k has the given scores [4 prompts x GROUP]; each row's 'tokens' is
  its (round, row) id, so the test can see which rows were kept, and in what order."""
  calls = []

  def sample_round(k):
    calls.append(k)
    scores = np.asarray(scores_by_round[k], np.float32)
    ids = np.asarray([[k, r] for r in range(len(scores))], np.int32)
    return {"tokens": ids, "mask": np.ones_like(ids)}, scores

  return sample_round, calls


def test_an_iteration_keeps_the_first_groups_whose_rewards_differ_over_as_many_rounds_as_it_takes():
  #         prompt 0  prompt 1  prompt 2  prompt 3
  by_round = {5: [1, 1, 0, 1, 0, 0, 1, 1],   # one group with a signal: prompt 1
              6: [1, 0, 0, 0, 0.5, 1, 1, 1],  # two: prompts 0 and 2
              7: [1, 0] * 4}                  # never sampled: three groups are found by round 6
  sample_round, calls = _rounds(by_round)
  rows, scores, state, summary = grpo.groups_with_signal(sample_round, _config(3), {"sampling_rounds": 5, "kl": 1})
  assert calls == [5, 6]
  assert state == {"sampling_rounds": 7, "kl": 1}  # the run-long count advanced, the rest kept
  assert rows["tokens"].tolist() == [[5, 2], [5, 3], [6, 0], [6, 1], [6, 4], [6, 5]]
  np.testing.assert_array_equal(scores, [0, 1, 1, 0, 0.5, 1])
  assert summary["rounds"] == 2 and summary["groups_with_signal"] == 3
  assert summary["sampled_reward"] == pytest.approx(np.mean(by_round[5] + by_round[6]))


def test_flat_groups_fill_the_iteration_when_the_rounds_run_out():
  by_round = {0: [1, 1, 0, 1, 0, 0, 1, 1], 1: [1, 1, 1, 1, 0, 0, 0, 1]}
  sample_round, calls = _rounds(by_round)
  rows, scores, state, summary = grpo.groups_with_signal(sample_round, _config(4, max_rounds=2), {})
  assert calls == [0, 1] and state == {"sampling_rounds": 2}
  # The two groups with a signal first (round 0's prompt 1, round 1's prompt 3), then the first flat
  # groups in the order sampled (round 0's prompts 0 and 2).
  assert rows["tokens"].tolist() == [[0, 2], [0, 3], [1, 6], [1, 7], [0, 0], [0, 1], [0, 4], [0, 5]]
  np.testing.assert_array_equal(scores, [0, 1, 0, 1, 1, 1, 0, 0])
  assert summary["groups_with_signal"] == 2


def test_a_flat_group_adds_no_gradient_and_dropping_it_rescales_the_rest():
  """GRPO's premise for dropping flat groups: a group with equal rewards has advantage 0 on every
  token, so (kl_coef 0) its rows' gradient is exactly 0, and the others' gradient with it dropped is
  the full batch's times (rows with tokens in the full batch / in the kept one), sequence_mean."""
  rng = np.random.default_rng(0)
  scores = np.asarray([1, 0, 1, 1, 0, 1, 0, 0], np.float32)  # groups of 2: signal, flat, signal, flat
  mask = (rng.random((8, 6)) < 0.8).astype(np.float32)
  mask[:, 0] = 1
  old = jnp.asarray(rng.normal(size=(8, 6)) - 2.0, jnp.float32)
  logprobs = old + jnp.asarray(rng.normal(size=(8, 6)) * 0.1, jnp.float32)
  advantages = rl_losses.group_advantages(jnp.asarray(scores), GROUP)

  def loss(logprobs, rows):
    adv = jnp.broadcast_to(advantages[rows][:, None], (len(rows), 6))
    per_token, _ = rl_losses.clipped_surrogate(logprobs, old[rows], adv, mask[rows], clip_low=0.2, clip_high=0.2)
    return rl_losses.aggregate(per_token, mask[rows], "sequence_mean")

  full = np.asarray(jax.grad(loss)(logprobs, np.arange(8)))
  kept_rows = np.asarray([0, 1, 4, 5])
  kept = np.asarray(jax.grad(loss)(logprobs[kept_rows], kept_rows))
  np.testing.assert_array_equal(full[[2, 3, 6, 7]], 0.0)
  assert np.abs(full[kept_rows]).sum(axis=1).min() > 0  # every signal row does carry a gradient
  np.testing.assert_allclose(kept, full[kept_rows] * 8 / 4, rtol=1e-6)

