"""Measured success on a verifiable task: exact-match accuracy of greedy answers, and how far a
policy has moved from where it started (KL to the starting policy), both with infer/."""

from collections.abc import Callable, Sequence

import numpy as np

import infer
from infer import decoding
from align import rollout
from align.tasks import arithmetic


def task_accuracy(model, tokenizer, problems: Sequence[arithmetic.Problem], *, max_new_tokens: int = 64,
                  batch_size: int = 64, rules=None,
                  prompt_of: Callable[[arithmetic.Problem], str] = lambda p: p.prompt) -> float:
  """Share of `problems` whose greedy completion of prompt_of(problem) ends in the right 'Answer:' line."""
  if not problems:
    raise ValueError("task_accuracy needs at least one problem")
  correct = 0
  for start in range(0, len(problems), batch_size):
    chunk = problems[start: start + batch_size]
    prompts = [rollout.encode_prompt(tokenizer, prompt_of(p)) for p in chunk]
    out = infer.generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eos_id], rules=rules)
    for problem, prompt, tokens in zip(chunk, prompts, out.tokens):
      correct += arithmetic.reward(rollout.completion_text(tokenizer, prompt, tokens), problem)
  return correct / len(problems)


def kl_to_reference(policy, reference, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, seed: int = 0,
                    batch_size: int = 64, rules=None) -> float:
  """KL(policy || reference) over whole completions, estimated from one temperature-1 sample of the
  policy per prompt: the mean over prompts of sum_t log policy(y_t) - log reference(y_t) (nats)."""
  samples = rollout.sample(policy, tokenizer, list(prompts), n=1, max_new_tokens=max_new_tokens,
                           sampling=infer.Sampling(temperature=1.0), seed=seed, rules=rules)
  longest = max(len(p) + len(c) for p, c in zip(samples.prompt_ids, samples.completion_ids))
  rows = rollout.token_rows(samples.prompt_ids, samples.completion_ids, seq_len=decoding.bucket(longest))
  logprobs = [rollout.token_logprobs(m, rows["tokens"], rows["targets"], batch_size=batch_size)
              for m in (policy, reference)]
  return float(np.mean(np.sum((logprobs[0] - logprobs[1]) * rows["mask"], axis=1)))
