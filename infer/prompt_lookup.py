"""Prompt-lookup drafting (Saxena 2023, "Prompt Lookup Decoding"; vLLM's n-gram proposer): the draft
tokens are what followed the most recent earlier occurrence of the row's last n tokens.

No model runs: a proposal costs a few comparisons over the row's token history, so a round of
speculative decoding costs one target pass over k + 1 tokens. It pays where text repeats: code
edits, summaries quoting their source, retrieval answers, and small models' loops. As a draft
distribution it is a point mass on the proposed token, so the speculative acceptance rule keeps
the target's sampling distribution exactly (infer/speculative.py).
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PromptLookup:
  """Propose from the longest n-gram (max_ngram down to min_ngram) that ends the row's context and
  occurred before, taking the tokens after its most recent earlier occurrence. A continuation that
  runs into the context's end wraps around the repeat (a loop of period 2 proposes 2 tokens
  alternately), and a row with no match proposes its last token again."""

  max_ngram: int = 3
  min_ngram: int = 1

  def __post_init__(self):
    for name in ("max_ngram", "min_ngram"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PromptLookup.{name}={value!r} must be a positive int")
    if self.min_ngram > self.max_ngram:
      raise ValueError(f"PromptLookup.min_ngram={self.min_ngram} exceeds max_ngram={self.max_ngram}")


def _match_start(history: jax.Array, positions: jax.Array, n: int) -> jax.Array:
  """[B] where the continuation of the latest earlier occurrence of the n tokens ending at
  `positions` starts (that occurrence's start + n), or -1 where there is none."""
  length = history.shape[1]
  starts = jnp.arange(length)  # candidate occurrence starts j
  suffix = jnp.take_along_axis(history, jnp.maximum(positions[:, None] - n + 1 + jnp.arange(n), 0), axis=1)  # [B, n]
  match = jnp.ones(history.shape, bool)
  for m in range(n):
    match &= jnp.roll(history, -m, axis=1) == suffix[:, m:m + 1]  # history[j + m] == suffix[m]
  # The occurrence ends before the suffix's last token (j + n <= position) and the suffix is whole.
  match &= (starts[None] + n <= positions[:, None]) & (positions[:, None] >= n - 1)
  latest = jnp.max(jnp.where(match, starts[None], -1), axis=1)
  return jnp.where(latest >= 0, latest + n, -1)


def propose(history: jax.Array, positions: jax.Array, num_tokens: int, lookup: PromptLookup) -> jax.Array:
  """history [B, S] int32 (slot s = position s; valid through `positions`), positions [B] (the last
  known token's) -> [B, num_tokens] int32 proposals for positions + 1 .. positions + num_tokens."""
  batch, length = history.shape
  start = jnp.full((batch,), -1, jnp.int32)
  for n in range(lookup.max_ngram, lookup.min_ngram - 1, -1):  # the longest match wins
    found = _match_start(history, positions, n)
    start = jnp.where(start < 0, found, start)
  start = jnp.where(start < 0, positions, start)  # no match: repeat the last token
  # Position positions + 1 + i repeats position start + i; past `positions` that is a proposal already made.
  rows = jnp.arange(batch)
  extended = history
  proposals = []
  for i in range(num_tokens):
    token = extended[rows, jnp.minimum(start + i, length - 1)]
    extended = extended.at[rows, positions + 1 + i].set(token, mode="drop")
    proposals.append(token)
  return jnp.stack(proposals, axis=1)


def record(history: jax.Array, positions: jax.Array, emitted: jax.Array, count: jax.Array) -> jax.Array:
  """Writes each row's first count[b] emitted tokens [B, k] at positions + 1 onwards."""
  rows = jnp.arange(history.shape[0])[:, None]
  offsets = jnp.arange(emitted.shape[1])[None]
  columns = jnp.where(offsets < count[:, None], positions[:, None] + 1 + offsets, history.shape[1])  # drop the rest
  return history.at[rows, columns].set(emitted, mode="drop")
