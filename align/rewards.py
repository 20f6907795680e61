"""Rewards of the online methods: `reward_fn(prompts, completions) -> [R] float64`, texts in.

Two sources (config.rl.reward):
  a reward function  'exact' (the task's exact-match verifier) or 'digits' (partial credit per answer
                     character, a graded reward for threshold filters)
  a reward model     'model': a reward-model run's workdir (config.rl.reward_model), scored at the
                     completion's last token (align/reward_model.py)
"""

from collections.abc import Callable, Sequence

import numpy as np

from align.tasks import arithmetic

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
KINDS = tuple(arithmetic.REWARDS) + ("model",)


def task_reward(kind: str) -> RewardFn:
  """The arithmetic task's verifier of `kind` ('exact', 'digits' or 'solution'), applied to each (prompt, completion)."""
  if kind not in arithmetic.REWARDS:
    raise ValueError(f"reward {kind!r} is not one of {tuple(arithmetic.REWARDS)}")
  score = arithmetic.REWARDS[kind]

  def reward_fn(prompts, completions):
    return np.asarray([score(c, arithmetic.parse_prompt(p)) for p, c in zip(prompts, completions)], np.float64)

  return reward_fn


def model_reward(model, tokenizer, *, seq_len: int, batch_size: int = 64) -> RewardFn:
  """A trained align.reward_model.RewardModel as a reward function."""
  from align import reward_model  # noqa: PLC0415 (reward_model imports dpo, which imports this package's data)

  def reward_fn(prompts, completions):
    return reward_model.score(model, tokenizer, list(prompts), list(completions), seq_len=seq_len,
                              batch_size=batch_size).astype(np.float64)

  return reward_fn
