"""AI feedback (RLAIF; Zephyr's distilled DPO): the policy samples several completions per prompt
with infer/, a judge ranks them, and the best and worst become a preference pair for DPO.

A judge is `judge(prompt, completions) -> scores` (higher is better). Three kinds:
  reward_function_judge(fn)        fn(prompt, completion) -> float (a verifier, e.g. exact match)
  reward_model_judge(model, ...)   a trained align.reward_model.RewardModel
  log_prob_judge(model, ...)       a language model asked "which is better, A or B?" for every pair of
                                   completions; a completion's score is its summed log-odds of winning
"""

import itertools
from collections.abc import Callable, Sequence

import numpy as np

import infer
from align import reward_model as reward_model_lib
from align import rollout
from model import sharding

Judge = Callable[[str, list[str]], Sequence[float]]

JUDGE_TEMPLATE = (
    "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is better, A or B? The better answer is"
)


def reward_function_judge(fn: Callable[[str, str], float]) -> Judge:
  return lambda prompt, completions: [float(fn(prompt, c)) for c in completions]


def reward_model_judge(model, tokenizer, *, seq_len: int) -> Judge:
  def judge(prompt, completions):
    return reward_model_lib.score(model, tokenizer, [prompt] * len(completions), list(completions), seq_len=seq_len)
  return judge


def log_prob_judge(model, tokenizer, *, template: str = JUDGE_TEMPLATE, choices: tuple[str, str] = ("A", "B")) -> Judge:
  """Pairwise comparisons by the judge model's next-token log-probs of the two choice tokens, both
  orders (to cancel position bias); a completion scores the sum of its log-odds of winning.
  `choices` are encoded alone (sentencepiece adds the word-initial '▁' itself); each must be one token."""
  ids = [tokenizer.encode(c) for c in choices]
  if any(len(i) != 1 for i in ids):
    raise ValueError(f"log_prob_judge choices {choices} must each be one token, got {ids}")
  a_id, b_id = ids[0][0], ids[1][0]

  def judge(prompt, completions):
    scores = np.zeros(len(completions))
    for i, j in itertools.combinations(range(len(completions)), 2):
      for first, second in ((i, j), (j, i)):
        text = template.format(prompt=prompt, a=completions[first], b=completions[second])
        tokens = [tokenizer.bos_id, *tokenizer.encode(text)] if tokenizer.bos_id >= 0 else tokenizer.encode(text)
        logits = sharding.to_host(model(np.asarray([tokens], np.int32))[0, -1]).astype(np.float64)
        logprobs = logits - np.logaddexp.reduce(logits)
        log_odds = logprobs[a_id] - logprobs[b_id]  # for `first`
        scores[first] += log_odds
        scores[second] -= log_odds
    return scores

  return judge


def preference_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    judge: Judge,
    n: int = 4,
    max_new_tokens: int = 64,
    sampling: infer.Sampling = infer.Sampling(temperature=1.0),
    rng=0,
    rows_per_call: int = 256,
) -> list[dict]:
  """{"prompt", "chosen", "rejected", "margin"} per prompt whose n samples the judge does not score all
  alike (best versus worst; margin = the score gap). Generation runs rows_per_call rows at a time."""
  if n < 2:
    raise ValueError(f"n={n} must be >= 2: a pair needs two completions")
  samples = rollout.sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, sampling=sampling, seed=rng,
                           rows_per_call=rows_per_call)
  pairs = []
  for p, prompt in enumerate(prompts):
    completions = [rollout.training_text(tokenizer, ids) for ids in samples.completion_ids[p * n: (p + 1) * n]]
    scores = np.asarray(judge(prompt, completions), np.float64)
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] > scores[worst]:
      pairs.append({"prompt": prompt, "chosen": completions[best], "rejected": completions[worst],
                    "margin": float(scores[best] - scores[worst])})
  return pairs
