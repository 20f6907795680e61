"""Measured success on a task: its rewards on held-out problems (greedy and sampled), best-of-N and
self-consistency, and how far a policy has moved from where it started (KL to the starting
policy), all with infer/."""

from collections.abc import Callable, Sequence

import numpy as np

import infer
from infer import decoding, test_time
from align import rollout
from align.tasks import Problem, Task


def _prompt(problem: Problem) -> str:
  return problem.prompt


def _whole(text: str) -> str:
  return text


def task_scores(model, tokenizer, problems: Sequence[Problem], task: Task, *, max_new_tokens: int = 64,
                batch_size: int = 64, rules=None, prompt_of: Callable[[Problem], str] = _prompt,
                response_of: Callable[[str], str] = _whole) -> dict[str, float]:
  """Greedy completions of prompt_of(problem), response_of(completion) scored by each of the task's
  rewards (the mean over problems; 'exact' is the share whose answer is right)."""
  if not problems:
    raise ValueError("task_scores needs at least one problem")
  totals = dict.fromkeys(task.rewards, 0.0)
  for start in range(0, len(problems), batch_size):
    chunk = problems[start: start + batch_size]
    prompts = [rollout.encode_prompt(tokenizer, prompt_of(p)) for p in chunk]
    out = infer.generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eos_id], rules=rules)
    for problem, prompt, tokens in zip(chunk, prompts, out.tokens):
      text = response_of(rollout.completion_text(tokenizer, prompt, tokens))
      for name, reward in task.rewards.items():
        totals[name] += reward(problem, text)
  return {name: total / len(problems) for name, total in totals.items()}


def sampled_scores(model, tokenizer, problems: Sequence[Problem], task: Task, *, samples: int, temperature: float = 1.0,
                   max_new_tokens: int = 64, seed: int = 0, rules=None,
                   prompt_of: Callable[[Problem], str] = _prompt,
                   response_of: Callable[[str], str] = _whole) -> dict[str, float]:
  """What the online methods optimize, measured on held-out problems: `samples` completions per
  problem at `temperature`, their response_of(completion) scored by each of the task's rewards (the mean over all samples: the
  expected reward of one sample, 'mean@k'), plus 'pass@k' (the share of problems with at least one
  exactly right answer among its samples), 'best_of_n' (the share whose sample ranked first by the
  task's first reward is exactly right) and 'self_consistency' (the share whose most common
  extracted answer is right). Greedy accuracy (task_scores) reads only the mode of the policy; RL
  mostly moves the rest of its distribution first."""
  if not problems:
    raise ValueError("sampled_scores needs at least one problem")
  out = rollout.sample(model, tokenizer, [prompt_of(p) for p in problems], n=samples, max_new_tokens=max_new_tokens,
                       sampling=infer.Sampling(temperature=temperature), seed=seed, rules=rules)
  texts = [[response_of(t) for t in out.texts[i * samples: (i + 1) * samples]]
           for i in range(len(problems))]  # [problem][sample]
  scores = {name: np.asarray([[reward(p, t) for t in row] for p, row in zip(problems, texts)])
            for name, reward in task.rewards.items()}  # [problems, samples]
  result = {name: float(s.mean()) for name, s in scores.items()}
  exact = scores["exact"]
  result["pass@k"] = float(np.mean(exact.max(axis=1)))
  ranking = scores[next(iter(task.rewards))]
  result["best_of_n"] = float(np.mean(exact[np.arange(len(problems)), ranking.argmax(axis=1)]))
  voted = [test_time.majority_vote([task.extract_answer(t) for t in row])[0] for row in texts]
  result["self_consistency"] = float(np.mean([v is not None and v == p.answer for v, p in zip(voted, problems)]))
  return result


def task_accuracy(model, tokenizer, problems: Sequence[Problem], task: Task, **kwargs) -> float:
  """Share of `problems` whose greedy completion states the right answer (see task_scores)."""
  return task_scores(model, tokenizer, problems, task, **kwargs)["exact"]


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
