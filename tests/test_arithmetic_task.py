"""The synthetic arithmetic task: worked solutions are right (checked by Python's arithmetic), wrong
ones are wrong, problems are reproducible, the extractor and reward are exact."""

import re

import pytest

from align.tasks import arithmetic


@pytest.mark.parametrize("difficulty", range(1, arithmetic.MAX_DIFFICULTY + 1))
def test_worked_solutions_reach_the_true_answer(difficulty):
  for problem in arithmetic.problems(300, difficulty=difficulty, seed=1):
    solution = problem.solution()
    assert arithmetic.extract_answer(solution) == eval(f"{problem.a} {problem.op} {problem.b}")
    assert arithmetic.reward(solution, problem) == 1.0
    for step in re.findall(r"(\d+) \+ (\d+)(?: \+ (\d+))? = (\d+)", solution):  # each column sum is right
      assert sum(int(x or 0) for x in step[:3]) == int(step[3])
    wrong = arithmetic.wrong_solution(problem)
    assert arithmetic.reward(wrong, problem) == 0.0


def test_problems_are_reproducible_and_seeds_differ():
  assert arithmetic.problems(20, difficulty=3, seed=0) == arithmetic.problems(20, difficulty=3, seed=0)
  assert arithmetic.problems(20, difficulty=3, seed=0) != arithmetic.problems(20, difficulty=3, seed=1)
  digits = {len(str(p.a)) for p in arithmetic.problems(50, difficulty=4, seed=0)}
  assert digits == {4}


def test_held_out_problems_are_not_train_problems():
  train = set(arithmetic.problems(arithmetic.TRAIN_PREFIX_EXCLUDED, difficulty=2, seed=0))
  drawn = arithmetic.problems(500, difficulty=2, seed=1)
  assert sum(p in train for p in drawn) > 50  # the two streams alone share many problems at difficulty 2
  held_out = arithmetic.held_out_problems(500, difficulty=2, seed=1, train_seed=0)
  assert len(held_out) == 500 and not any(p in train for p in held_out)
  assert held_out == [p for p in drawn + arithmetic.problems(2000, difficulty=2, seed=1)[500:]
                      if p not in train][:500]  # the stream's order, the train problems skipped
  larger = arithmetic.held_out_problems(50, difficulty=2, seed=1, train_seed=0, train_size=30_000)
  assert not set(larger) & set(arithmetic.problems(30_000, difficulty=2, seed=0))


def test_held_out_problems_name_a_train_size_that_covers_the_space(monkeypatch):
  every_problem = frozenset(arithmetic.Problem(a, b, op) for a in range(10, 100) for b in range(100) for op in "+-")
  monkeypatch.setattr(arithmetic, "_problem_set", lambda n, difficulty, seed: every_problem)
  with pytest.raises(ValueError, match="train_size=200000"):
    arithmetic.held_out_problems(10, difficulty=2, seed=1, train_seed=0, train_size=200_000)


def test_a_worked_example():
  problem = arithmetic.Problem(487, 55, "+")
  assert problem.prompt == "Question: What is 487 + 55?\nSolution:"
  assert problem.solution() == (" 7 + 5 = 12, write 2 carry 1. 8 + 5 + 1 = 14, write 4 carry 1. "
                                "4 + 0 + 1 = 5, write 5.\nAnswer: 542")
  assert arithmetic.Problem(52, 7, "-").solution() == " 2 - 7 borrow 10 = 5, write 5. 5 - 1 - 0 = 4, write 4.\nAnswer: 45"
  assert arithmetic.extract_answer(arithmetic.Problem(3, 8, "-").solution()) == -5


def test_extractor_and_reward():
  assert arithmetic.extract_answer("blah\nAnswer: 12\nAnswer: -7 trailing") == -7
  assert arithmetic.extract_answer("no answer here") is None
  problem = arithmetic.Problem(1, 2, "+")
  assert arithmetic.reward(" whatever\nAnswer: 3", problem) == 1.0
  assert arithmetic.reward(" whatever\nAnswer: 30", problem) == 0.0
  with pytest.raises(ValueError, match="difficulty=7"):
    arithmetic.make_problem(0, 0, 7)


def test_data_formats():
  sft = arithmetic.sft_examples(3, difficulty=2, seed=0)
  assert set(sft[0]) == {"prompt", "completion"}
  pairs = arithmetic.preference_pairs(3, difficulty=2, seed=0)
  assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_task_scores_grade_the_generated_answers(tmp_path, monkeypatch):
  """task_scores on scripted generations: one right answer, one with a wrong tens digit, one with no
  answer line; exact = 1/3, digits = (1 + 1/2 + 0) / 3 by hand."""
  import types

  import infer
  from align import evaluation
  from rundir import tokenizer as tokenizer_lib

  from align import tasks

  task = tasks.get_task({"name": "arithmetic", "difficulty": 2})
  problems = [arithmetic._task_problem(p, 0) for p in
              (arithmetic.Problem(12, 30, "+"), arithmetic.Problem(45, 3, "+"), arithmetic.Problem(9, 1, "-"))]
  texts = [r["prompt"] + r["completion"] for r in arithmetic.sft_examples(200, difficulty=2, seed=3)]
  tokenizer_lib.train_tokenizer(texts, tmp_path / "tok.model", vocab_size=320)
  tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "tok.model")
  completions = [" 2 + 0 = 2, write 2.\nAnswer: 42", " 5 + 3 = 8, write 8.\nAnswer: 58", " I do not know."]

  def scripted_generate(model, prompts, **kwargs):
    assert len(prompts) == len(problems)
    return types.SimpleNamespace(tokens=[[*tokenizer.encode(c), tokenizer.eos_id] for c in completions])

  monkeypatch.setattr(infer, "generate", scripted_generate)
  scores = evaluation.task_scores(None, tokenizer, problems, task)
  assert scores["exact"] == pytest.approx(1 / 3)
  assert scores["digits"] == pytest.approx((1 + 0.5 + 0) / 3)
  assert evaluation.task_accuracy(None, tokenizer, problems, task) == pytest.approx(1 / 3)

  # Sampled: 3 samples per problem (problem-major); problems 0 and 2 right twice each, 1 never.
  completions = [" 2 + 0 = 2, write 2.\nAnswer: 42", " x\nAnswer: 41", " 2 + 0 = 2, write 2. 1 + 3 = 4, write 4.\nAnswer: 42",
                 " x\nAnswer: 58", " no", " x\nAnswer: 47",
                 " x\nAnswer: 8", " x\nAnswer: 10", " 9 - 1 = 8, write 8.\nAnswer: 8"]

  def scripted_samples(model, prompts, **kwargs):
    assert kwargs["sampling"].temperature == 0.7 and len(prompts) == 9
    return types.SimpleNamespace(tokens=[[*tokenizer.encode(c), tokenizer.eos_id] for c in completions],
                                 finish_reasons=["stop"] * 9)

  monkeypatch.setattr(infer, "generate", scripted_samples)
  sampled = evaluation.sampled_scores(None, tokenizer, problems, task, samples=3, temperature=0.7)
  assert sampled["exact"] == pytest.approx(4 / 9)
  assert sampled["pass@k"] == pytest.approx(2 / 3)
  # Best-of-3 by the exact reward picks a right sample where there is one; the majority answers are
  # 42 (right), 58 (first seen of a three-way tie: wrong) and 8 (right).
  assert sampled["best_of_n"] == pytest.approx(2 / 3) and sampled["self_consistency"] == pytest.approx(2 / 3)
  # solution, by hand: problem 0's gold has 3 parts (2 steps, the answer line): samples score 1/3
  # (first step right, answer out of place), 0, 1; problem 1: 0, 0, 0; problem 2's gold has 2 parts:
  # 1/2 (the answer line in place), 0, 1.
  assert sampled["solution"] == pytest.approx((1 / 3 + 0 + 1 + 0 + 0 + 0 + 1 / 2 + 0 + 1) / 9)


def test_solution_reward_grades_the_working_not_only_the_answer():
  p = arithmetic.Problem(82, 26, "+")  # 4 parts: two column steps, the carry, the answer line
  gold = p.solution()
  assert gold == " 2 + 6 = 8, write 8. 8 + 2 = 10, write 0 carry 1. Write the carry 1.\nAnswer: 108"
  assert arithmetic.solution_reward(gold, p) == 1.0
  lucky = gold.replace("2 + 6 = 8, write 8.", "2 + 6 = 7, write 7.")  # wrong working, right answer
  assert arithmetic.reward(lucky, p) == 1.0 and arithmetic.solution_reward(lucky, p) == 0.75
  extra = gold.replace("Write the carry 1.", "Write the carry 1. Write the carry 1.")  # 5 parts vs 4
  assert arithmetic.solution_reward(extra, p) == pytest.approx(3 / 5)
  assert arithmetic.solution_reward(" 2 + 6 = 8, write 8.", p) == 0.25  # stopped early, no answer line
  assert arithmetic.solution_reward("", p) == 0.0
  negative = arithmetic.Problem(29, 58, "-")
  assert arithmetic.solution_reward(negative.solution(), negative) == 1.0
  assert arithmetic.solution_reward(negative.solution().replace("-29", "29"), negative) == 0.75
