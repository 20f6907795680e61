"""Plain-jnp paged attention: each token gathers its sequence's blocks and attends them.

The serving engine (infer/engine.py) runs a step's tokens flattened into one row: tokens of many
sequences, a chunk of a prompt for some, one decode token for others. Sequence b's keys and values
live in the blocks `block_tables[b]` of a pool `[P, block_size, K, H]` (one layer of the paged
cache, model/kv_cache.py): key position j of b is slot j % block_size of block
block_tables[b, j // block_size]. A token at position p sees b's keys at positions j <= p (and,
with a window w, p - w < j); a token with position < 0 is padding and gets zeros. This module states
that directly (the whole visible row gathered, softmax in float32, float64 under enable_x64), so the
kernel (paged_attention.py) and the dense path can be checked against it.
"""

import jax
import jax.numpy as jnp


def paged_visibility(positions, key_positions, sliding_window):
  """[T, S] bool: token t (at positions[t]) sees key position key_positions[s]."""
  p, j = positions[:, None], key_positions[None, :]
  visible = (j <= p) & (p >= 0)
  if not (isinstance(sliding_window, int) and sliding_window == 0):  # 0 is off; a traced window too
    window = jnp.asarray(sliding_window)
    visible &= (window == 0) | (p - window < j)
  return visible


def paged_attention_reference(
    q: jax.Array,  # [T, N, H]: the step's tokens, flattened across sequences
    k_pages: jax.Array,  # [P, block_size, K, H]: one layer's pool of blocks
    v_pages: jax.Array,  # [P, block_size, K, H]
    block_tables: jax.Array,  # [B, M] int32: each sequence's blocks, in order
    seq_ids: jax.Array,  # [T] int32: the row of block_tables each token belongs to
    positions: jax.Array,  # [T] int32: each token's position in its sequence; < 0 for padding
    *,
    scale: float | None = None,
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    alibi_slopes=None,  # [N] or None: a bias of -slope * (p - j)
) -> jax.Array:
  """[T, N, H] in q's dtype; query head n reads kv head n // G (G = N / K, GQA)."""
  tokens, heads, head_dim = q.shape
  block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
  width = block_tables.shape[1] * block_size  # S: the longest sequence the tables can hold
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  tables = block_tables[seq_ids]  # [T, M]

  def gather(pages):  # [P, bs, K, H] -> [T, S, K, H]
    return pages[tables].reshape(tokens, width, kv_heads, head_dim).astype(dtype)

  keys, values = gather(k_pages), gather(v_pages)
  group = heads // kv_heads
  qg = q.reshape(tokens, kv_heads, group, head_dim).astype(dtype)
  s = jnp.einsum("TKGH,TSKH->TKGS", qg, keys) * (head_dim**-0.5 if scale is None else scale)
  if logit_softcap:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  key_positions = jnp.arange(width)
  if alibi_slopes is not None:
    distance = (positions[:, None] - key_positions[None, :]).astype(dtype)  # [T, S]
    slopes = jnp.asarray(alibi_slopes, dtype).reshape(kv_heads, group)
    s -= slopes[None, :, :, None] * distance[:, None, None, :]
  visible = paged_visibility(positions, key_positions, sliding_window)[:, None, None, :]  # [T, 1, 1, S]
  p = jnp.where(visible, jax.nn.softmax(jnp.where(visible, s, jnp.finfo(dtype).min), axis=-1), 0.0)
  out = jnp.einsum("TKGS,TSKH->TKGH", p, values)
  return out.reshape(tokens, heads, head_dim).astype(q.dtype)
