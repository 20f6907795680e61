"""The key/value cache that decoding passes through the same Transformer.

Slot s of a row holds the key and value of that row's position s, so a row's cache needs no
length field: causality (a query at position p sees slots <= p) already hides the slots not
yet written, and slots holding stale values (right padding of a ragged prompt, draft tokens a
speculative step rejected) always lie beyond the query and are overwritten before any query
reaches them. Sliding windows and soft-caps are the attention mask's and the logits' business,
exactly as without a cache.
"""

import dataclasses

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.sharding import shard

# [L, B, S, K, H]: sharded like activations (batch over data/fsdp, kv heads over tensor).
CACHE_AXES = ("layers", "activation_batch", "activation_cache_length", "activation_kv_heads", "activation_head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]

  @property
  def max_length(self) -> int:  # S
    return self.k.shape[2]

  @classmethod
  def create(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> "KVCache":
    """Zeros of [L, B, S, K, H] in the model's compute dtype (call under jit to create it sharded)."""
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, dtype or config.compute_dtype)
    return cls(shard(zeros, CACHE_AXES), shard(zeros, CACHE_AXES))


def write(cache: jax.Array, layer: int | jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """cache [L, B, S, K, H] with new [B, T, K, H] written into `layer` at slots starts[b] .. starts[b] + T - 1.

  A scatter, which XLA performs in place on a loop-carried cache. Slots past S are dropped (the
  callers size S so that this never happens to a token that is read).
  """
  batch, length = new.shape[:2]
  slots = starts[:, None] + jnp.arange(length)  # [B, T]
  rows = jnp.arange(batch)[:, None]
  return cache.at[layer, rows, slots].set(new.astype(cache.dtype), mode="drop")
