"""The online methods' machinery without a model: sample rows and their masks, schedules, the
experience source's exact resume, prompt batches, ReST/RAFT/best-of-N filters, STaR's hinting
path, PPO's per-token rewards and GAE, the task's graded reward and step-by-step's split."""

import json

import numpy as np
import pytest

from align import distill, online, ppo, rest, rewards, rollout, tasks
from align.tasks import arithmetic
from train import flops as flops_lib
from train import trainer


def test_token_rows_mask_only_the_completion_targets():
  rows = rollout.token_rows([[2, 10, 11], [2, 12]], [[20, 21, 3], [22]], seq_len=6)
  np.testing.assert_array_equal(rows["tokens"], [[2, 10, 11, 20, 21, 0], [2, 12, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[10, 11, 20, 21, 3, 0], [12, 22, 0, 0, 0, 0]])
  # target j is token j + 1: the completion's tokens are the targets from len(prompt) - 1 on
  np.testing.assert_array_equal(rows["mask"], [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
  cut = rollout.token_rows([[2, 10]], [[20, 21, 22, 23]], seq_len=3)  # too long: the end goes
  np.testing.assert_array_equal(cut["targets"], [[10, 20, 21]])
  np.testing.assert_array_equal(cut["mask"], [[0, 1, 1]])
  with pytest.raises(ValueError, match="prompt 0 has 5 tokens"):
    rollout.token_rows([[1, 2, 3, 4, 5]], [[6]], seq_len=4)


def test_sft_rows_are_the_next_token_loss_fields():
  rows = rollout.sft_rows([[2, 10, 11]], [[20, 3]], seq_len=6)
  np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 4, 5]])


def test_schedules():
  s = rollout.epoch_schedule(10, 4, epochs=3, seed=0)
  assert s.shape == (6, 4)  # two minibatches of 4 per epoch (2 rows left out of each)
  for epoch in range(3):
    assert len(set(s[2 * epoch: 2 * epoch + 2].ravel())) == 8
  assert not np.array_equal(s[:2], s[2:4])  # a fresh permutation each epoch
  c = rollout.cycle_schedule(np.array([5, 6, 7]), 4, steps=3, seed=1)
  assert c.shape == (3, 4) and set(c.ravel()) == {5, 6, 7}
  counts = np.bincount(c.ravel())[5:]
  assert counts.max() - counts.min() <= 1  # whole shuffled passes
  with pytest.raises(ValueError, match="cannot fill one minibatch"):
    rollout.epoch_schedule(3, 4, epochs=1, seed=0)


def _counting_collect(calls):
  def collect(iteration, state):
    calls.append(iteration)
    rows = {"x": np.arange(6) + 100 * iteration, "y": np.full((6, 2), iteration)}
    state = {"total": state.get("total", 0) + iteration}
    return rollout.Experience(rows, rollout.epoch_schedule(6, 2, epochs=2, seed=iteration)), state
  return collect


def test_experience_source_resumes_on_the_same_samples(tmp_path):
  calls = []
  it = iter(rollout.ExperienceSource(_counting_collect(calls), workdir=tmp_path, batch_size=2))
  first = [next(it)["x"].tolist() for _ in range(8)]  # 6 minibatches per iteration: into iteration 1
  assert calls == [0, 1]
  saved = json.loads(json.dumps(it.get_state()))
  rest_of_run = [next(it)["x"].tolist() for _ in range(10)]
  assert calls == [0, 1, 2]
  assert all(v // 100 == 0 for batch in first[:6] for v in batch)

  resumed_calls = []
  again = iter(rollout.ExperienceSource(_counting_collect(resumed_calls), workdir=tmp_path, batch_size=2))
  again.set_state(saved)
  assert [next(again)["x"].tolist() for _ in range(10)] == rest_of_run
  assert resumed_calls == [2]  # iteration 1 came back from the workdir, not from a new collect
  assert again.get_state()["method_state"] == {"total": 0 + 1}  # the state going into iteration 2's collect


def test_experience_source_reports_each_collect_s_metered_flops_once(tmp_path):
  """What a collect counts on the source's meter is its experience's FLOPs, reported on its first
  minibatch only (train.trainer.FLOPS), kept in its file, and not reported again by a resumed source."""
  meter = flops_lib.Meter()
  inner = _counting_collect([])

  def collect(iteration, state):
    meter.add(1000.0 * (iteration + 1))
    return inner(iteration, state)

  meter.add(5.0)  # counted before any collect: no experience's cost
  it = iter(rollout.ExperienceSource(collect, workdir=tmp_path, batch_size=2, meter=meter))
  reported = [next(it).get(trainer.FLOPS) for _ in range(8)]  # 6 minibatches per iteration
  assert reported == [1000.0, None, None, None, None, None, 2000.0, None]
  assert rollout.load_experience(rollout.experience_path(tmp_path, 1))[0].flops == 2000.0
  again = iter(rollout.ExperienceSource(collect, workdir=tmp_path, batch_size=2, meter=meter))
  again.set_state(json.loads(json.dumps(it.get_state())))
  assert [next(again).get(trainer.FLOPS) for _ in range(5)] == [None, None, None, None, 3000.0]


def test_prompt_batches_walk_shuffled_passes():
  pool = [f"p{i}" for i in range(5)]
  batches = [online.prompt_batch(pool, i, 2, seed=3) for i in range(5)]
  flat = sum(batches, [])
  assert sorted(flat[:5]) == pool and sorted(flat[5:10]) == pool  # each pass covers the pool once
  assert online.prompt_batch(pool, 3, 2, seed=3) == batches[3]  # a pure function of the iteration


def test_rest_raft_and_best_of_n_filters():
  scores = np.array([0.2, 0.9, 0.5, 1.0, 0.5, 0.0])
  phases = rest.select_rest(scores, (0.5, 0.9, 1.0))
  assert [p.tolist() for p in phases] == [[1, 2, 3, 4], [1, 3], [3]]  # each Improve step keeps fewer, better
  assert rest.select_raft(scores, 0.5, 0.0).tolist() == [1, 2, 3]  # top 3 of 6; the tie 0.5 goes to the earlier row
  assert rest.select_raft(scores, 0.5, 0.6).tolist() == [1, 3]  # ... and never below min_reward
  assert rest.select_best_of_n(scores, 3, 0.0).tolist() == [1, 3]
  assert rest.select_best_of_n(np.array([0.0, 0.0, 1.0, 0.0]), 2, 1.0).tolist() == [2]


class _ScriptedTokenizer:
  bos_id, eos_id, vocab_size = 1, 2, 100

  def encode(self, text):
    return [ord(ch) % 90 + 5 for ch in text]


def _exact(problems):
  """The arithmetic task's exact reward for these arithmetic.Problems."""
  task = tasks.get_task({"name": "arithmetic", "difficulty": 1})
  wrapped = [arithmetic._task_problem(p, 0) for p in problems]
  return rewards.task_reward(task, "exact", wrapped), {p.prompt: p.hint() for p in wrapped}


def test_star_rationalizes_failures_with_a_hint_and_trains_without_it():
  problems = [arithmetic.Problem(2, 3, "+"), arithmetic.Problem(4, 4, "+")]
  prompts = [p.prompt for p in problems]
  reward, hints = _exact(problems)
  seen = []

  def sampler(batch, iteration, n=None):
    seen.append(list(batch))
    if len(seen) == 1:  # first pass: right for 2 + 3, wrong for 4 + 4
      texts = [" 2 + 3 = 5, write 5.\nAnswer: 5", " 4 + 4 = 9, write 9.\nAnswer: 9"]
    else:  # the rationalization, asked with the answer as a hint
      texts = [" 4 + 4 = 8, write 8.\nAnswer: 8"]
    ids = [[50 + i] for i in range(len(texts))]
    return rollout.Samples([[1, 7]] * len(texts), ids, np.ones(len(texts), bool), texts)

  keep, summary = rest._star_samples(sampler, _ScriptedTokenizer(), prompts, 0, reward, 1.0, hints.__getitem__)
  assert seen[1] == [problems[1].hinted_prompt] and "the answer is 8" in seen[1][0]
  assert summary == {"reward": 0.5, "rationalized": 1, "failed": 1}
  assert len(keep) == 2
  # the rationalization is trained after the plain prompt, not the hinted one
  assert keep[1][0] == [1, *_ScriptedTokenizer().encode(problems[1].prompt)] and keep[1][1] == [50]


def test_ppo_rewards_are_the_kl_penalty_plus_the_score_at_the_end():
  rng = np.random.default_rng(0)
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], np.int32)
  old, ref, values = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(3))
  scores = np.array([1.0, -0.5], np.float32)
  kl_coef, gamma, lam = 0.1, 0.9, 0.8
  advantages, returns, kl = ppo._advantages(old, ref, values, scores, mask, kl_coef, estimator="k1", gamma=gamma, lam=lam)
  expected_adv, expected_kl = np.zeros(mask.shape), np.zeros(2)
  for b in range(2):
    idx = np.flatnonzero(mask[b])
    r = -kl_coef * (old[b, idx] - ref[b, idx]).astype(np.float64)
    r[-1] += scores[b]
    expected_kl[b] = (old[b, idx] - ref[b, idx]).sum()
    next_value, running = 0.0, 0.0
    for t in reversed(range(len(idx))):
      delta = r[t] + gamma * next_value - values[b, idx[t]]
      running = delta + gamma * lam * running
      expected_adv[b, idx[t]] = running
      next_value = values[b, idx[t]]
  np.testing.assert_allclose(kl, expected_kl, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(returns)[mask > 0], (expected_adv + values)[mask > 0], rtol=1e-5, atol=1e-6)
  on = expected_adv[mask > 0]
  np.testing.assert_allclose(np.asarray(advantages)[mask > 0], (on - on.mean()) / np.sqrt(on.var() + 1e-8),
                             rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(advantages)[mask == 0] == 0)


def test_digit_reward_and_prompt_parsing():
  p = arithmetic.Problem(500, 42, "+")
  assert arithmetic.digit_reward(" ...\nAnswer: 542", p) == 1.0
  assert arithmetic.digit_reward("Answer: 532", p) == pytest.approx(2 / 3)
  assert arithmetic.digit_reward("no answer", p) == 0.0
  assert arithmetic.digit_reward("Answer: 5", arithmetic.Problem(1, 6, "-")) == 0.5  # sign wrong, digit right
  assert arithmetic.parse_prompt(p.prompt) == p == arithmetic.parse_prompt(distill.ANSWER_PREFIX + p.hinted_prompt)
  with pytest.raises(ValueError, match="not an arithmetic prompt"):
    arithmetic.parse_prompt("What is love?")


def test_step_by_step_splits_rationale_from_answer():
  extract = arithmetic.extract_answer
  assert distill.split_rationale(" 2 + 3 = 5, write 5.\nAnswer: 5", extract) == (" 2 + 3 = 5, write 5.", " Answer: 5")
  assert distill.split_rationale(" 2 + 3 = 5, write 5.", extract) is None


def test_rest_improve_steps_train_on_their_own_thresholds_rows_in_order():
  scores = np.array([0.2, 0.9, 0.5, 1.0, 0.5, 0.0])
  phases = rest.select_rest(scores, (0.5, 0.9, 1.0))
  order = np.concatenate(phases)  # rows are laid out phase after phase
  schedule = rest.improve_schedule([len(p) for p in phases], 2, steps=3, seed=0)
  assert schedule.shape == (9, 2)
  for k, threshold in enumerate((0.5, 0.9, 1.0)):
    block = order[schedule[3 * k: 3 * k + 3]]  # Improve step k's minibatches, as original sample indices
    assert np.all(scores[block] >= threshold) and set(block.ravel()) == set(phases[k])
  only = rest.improve_schedule([0, 2], 2, steps=1, seed=0)  # an empty phase trains nothing
  assert only.shape == (1, 2) and sorted(only[0]) == [0, 1]


def test_improve_epochs_size_each_improve_step_to_what_it_kept():
  """improve_epochs=E: ceil(E * kept / batch) minibatches per phase (at least one), each phase's own rows."""
  schedule = rest.improve_schedule([5, 0, 12], 4, steps=99, seed=0, epochs=2.0)
  assert schedule.shape == (3 + 6, 4)  # ceil(2 * 5 / 4) = 3 for the first phase, ceil(2 * 12 / 4) = 6 for the last
  assert np.all(schedule[:3] < 5) and np.all(schedule[3:] >= 5)
  assert np.bincount(schedule[:3].ravel(), minlength=5).min() >= 2  # every kept sample seen about E times
  assert rest.improve_schedule([1], 4, steps=99, seed=0, epochs=0.5).shape == (1, 4)


def test_scored_rollout_scores_penalizes_unfinished_and_shuffles_as_a_control():
  problems = arithmetic.problems(4, difficulty=1, seed=0)
  pool = [p.prompt for p in problems]
  right = {p.prompt: p.solution() for p in problems}
  reward, _ = _exact(problems)

  def sampler(prompts, iteration):  # 2 samples per prompt: the right solution, then a wrong one
    texts = [t for p in prompts for t in (right[p], " no\nAnswer: -1")]
    finished = np.array([True, True] * (len(prompts) - 1) + [False, True])  # the last prompt's right one was cut
    return rollout.Samples([[1, 5]] * len(texts), [[7, 8]] * len(texts), finished, texts)

  from configs.align.common import align_config

  config = align_config("grpo")
  config.task.name = "arithmetic"
  config.rl.prompts_per_iteration, config.rl.samples_per_prompt, config.seq_len = 4, 2, 8
  config.rl.missing_eos_penalty = 0.5
  _, rows, scores = online.scored_rollout(sampler, reward, pool, 0, config)
  np.testing.assert_allclose(scores, [1, 0, 1, 0, 1, 0, 0.5, 0])
  assert rows["tokens"].shape == (8, 8)
  config.rl.shuffle_rewards = True
  _, _, shuffled = online.scored_rollout(sampler, reward, pool, 0, config)
  assert sorted(shuffled) == sorted(scores) and not np.array_equal(shuffled, scores)
  _, _, again = online.scored_rollout(sampler, reward, pool, 0, config)
  np.testing.assert_array_equal(again, shuffled)  # a pure function of (seed, iteration)
