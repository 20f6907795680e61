"""Test-time scaling on a scripted toy model, whose every next token is known: budget forcing's
rewrites, self-consistency's vote and best-of-N's choice can be checked exactly."""

import pytest

import infer
from tests.scripted_model import ScriptedModel

V = 12
EOS, END, WAIT, START, ANSWER = 1, 2, 3, 9, 6
# Thinking: 4 -> 5 -> END; after "Wait": 3 -> 4; after END the answer 6, then EOS.
SHORT_THINKER = ScriptedModel({4: 5, 5: END, END: ANSWER, WAIT: 4, ANSWER: EOS, START: 4, 0: 4}, V)
# Never stops thinking on its own: 4 -> 5 -> 4 -> ...
LONG_THINKER = ScriptedModel({4: 5, 5: 4, END: ANSWER, WAIT: 4, ANSWER: EOS, START: 4, 0: 4}, V)


def _run(model, budget, prompt=(0,), max_new_tokens=24):
  out = infer.generate(model, [list(prompt)], max_new_tokens=max_new_tokens, stop_tokens=[EOS], controller=budget)
  return out.tokens[0], out


def test_without_budget_the_script_plays_out():
  assert _run(SHORT_THINKER, None)[0] == [4, 5, END, ANSWER, EOS]


def test_minimum_replaces_the_end_of_thinking_with_the_continuation():
  budget = infer.BudgetForcing(end_think_token=END, min_thinking_tokens=5, continuation=(WAIT,))
  tokens, out = _run(SHORT_THINKER, budget)
  # 4 5 [END->Wait] 4 5 : 5 thinking tokens, so the next END stands.
  assert tokens == [4, 5, WAIT, 4, 5, END, ANSWER, EOS]
  assert out.logprobs[0][2] == 0.0  # forced
  assert out.model_logprobs[0][2] < -20  # the model itself gave "Wait" no mass
  budget = infer.BudgetForcing(end_think_token=END, min_thinking_tokens=6, continuation=(WAIT, 7))
  # Multi-token continuation: 4 5 [END -> Wait 7]; the script goes 7 -> 0 -> 4 -> 5: 7 tokens by END.
  assert _run(SHORT_THINKER, budget)[0] == [4, 5, WAIT, 7, 0, 4, 5, END, ANSWER, EOS]


def test_maximum_forces_the_delimiter():
  budget = infer.BudgetForcing(end_think_token=END, max_thinking_tokens=3)
  assert _run(LONG_THINKER, budget)[0] == [4, 5, 4, END, ANSWER, EOS]
  budget = infer.BudgetForcing(end_think_token=END, max_thinking_tokens=4, end_think_delimiter=(10, END))
  assert _run(LONG_THINKER, budget)[0] == [4, 5, 4, 5, 10, END, ANSWER, EOS]


def test_counting_starts_at_the_start_delimiter():
  budget = infer.BudgetForcing(end_think_token=END, min_thinking_tokens=3, continuation=(WAIT,),
                               start_think_token=START)
  # 11 -> START is not thinking; from START on: 4 5 [END->Wait] -> 3 tokens, then END stands.
  model = ScriptedModel({11: START, START: 4, 4: 5, 5: END, END: ANSWER, WAIT: 4, ANSWER: EOS}, V)
  assert _run(model, budget, prompt=(8, 11))[0] == [START, 4, 5, WAIT, 4, 5, END, ANSWER, EOS]


def test_rows_keep_their_own_budgets():
  budget = infer.BudgetForcing(end_think_token=END, min_thinking_tokens=3, max_thinking_tokens=4,
                               continuation=(WAIT,))
  out = infer.generate(SHORT_THINKER, [[0], [5], [ANSWER]], max_new_tokens=24, stop_tokens=[EOS], controller=budget)
  assert out.tokens == [[4, 5, WAIT, 4, END, ANSWER, EOS], [WAIT, 4, 5, END, ANSWER, EOS], [EOS]]


def test_bad_budgets_are_named():
  with pytest.raises(ValueError, match="continuation"):
    infer.BudgetForcing(end_think_token=END, min_thinking_tokens=2)
  with pytest.raises(ValueError, match="max_thinking_tokens"):
    infer.BudgetForcing(end_think_token=END, min_thinking_tokens=4, max_thinking_tokens=2, continuation=(3,))
  with pytest.raises(ValueError, match="end_think"):
    infer.BudgetForcing.from_text(lambda text: [1, 2], end_think="</think>")


# After the question (0) the model answers 5 (p .5), 6 (p .3) or 7 (p .2), then stops.
VOTER = ScriptedModel({0: {5: 0.5, 6: 0.3, 7: 0.2}, 5: EOS, 6: EOS, 7: EOS}, V)


def test_self_consistency_votes_for_the_most_common_answer():
  result = infer.self_consistency(VOTER, [[0], [0]], n=200, extract_answer=lambda ids: ids[0] if ids else None,
                                  max_new_tokens=4, stop_tokens=[EOS], rng=3)
  assert result.answers == [5, 5]
  for votes, agreement in zip(result.votes, result.agreement):
    assert sum(votes.values()) == 200 and set(votes) <= {5, 6, 7}
    assert agreement == votes[5] / 200
    assert abs(votes[5] / 200 - 0.5) < 0.12 and abs(votes[7] / 200 - 0.2) < 0.1


def test_self_consistency_ignores_samples_without_an_answer():
  result = infer.self_consistency(VOTER, [[0]], n=20, extract_answer=lambda ids: 7 if ids[0] == 7 else None,
                                  max_new_tokens=4, stop_tokens=[EOS], rng=3)
  assert result.answers == [7] and set(result.votes[0]) == {7}


def test_best_of_n_returns_the_highest_scoring_sample():
  calls = []

  def score(prompts, completions):
    calls.append(len(completions))
    return [float(c[0] == 7) + 0.001 * c[0] for c in completions]

  result = infer.best_of_n(VOTER, [[0], [0]], n=30, score_fn=score, max_new_tokens=4, stop_tokens=[EOS], rng=5)
  assert calls == [60]  # one batch of every sample
  assert result.tokens == [[7, EOS], [7, EOS]]
  for p in range(2):
    assert result.samples.tokens[p * 30 + result.best_index[p]] == [7, EOS]
    assert result.scores[p].max() == result.scores[p, result.best_index[p]]
  with pytest.raises(ValueError, match="one score per completion"):
    infer.best_of_n(VOTER, [[0]], n=3, score_fn=lambda p, c: [1.0], max_new_tokens=2)
