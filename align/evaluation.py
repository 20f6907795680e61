"""Measured success on a verifiable task: exact-match accuracy of greedy answers, with infer/."""

from collections.abc import Sequence

import infer
from align.tasks import arithmetic


def task_accuracy(model, tokenizer, problems: Sequence[arithmetic.Problem], *, max_new_tokens: int = 64,
                  batch_size: int = 64, rules=None) -> float:
  """Share of `problems` whose greedy completion ends in the right 'Answer:' line."""
  if not problems:
    raise ValueError("task_accuracy needs at least one problem")
  correct = 0
  for start in range(0, len(problems), batch_size):
    chunk = problems[start: start + batch_size]
    prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt)] if tokenizer.bos_id >= 0 else tokenizer.encode(p.prompt)
               for p in chunk]
    out = infer.generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eos_id], rules=rules)
    for problem, tokens in zip(chunk, out.tokens):
      text = tokenizer.decode([t for t in tokens if 0 <= t < tokenizer.vocab_size])
      correct += arithmetic.reward(text, problem)
  return correct / len(problems)
