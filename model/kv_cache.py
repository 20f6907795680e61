"""The key/value caches that decoding passes through the same Transformer: dense and paged.

Slot s of a row holds the key and value of that row's position s, so a row's cache needs no
length field: causality (a query at position p sees slots <= p) already hides the slots not
yet written, and slots holding stale values (right padding of a ragged prompt, draft tokens a
speculative step rejected) always lie beyond the query and are overwritten before any query
reaches them. Sliding windows and soft-caps are the attention mask's and the logits' business,
exactly as without a cache.

The paged cache (the serving engine's, infer/engine.py) is a pool of fixed-size blocks per layer;
a sequence owns a list of blocks (its row of a block table) and its position p lives at slot
p % block_size of its (p // block_size)-th block. A step's tokens run as one flattened row, tokens
of many sequences side by side, each told its sequence by `PageTable.seq_ids`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.sharding import shard

# [L, B, K, S, H]: sharded like activations (batch over data/fsdp, kv heads over tensor). Each kv
# head's slots are contiguous, so a decode step's attention contracts one layer's cache where it
# lies; in [B, S, K, H] order XLA:CPU transposed every layer's whole cache at every step.
CACHE_AXES = ("layers", "activation_batch", "activation_kv_heads", "activation_cache_length", "activation_head_dim")


def _zeros(config: ModelConfig, shape: tuple[int, ...], dtype, axes) -> tuple[jax.Array, jax.Array]:
  """Keys and values: zeros of [L, *shape], placed by the logical axes."""
  zeros = shard(jnp.zeros((config.num_layers, *shape), dtype or config.compute_dtype), axes)
  return zeros, zeros


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: jax.Array  # [L, B, K, S, H]
  v: jax.Array  # [L, B, K, S, H]

  @property
  def max_length(self) -> int:  # S
    return self.k.shape[3]

  @classmethod
  def create(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> "KVCache":
    """Zeros of [L, B, K, S, H] in the model's compute dtype (call under jit to create it sharded)."""
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    return cls(*_zeros(config, shape, dtype, CACHE_AXES))


def write(cache: jax.Array, layer: int | jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """cache [L, B, K, S, H] with new [B, T, K, H] written into `layer` at slots starts[b] .. starts[b] + T - 1.

  A scatter, which XLA performs in place on a loop-carried cache. Slots past S are dropped (the
  callers size S so that this never happens to a token that is read).
  """
  batch, length = new.shape[:2]
  slots = starts[:, None] + jnp.arange(length)  # [B, T]
  rows = jnp.arange(batch)[:, None]
  # The indexed dims (B, T) lead the selection, then K and H: exactly new's [B, T, K, H].
  return cache.at[layer, rows, :, slots].set(new.astype(cache.dtype), mode="drop")


def write_from_start(cache: jax.Array, layer: int | jax.Array, new: jax.Array) -> jax.Array:
  """cache [L, B, K, S, H] with new [B, T, K, H] in `layer` at slots 0 .. T - 1 of every row (a prefill)."""
  new = jnp.swapaxes(new, 1, 2)[None].astype(cache.dtype)  # [1, B, K, T, H]
  return jax.lax.dynamic_update_slice(cache, new, (layer, 0, 0, 0, 0))


# [L, P, block_size, K, H]: blocks are whole on every device; kv heads over tensor, like activations.
PAGED_CACHE_AXES = ("layers", None, None, "activation_kv_heads", "activation_head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  k: jax.Array  # [L, P, block_size, K, H]
  v: jax.Array  # [L, P, block_size, K, H]

  @property
  def num_blocks(self) -> int:  # P
    return self.k.shape[1]

  @property
  def block_size(self) -> int:
    return self.k.shape[2]

  @classmethod
  def create(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype=None) -> "PagedKVCache":
    """Zeros of [L, P, block_size, K, H] in the model's compute dtype (call under jit to create it sharded)."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return cls(*_zeros(config, shape, dtype, PAGED_CACHE_AXES))


@functools.partial(jax.tree_util.register_dataclass, data_fields=("block_tables", "seq_ids"),
                   meta_fields=("max_q_len",))
@dataclasses.dataclass(frozen=True)
class PageTable:
  """Where a flattened step's tokens read and write in a PagedKVCache.

  The tokens of a sequence are contiguous and in position order, sequences in row order, padding
  (position < 0) last: the paged-attention kernel relies on it."""

  block_tables: jax.Array  # [B, M] int32: each sequence's blocks, in order
  seq_ids: jax.Array  # [T] int32: the row of block_tables each token of the step belongs to
  max_q_len: int | None = None  # static: the most tokens one sequence has in the step (1 when decoding)


def write_paged(cache: jax.Array, layer: int | jax.Array, new: jax.Array, table: PageTable,
                positions: jax.Array) -> jax.Array:
  """cache [L, P, bs, K, H] with new [T, K, H] written into `layer` where each token's position puts it.

  Tokens with a negative position (padding) are dropped, as is any token whose block is >= P.
  """
  num_blocks, block_size = cache.shape[1], cache.shape[2]
  blocks = table.block_tables.at[table.seq_ids, jnp.maximum(positions // block_size, 0)].get(mode="clip")  # [T]
  blocks = jnp.where(positions >= 0, blocks, num_blocks)
  return cache.at[layer, blocks, positions % block_size].set(new.astype(cache.dtype), mode="drop")
