"""The Task contract: what a task gives every method in align/.

A task is a source of problems with verifiable answers. Each `Problem` has a prompt, the gold
answer (normalised text) and, optionally, a worked solution (the completion SFT learns from) and a
hinted prompt (STaR's rationalization). The task names its rewards (verifiers):
`reward(problem, completion_text) -> float`, higher is better, 1.0 for a fully right completion.

A task is built from the `config.task` block by `align.tasks.get_task`: a built-in name
('arithmetic', 'jsonl') or a factory 'my_package.my_module:make_task', called with that block,
that returns a `Task`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

SPLITS = ("train", "eval")
ANSWER_PREFIX = "Answer:"  # the answer line the built-in tasks write and read


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str
  answer: str  # the gold answer, normalised as the task's extractor normalises what it reads
  solution: str | None = None  # a right completion (worked solution and answer), if the task has one
  hinted_prompt: str | None = None  # the prompt with the answer given as a hint (STaR); None: a generic hint
  source: Any = None  # the task's own record of the problem (its rewards may read it)

  def hint(self) -> str:
    """The prompt with the answer given as a hint (STaR's rationalization)."""
    if self.hinted_prompt is not None:
      return self.hinted_prompt
    return f"{self.prompt}\n(Hint: the answer is {self.answer}.)"

  def completion(self) -> str:
    """What SFT learns for this problem: the worked solution, else the answer line alone."""
    return self.solution if self.solution is not None else f" {ANSWER_PREFIX} {self.answer}"


Reward = Callable[[Problem, str], float]


@dataclasses.dataclass(frozen=True)
class Task:
  """name: how runs report it. problems(split, n, seed): up to n problems of 'train' or 'eval'
  (None: all the task has; the same arguments give the same problems, and the splits are disjoint).
  extract_answer(completion) -> the normalised answer it states, or None. rewards: named verifiers,
  'exact' (the extracted answer equals the gold one) among them, first the held-out accuracy's.
  wrong_completion(problem) -> a plausible wrong completion (preference pairs from the task); None
  where the task has no such generator."""

  name: str
  problems: Callable[[str, int | None, int], list[Problem]]
  extract_answer: Callable[[str], str | None]
  rewards: Mapping[str, Reward]
  wrong_completion: Callable[[Problem], str] | None = None

  def __post_init__(self):
    if "exact" not in self.rewards:
      raise ValueError(f"task {self.name!r} names rewards {sorted(self.rewards)}; it needs 'exact' among them "
                       "(the held-out accuracy)")

  def reward(self, name: str) -> Reward:
    if name not in self.rewards:
      raise ValueError(f"reward {name!r} is not one of task {self.name!r}'s rewards {sorted(self.rewards)}")
    return self.rewards[name]

  def split(self, split: str, n: int | None, seed: int) -> list[Problem]:
    """problems(split, n, seed), checked: a split name and at least one problem."""
    if split not in SPLITS:
      raise ValueError(f"split={split!r} is not one of {SPLITS}")
    problems = self.problems(split, n, seed)
    if not problems:
      raise ValueError(f"task {self.name!r} gave no {split} problems")
    return problems
