"""A toy model with scripted next-token distributions, for testing decode-loop logic exactly.

The next token depends only on the current one: logits = log(table[token]). It has the interface
`infer.generate` uses (config.vocab_size, init_cache, features with a cache, logits), and no cache
of its own to speak of.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ScriptedConfig:
  vocab_size: int


class ScriptedModel(nnx.Module):
  def __init__(self, transitions: dict[int, int | dict[int, float]], vocab_size: int):
    """transitions: token -> next token, or token -> {next token: probability}; others go to token 0."""
    table = np.full((vocab_size, vocab_size), 1e-30)
    for token in range(vocab_size):
      nxt = transitions.get(token, 0)
      for t, prob in (nxt.items() if isinstance(nxt, dict) else [(nxt, 1.0)]):
        table[token, t] = prob
    self.config = ScriptedConfig(vocab_size)
    self.log_table = nnx.Param(jnp.asarray(np.log(table / table.sum(1, keepdims=True)), jnp.float32))

  def init_cache(self, batch_size, max_length):
    return jnp.zeros((batch_size, max_length), jnp.int32)

  def features(self, tokens, *, positions=None, cache):
    del positions
    return jax.nn.one_hot(tokens, self.config.vocab_size), cache

  def logits(self, features):
    return features @ self.log_table[...]

  def __call__(self, tokens, *, positions, cache):
    features, cache = self.features(tokens, positions=positions, cache=cache)
    return self.logits(features), cache
