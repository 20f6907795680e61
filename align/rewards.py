"""Rewards of the online methods: `reward_fn(prompts, completions) -> [R] float64`, texts in.

Two sources (config.rl.reward):
  a task's verifier  by name: 'exact' for every task; the arithmetic task adds 'digits' (partial
                     credit per answer character) and 'solution' (process credit); align/tasks
  a reward model     'model': a reward-model run's workdir (config.rl.reward_model), scored at the
                     completion's last token (align/reward_model.py)
"""

from collections.abc import Callable, Sequence

import numpy as np

from align import reward_model
from align.tasks import Problem, Task
from train import flops as flops_lib

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def task_reward(task: Task, name: str, problems: Sequence[Problem]) -> RewardFn:
  """The task's verifier `name` for `problems`, each known by its prompt or its hinted prompt."""
  score = task.reward(name)
  by_prompt = {p.prompt: p for p in problems} | {p.hint(): p for p in problems}

  def reward_fn(prompts, completions):
    missing = [p for p in prompts if p not in by_prompt]
    if missing:
      raise KeyError(f"task {task.name!r} has no problem with the prompt {missing[0]!r:.80}")
    return np.asarray([score(by_prompt[p], c) for p, c in zip(prompts, completions)], np.float64)

  return reward_fn


def model_reward(path: str, tokenizer, *, seq_len: int, mesh=None, rules=None, batch_size: int = 64,
                 meter: flops_lib.Meter | None = None) -> RewardFn:
  """The align.reward_model.RewardModel of a reward-model run's workdir as a reward function; each
  (prompt, completion) it scores is a forward over seq_len tokens, counted on `meter`."""
  module = reward_model.load(path, mesh=mesh, rules=rules)
  meter = meter or flops_lib.Meter()

  def reward_fn(prompts, completions):
    meter.add(flops_lib.frozen(module.config, seq_len, len(prompts)))
    return reward_model.score(module, tokenizer, list(prompts), list(completions), seq_len=seq_len,
                              batch_size=batch_size).astype(np.float64)

  return reward_fn
