"""Sampling with different parameters in every row: the serving engine's batch mixes requests.

Per row: presence and frequency penalties on the logits (OpenAI's definition: minus presence * [the
token was generated] minus frequency * its count), then as infer.sampling does for one setting:
temperature, top-k, top-p, min-p, each filter applied to what the previous one left, and a draw
(argmax at temperature 0). Each row draws with its own key: fold_in(fold_in(key(seed), completion),
output index), so a completion's tokens depend on its seed alone, not on what shares its batch.
Log-probs are the raw model's (temperature 1, no filter, no penalty), as OpenAI reports them.
"""

import dataclasses

import jax
import jax.numpy as jnp

from infer.sampling import argmax
from infer.sampling_params import MAX_TOP_LOGPROBS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
  """[B] arrays, one entry per row."""

  temperature: jax.Array  # float32; 0 is greedy
  top_k: jax.Array  # int32; 0 is off
  top_p: jax.Array  # float32; 1 is off
  min_p: jax.Array  # float32; 0 is off
  presence_penalty: jax.Array  # float32
  frequency_penalty: jax.Array  # float32
  seed: jax.Array  # uint32
  completion: jax.Array  # int32: which of the request's n completions
  output_index: jax.Array  # int32: how many tokens the completion has generated before this one


def penalized(logits: jax.Array, rows: RowSampling, history: jax.Array) -> jax.Array:
  """logits [B, V] minus the penalties of the tokens in history [B, G] (-1 pads)."""
  batch, vocab = logits.shape
  valid = history >= 0
  counts = jnp.zeros((batch, vocab), jnp.float32).at[jnp.arange(batch)[:, None], jnp.where(valid, history, 0)].add(
      valid.astype(jnp.float32))
  return (logits - rows.presence_penalty[:, None] * (counts > 0)
          - rows.frequency_penalty[:, None] * counts)


def filtered_sorted(logits: jax.Array, rows: RowSampling) -> tuple[jax.Array, jax.Array]:
  """(order [B, V], log-probs [B, V] in that order with -inf on filtered tokens) after temperature,
  top-k, top-p and min-p. The sort is stable: the lower id comes first among ties."""
  temperature = jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
  logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
  order = jnp.argsort(-logprobs, axis=-1, stable=True)
  ranked = jnp.take_along_axis(logprobs, order, axis=-1)
  rank = jnp.arange(logits.shape[-1])[None, :]
  keep = (rows.top_k[:, None] <= 0) | (rank < rows.top_k[:, None])
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  keep &= jnp.cumsum(probs, axis=-1) - probs < rows.top_p[:, None]  # the top token always stays
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  keep &= probs >= rows.min_p[:, None] * probs[:, :1]
  return order, jnp.where(keep, ranked, -jnp.inf)


def sample_rows(logits: jax.Array, rows: RowSampling, history: jax.Array | None, *, filters: bool = True,
                top_logprobs: bool = True) -> dict[str, jax.Array]:
  """logits [B, V] float32 -> {tokens [B], logprobs [B], and with top_logprobs: top_tokens [B, 20],
  top_logprobs [B, 20]}. filters=False (static: no row has top-k, top-p or min-p) skips the sort."""
  raw = jax.nn.log_softmax(logits, axis=-1)
  if history is not None:
    logits = penalized(logits, rows, history)
  if filters:
    order, ranked = filtered_sorted(logits, rows)
  else:
    order, ranked = None, logits / jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]

  def draw(seed, completion, index, ranked_row):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), completion), index)
    return jax.random.categorical(key, ranked_row)

  picked = jax.vmap(draw)(rows.seed, rows.completion, rows.output_index, ranked)  # [B] (a rank when sorted)
  sampled = picked if order is None else jnp.take_along_axis(order, picked[:, None], axis=-1)[:, 0]
  tokens = jnp.where(rows.temperature > 0, sampled, argmax(logits)).astype(jnp.int32)
  out = {"tokens": tokens, "logprobs": jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]}
  if top_logprobs:
    values, ids = jax.lax.top_k(raw, min(MAX_TOP_LOGPROBS, raw.shape[-1]))
    out.update(top_tokens=ids.astype(jnp.int32), top_logprobs=values)
  return out
