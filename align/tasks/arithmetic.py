"""Multi-digit addition and subtraction, written as a question, a worked column-by-column solution
and a final answer line, with an exact-match reward.

    Question: What is 487 + 55?
    Solution: 7 + 5 = 12, write 2 carry 1. 8 + 5 + 1 = 14, write 4 carry 1. 4 + 0 + 1 = 5, write 5.
    Answer: 542

Difficulty d is the number of digits of the operands (1 to 6); level 1 only adds. Every problem
is a pure function of (seed, index, difficulty), so data sets are reproducible; held-out problems
come from another stream with the train stream's problems left out (from difficulty 2 on). Wrong
solutions (for preference pairs) make the mistakes models make: a dropped carry or borrow, or a
wrong final digit.
"""

import dataclasses
import functools
import itertools
import logging
import random
import re

from align.tasks import base

ANSWER_PREFIX = base.ANSWER_PREFIX
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
_PROMPT = re.compile(r"Question: What is (\d+) ([+-]) (\d+)\?")
MAX_DIFFICULTY = 6
# Held-out problems are never among this many first problems of the train stream (or train_size, if more):
# at difficulty 2 (18,000 distinct problems) the streams share a problem about once in nine draws.
TRAIN_PREFIX_EXCLUDED = 20_000


@dataclasses.dataclass(frozen=True)
class Problem:
  a: int
  b: int
  op: str  # "+" or "-"

  @property
  def answer(self) -> int:
    return self.a + self.b if self.op == "+" else self.a - self.b

  @property
  def prompt(self) -> str:
    return f"Question: What is {self.a} {self.op} {self.b}?\nSolution:"

  @property
  def hinted_prompt(self) -> str:
    """The prompt with the answer given as a hint (STaR's rationalization)."""
    return f"Question: What is {self.a} {self.op} {self.b}? (Hint: the answer is {self.answer}.)\nSolution:"

  def solution(self, *, drop_carry_at: int | None = None) -> str:
    """The worked solution and answer line (the completion); drop_carry_at makes a wrong one."""
    steps, result = _column_steps(self.a, self.b, self.op, drop_carry_at)
    return f" {' '.join(steps)}\n{ANSWER_PREFIX} {result}"


def _digits(n: int, width: int) -> list[int]:
  return [(n // 10**i) % 10 for i in range(width)]  # least significant first


def _column_steps(a: int, b: int, op: str, drop_carry_at: int | None) -> tuple[list[str], int]:
  negative = op == "-" and a < b
  if negative:
    a, b = b, a
  width = max(len(str(a)), len(str(b)))
  da, db = _digits(a, width), _digits(b, width)
  steps, out, carry = [], [], 0
  for i in range(width):
    if op == "+":
      total = da[i] + db[i] + carry
      expr = f"{da[i]} + {db[i]}" + (f" + {carry}" if carry else "")
      digit, new_carry = total % 10, total // 10
      step = f"{expr} = {total}, write {digit}" + (" carry 1." if new_carry else ".")
    else:
      top = da[i] - carry
      borrow = int(top < db[i])
      digit = top + 10 * borrow - db[i]
      lhs = f"{da[i]}" + (" - 1" if carry else "")
      step = (f"{lhs} - {db[i]}" + (" borrow 10" if borrow else "") + f" = {digit}, write {digit}.")
      new_carry = borrow
    if drop_carry_at == i:
      new_carry = 0
    steps.append(step)
    out.append(digit)
    carry = new_carry
  if op == "+" and carry:
    steps.append("Write the carry 1.")
    out.append(1)
  result = int("".join(str(d) for d in reversed(out)))
  if negative:
    steps.append("The second number is larger, so the result is negative.")
    result = -result
  return steps, result


def make_problem(seed: int, index: int, difficulty: int) -> Problem:
  """Problem `index` of the stream `seed` at `difficulty` (digits per operand, 1..6)."""
  if not 1 <= difficulty <= MAX_DIFFICULTY:
    raise ValueError(f"difficulty={difficulty} must be in 1..{MAX_DIFFICULTY}")
  rng = random.Random(f"{seed}/{difficulty}/{index}")
  low, high = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
  a, b = rng.randint(low, high), rng.randint(0, high)
  op = "+" if difficulty == 1 or rng.random() < 0.5 else "-"
  return Problem(a, b, op)


def problems(n: int, *, difficulty: int, seed: int) -> list[Problem]:
  return [make_problem(seed, i, difficulty) for i in range(n)]


@functools.lru_cache(maxsize=8)
def _problem_set(n: int, difficulty: int, seed: int) -> frozenset[Problem]:
  return frozenset(problems(n, difficulty=difficulty, seed=seed))


def held_out_problems(n: int, *, difficulty: int, seed: int, train_seed: int, train_size: int = 0) -> list[Problem]:
  """The first n problems of the stream `seed` that are not among the first max(train_size,
  TRAIN_PREFIX_EXCLUDED) problems of the stream `train_seed`: held out by content, not only by
  stream. Difficulty 1 has 100 problems in all, so its held-out problems are the stream's as drawn
  (a warning says so)."""
  if difficulty == 1:
    logging.warning("arithmetic difficulty 1 has only 100 distinct problems: its held-out problems are also "
                    "train problems")
    return problems(n, difficulty=difficulty, seed=seed)
  seen = _problem_set(max(train_size, TRAIN_PREFIX_EXCLUDED), difficulty, train_seed)
  max_draws = 100 * n + 100_000  # a train prefix that covers the space would otherwise draw forever
  drawn = (make_problem(seed, index, difficulty) for index in range(max_draws))
  kept = list(itertools.islice((problem for problem in drawn if problem not in seen), n))
  if len(kept) == n:
    return kept
  raise ValueError(f"arithmetic difficulty {difficulty}: only {len(kept)} of the {n} held-out problems asked for "
                   f"are unseen in {max_draws} draws; task.train_size={train_size} covers nearly every problem. "
                   "Lower task.train_size or raise task.difficulty")


def wrong_solution(problem: Problem, seed: int = 0) -> str:
  """A plausible but wrong completion: a dropped carry/borrow where there is one, else an off-by-one answer."""
  rng = random.Random(f"wrong/{seed}/{problem}")
  width = max(len(str(problem.a)), len(str(problem.b)))
  for i in rng.sample(range(width), width):
    text = problem.solution(drop_carry_at=i)
    if extract_answer(text) != problem.answer:
      return text
  steps, _ = _column_steps(problem.a, problem.b, problem.op, None)
  delta = rng.choice([-1, 1]) * rng.choice([1, 10])
  return f" {' '.join(steps)}\n{ANSWER_PREFIX} {problem.answer + delta}"


def extract_answer(text: str) -> int | None:
  """The integer on the last 'Answer:' line, or None."""
  found = _ANSWER.findall(text)
  return int(found[-1]) if found else None


def parse_prompt(prompt: str) -> Problem:
  """The problem a prompt (plain or hinted) asks."""
  found = _PROMPT.search(prompt)
  if found is None:
    raise ValueError(f"not an arithmetic prompt: {prompt!r:.80}")
  return Problem(int(found[1]), int(found[3]), found[2])


def reward(completion: str, problem: Problem) -> float:
  """Exact match of the final answer: 1.0 or 0.0."""
  return float(extract_answer(completion) == problem.answer)


def digit_reward(completion: str, problem: Problem) -> float:
  """Partial credit: the share of the answer's characters (sign and digits, aligned from the right)
  that the final answer gets right; 1.0 exactly when the answer is right, 0.0 without an answer.
  A graded reward for methods that filter by a threshold (ReST)."""
  got = extract_answer(completion)
  if got is None:
    return 0.0
  want, have = str(problem.answer), str(got)
  width = max(len(want), len(have))
  want, have = want.rjust(width), have.rjust(width)
  return sum(a == b for a, b in zip(want, have)) / width


_STEP_END = re.compile(r"(?<=\.)\s+")


def _solution_parts(text: str) -> list[str]:
  """A completion's worked steps (sentences ending in '.') and its answer line, whitespace-trimmed."""
  body, sep, answer = text.partition(f"\n{ANSWER_PREFIX}")
  parts = [p.strip() for p in _STEP_END.split(body.strip()) if p.strip()]
  return parts + ([f"{ANSWER_PREFIX}{answer}".strip()] if sep else [])


def solution_reward(completion: str, problem: Problem) -> float:
  """Process credit: the share of the worked solution's parts (each column step, the carry or sign
  note, the answer line) that the completion writes right, in place; extra or missing parts count
  as wrong. 1.0 exactly when the whole worked solution is right. Unlike the answer-only rewards it
  gives no credit for a right answer reached by wrong working, which the model's own samples often
  are (a sample that writes '2 + 6 = 7' and still ends in the right answer)."""
  want, got = _solution_parts(problem.solution()), _solution_parts(completion)
  return sum(a == b for a, b in zip(want, got)) / max(len(want), len(got))


REWARDS = {"exact": reward, "digits": digit_reward, "solution": solution_reward}


def sft_examples(n: int, *, difficulty: int, seed: int) -> list[dict[str, str]]:
  return [{"prompt": p.prompt, "completion": p.solution()} for p in problems(n, difficulty=difficulty, seed=seed)]


def preference_pairs(n: int, *, difficulty: int, seed: int) -> list[dict[str, str]]:
  return [{"prompt": p.prompt, "chosen": p.solution(), "rejected": wrong_solution(p, seed)}
          for p in problems(n, difficulty=difficulty, seed=seed)]


@dataclasses.dataclass(frozen=True)
class _Source:
  problem: Problem
  seed: int  # the stream it came from: its wrong solution is drawn with it


def _task_problem(problem: Problem, seed: int) -> base.Problem:
  return base.Problem(prompt=problem.prompt, answer=str(problem.answer), solution=problem.solution(),
                      hinted_prompt=problem.hinted_prompt, source=_Source(problem, seed))


def _verifier(score):
  return lambda problem, completion: score(completion, problem.source.problem)


def make_task(config) -> base.Task:
  """The task of `config.task` (its `difficulty`): train problems from the stream `seed`, held-out
  ones from `seed + 1` with the train stream's first problems left out (held_out_problems), so the
  splits share no problem from difficulty 2 on."""
  difficulty = int(config["difficulty"])
  if not 1 <= difficulty <= MAX_DIFFICULTY:
    raise ValueError(f"config.task.difficulty={difficulty} must be in 1..{MAX_DIFFICULTY}")

  def split_problems(split: str, n: int | None, seed: int) -> list[base.Problem]:
    if n is None:
      raise ValueError("the arithmetic task generates problems without end: give how many (n)")
    if split == "train":
      return [_task_problem(p, seed) for p in problems(n, difficulty=difficulty, seed=seed)]
    drawn = held_out_problems(n, difficulty=difficulty, seed=seed + 1, train_seed=seed,
                              train_size=int(config.get("train_size", 0)))
    return [_task_problem(p, seed + 1) for p in drawn]

  def extract(text: str) -> str | None:
    answer = extract_answer(text)
    return None if answer is None else str(answer)

  return base.Task(
      name="arithmetic", problems=split_problems, extract_answer=extract,
      rewards={name: _verifier(score) for name, score in REWARDS.items()},
      wrong_completion=lambda problem: wrong_solution(problem.source.problem, problem.source.seed),
  )
