"""Test-time scaling: best-of-N, self-consistency, and budget forcing (s1: Muennighoff et al. 2025).

Best-of-N and self-consistency repeat each prompt N times in one `generate` call (so the N samples
of all prompts decode together) and pick on the host. Budget forcing is a `Controller`: it rewrites
tokens inside the on-device decode loop, so it costs nothing beyond the tokens it forces.
"""

import collections
import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer.decoding import Generation, generate
from infer.sampling import Sampling

_NO_LIMIT = np.iinfo(np.int32).max


def _repeat(prompts, n: int, what: str) -> list[list[int]]:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{what}: n={n!r} must be a positive int")
  return [list(p) for p in prompts for _ in range(n)]


@dataclasses.dataclass
class BestOfN:
  tokens: list[list[int]]  # per prompt, the best completion
  best_index: np.ndarray  # [P] which of the N samples won
  scores: np.ndarray  # [P, N]
  samples: Generation  # all P * N samples, prompt-major (prompt p's samples at p*N .. p*N + N - 1)


def best_of_n(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    score_fn: Callable[[list[list[int]], list[list[int]]], Sequence[float]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(temperature=1.0),
    rng=None,
    stop_tokens: Sequence[int] = (),
) -> BestOfN:
  """N samples per prompt; `score_fn(prompts, completions) -> scores` (a reward function, or a reward
  model wrapped as one) ranks them and the highest score wins (the first sample among ties)."""
  repeated = _repeat(prompts, n, "best_of_n")
  samples = generate(model, repeated, max_new_tokens=max_new_tokens, sampling=sampling, rng=rng,
                     stop_tokens=stop_tokens)
  scores = np.asarray(score_fn(repeated, samples.tokens), np.float64)
  if scores.shape != (len(repeated),):
    raise ValueError(f"score_fn returned shape {scores.shape}, expected ({len(repeated)},): one score per completion")
  scores = scores.reshape(len(prompts), n)
  best = np.argmax(scores, axis=1)
  return BestOfN([samples.tokens[p * n + int(i)] for p, i in enumerate(best)], best, scores, samples)


@dataclasses.dataclass
class SelfConsistency:
  answers: list[Hashable | None]  # per prompt, the majority answer (None when no sample gave one)
  votes: list[collections.Counter]  # per prompt, answer -> number of samples
  agreement: np.ndarray  # [P] share of the N samples that gave the majority answer
  samples: Generation  # all P * N samples, prompt-major


def majority_vote(answers: Sequence[Hashable | None]) -> tuple[Hashable | None, int, collections.Counter]:
  """The most common answer that is not None (the first seen among ties), its count, and the counts."""
  counter = collections.Counter(a for a in answers if a is not None)
  if not counter:
    return None, 0, counter
  answer, count = counter.most_common(1)[0]  # most_common keeps first-seen order among ties
  return answer, count, counter


def self_consistency(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    extract_answer: Callable[[list[int]], Hashable | None],
    max_new_tokens: int,
    sampling: Sampling = Sampling(temperature=1.0),
    rng=None,
    stop_tokens: Sequence[int] = (),
) -> SelfConsistency:
  """Self-consistency (Wang et al. 2023): N samples per prompt, an answer extracted from each
  (`extract_answer(completion_ids)`, None for no answer), and a majority vote; ties go to the
  answer that appeared first."""
  repeated = _repeat(prompts, n, "self_consistency")
  samples = generate(model, repeated, max_new_tokens=max_new_tokens, sampling=sampling, rng=rng,
                     stop_tokens=stop_tokens)
  answers, votes, agreement = [], [], []
  for p in range(len(prompts)):
    answer, count, counter = majority_vote([extract_answer(c) for c in samples.tokens[p * n: (p + 1) * n]])
    votes.append(counter)
    answers.append(answer)
    agreement.append(count / n)
  return SelfConsistency(answers, votes, np.asarray(agreement), samples)


@dataclasses.dataclass(frozen=True)
class BudgetForcing:
  """A thinking budget, enforced while decoding (pass as `generate(..., controller=BudgetForcing(...))`).

  Thinking tokens are those between the start delimiter and the end of thinking (when
  start_think_token is None, thinking starts with the first generated token: the prompt ends with
  the start delimiter). While fewer than min_thinking_tokens have been thought, a sampled
  end_think_token is replaced by `continuation` (e.g. the ids of "Wait"); when max_thinking_tokens
  have been thought, `end_think_delimiter` (default: the end token alone) is forced. Forced tokens
  get log-prob 0 under the sampling distribution.
  """

  end_think_token: int
  min_thinking_tokens: int = 0
  max_thinking_tokens: int | None = None
  continuation: tuple[int, ...] = ()
  end_think_delimiter: tuple[int, ...] | None = None
  start_think_token: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "continuation", tuple(int(t) for t in self.continuation))
    if self.end_think_delimiter is not None:
      object.__setattr__(self, "end_think_delimiter", tuple(int(t) for t in self.end_think_delimiter))
    if self.min_thinking_tokens < 0:
      raise ValueError(f"BudgetForcing.min_thinking_tokens={self.min_thinking_tokens} must be >= 0")
    if self.max_thinking_tokens is not None and self.max_thinking_tokens < self.min_thinking_tokens:
      raise ValueError(f"BudgetForcing.max_thinking_tokens={self.max_thinking_tokens} is below "
                       f"min_thinking_tokens={self.min_thinking_tokens}")
    if self.min_thinking_tokens and not self.continuation:
      raise ValueError("BudgetForcing.continuation is empty, but min_thinking_tokens needs it "
                       "(e.g. the token ids of 'Wait')")
    if self.end_think_delimiter == ():
      raise ValueError("BudgetForcing.end_think_delimiter is empty; leave it None for the end token alone")

  @classmethod
  def from_text(cls, encode: Callable[[str], list[int]], *, end_think: str, continuation: str = "Wait",
                start_think: str | None = None, **budget) -> "BudgetForcing":
    """Delimiters and continuation as text; `encode` is the tokenizer's (ends must be one token each)."""
    def single(text, what):
      ids = encode(text)
      if len(ids) != 1:
        raise ValueError(f"BudgetForcing {what}={text!r} encodes to {len(ids)} tokens {ids}; it must be one token")
      return ids[0]

    return cls(
        end_think_token=single(end_think, "end_think"), continuation=tuple(encode(continuation)),
        start_think_token=None if start_think is None else single(start_think, "start_think"), **budget,
    )

  # ------------------------------------------------------------------ the Controller protocol
  def init(self, batch_size: int):
    phase = 0 if self.start_think_token is not None else 1  # 0 before thinking, 1 thinking, 2 after
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return {"phase": zeros + phase, "count": zeros, "kind": zeros, "index": zeros}

  def step(self, state, tokens, active):
    delimiter = self.end_think_delimiter or (self.end_think_token,)
    width = max(len(self.continuation), len(delimiter), 1)
    sequences = jnp.asarray(  # kind 0: nothing forced, 1: continuation, 2: delimiter
        [[0] * width, list(self.continuation) + [0] * (width - len(self.continuation)),
         list(delimiter) + [0] * (width - len(delimiter))], jnp.int32)
    sequence_lengths = jnp.asarray([0, len(self.continuation), len(delimiter)], jnp.int32)
    limit = _NO_LIMIT if self.max_thinking_tokens is None else self.max_thinking_tokens
    phase, count, kind, index = state["phase"], state["count"], state["kind"], state["index"]

    free = (phase == 1) & (kind == 0)  # thinking, nothing being forced: the model's token may be overruled
    start_continuation = free & (tokens == self.end_think_token) & (count < self.min_thinking_tokens)
    start_delimiter = free & ~start_continuation & (count >= limit)
    kind = jnp.where(start_continuation, 1, jnp.where(start_delimiter, 2, kind))
    index = jnp.where(start_continuation | start_delimiter, 0, index)
    forced = kind > 0
    out = jnp.where(forced, sequences[kind, jnp.minimum(index, width - 1)], tokens)

    index = jnp.where(forced, index + 1, index)
    finished = forced & (index >= sequence_lengths[kind])
    ends_thinking = (free & ~forced & (out == self.end_think_token)) | (finished & (kind == 2))
    counts = (phase == 1) & ~ends_thinking & ~(forced & (kind == 2))
    new = {
        "phase": jnp.where(ends_thinking, 2, jnp.where((phase == 0) & (out == self.start_think_token), 1, phase)),
        "count": count + counts,
        "kind": jnp.where(finished, 0, kind),
        "index": jnp.where(finished, 0, index),
    }
    new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
    return out, forced & active, new
