"""Causal self-attention in tiles, with an online softmax forward and a backward that recomputes
each tile's probabilities (FlashAttention-2's algorithm, Dao 2023), in plain jnp: the `xla` path's
causal self-attention on a CPU, for training and prefill.

XLA runs each elementwise op of attention as its own pass over its operand. Over whole rows of
logits ([B, N, Tq, S] at T=2048: 17 MB a block) every pass goes to memory, and at T=2048 one
layer's forward and backward took 4.7x torch's fused CPU kernel (benchmarks/RESULTS.md). Over
tiles small enough to stay in a core's L2 cache (`tile_size`), the passes run from the cache.
Tiles above the diagonal, and those wholly outside a static sliding window, are never computed.

Queries, keys and values keep the decoder's layout ([B, T, N, H], [B, T, K, H]); inside, queries
are [B, K, G, T, H] so that each kv head serves its G query heads and every product is written
in its dot's own order. Logits, the softmax statistics and all accumulators are float32.
"""

import functools

import jax
import jax.numpy as jnp

from model.attention_masks import MASKED

_TILE_BYTES = 1 << 21  # one tile's float32 logits [B, N, bq, bk]: 2 MiB, under a core's L2 (1-4 MiB here)
_MAX_BLOCKS = 16  # at most this many blocks per axis (the tile loops are unrolled into the program)


def tile_size(batch: int, num_heads: int, length: int) -> int:
  """The block length (queries and keys alike): a power of two in [64, 512] whose [B, N, b, b]
  float32 tile fits _TILE_BYTES, raised so that length needs at most _MAX_BLOCKS blocks."""
  block = 512
  while block > 64 and batch * num_heads * block * block * 4 > _TILE_BYTES:
    block //= 2
  while block * _MAX_BLOCKS < length:
    block *= 2
  return block


def causal_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    segment_ids: jax.Array | None = None,  # [B, T]; a token sees keys of its own segment only
    *,
    scale: float,
    sliding_window: int | jax.Array = 0,  # query i sees key j only when i - w < j; 0 is off
    block: int | None = None,
) -> jax.Array:
  """softmax(q k^T * scale, causal and masked) v, for tokens at positions 0..T-1. Returns [B, T, N, H]."""
  batch, length, num_heads, _ = q.shape
  block = block or tile_size(batch, num_heads, length)
  static_window = sliding_window if isinstance(sliding_window, int) else 0
  window = jnp.asarray(sliding_window, jnp.int32)
  return _attention(q, k, v, segment_ids, window, float(scale), int(static_window), int(block))


def _blocks(length: int, block: int, static_window: int):
  """(query block (a, b), [key blocks (c, d)]) pairs: the key blocks at or below the diagonal
  that a static window does not wholly hide."""
  bounds = [(a, min(a + block, length)) for a in range(0, length, block)]
  for i, (a, b) in enumerate(bounds):
    keys = [(c, d) for c, d in bounds[: i + 1] if not (static_window and d - 1 <= a - static_window)]
    yield (a, b), keys


def _tile_mask(a, b, c, d, segment_ids, window):
  """[B or 1, bq, bk] bool: may query a + t see key c + s (causal, window, segments)."""
  q_pos = jnp.arange(a, b)[:, None]
  k_pos = jnp.arange(c, d)[None, :]
  mask = (k_pos <= q_pos) & ((window == 0) | (q_pos - k_pos < window))
  mask = mask[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, a:b, None] == segment_ids[:, None, c:d])
  return mask[:, None, None]  # [B, 1, 1, bq, bk]: broadcast over K and G


def _split_heads(q, num_kv_heads):  # [B, T, N, H] -> [B, K, G, T, H]
  batch, length, num_heads, head_dim = q.shape
  q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return jnp.transpose(q, (0, 2, 3, 1, 4))


def _merge_heads(x):  # [B, K, G, T, H] -> [B, T, N, H]
  batch, kv_heads, group, length, head_dim = x.shape
  return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(batch, length, kv_heads * group, head_dim)


def _forward(q, k, v, segment_ids, window, scale, static_window, block):
  """(out [B, T, N, H], logsumexp [B, K, G, T] float32)."""
  length, num_kv_heads = q.shape[1], k.shape[2]
  qs = _split_heads(q, num_kv_heads)  # [B, K, G, T, H]
  ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
  outs, lses = [], []
  for (a, b), keys in _blocks(length, block, static_window):
    q_i = qs[:, :, :, a:b]
    m = l = acc = None
    for c, d in keys:
      s = jnp.einsum("BKGTH,BKSH->BKGTS", q_i, ks[:, :, c:d], preferred_element_type=jnp.float32) * scale
      mask = _tile_mask(a, b, c, d, segment_ids, window)
      s = jnp.where(mask, s, MASKED)
      m_new = jnp.max(s, axis=-1) if m is None else jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, bq, bk]
      pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), vs[:, :, c:d], preferred_element_type=jnp.float32)
      if m is None:
        l, acc = jnp.sum(p, axis=-1), pv
      else:
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + pv
      m = m_new
    outs.append(acc / l[..., None])  # every query sees at least itself: l > 0
    lses.append(m + jnp.log(l))
  out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H]
  return _merge_heads(out).astype(q.dtype), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, segment_ids, window, scale, static_window, block):
  return _forward(q, k, v, segment_ids, window, scale, static_window, block)[0]


def _attention_fwd(q, k, v, segment_ids, window, scale, static_window, block):
  out, lse = _forward(q, k, v, segment_ids, window, scale, static_window, block)
  return out, (q, k, v, segment_ids, window, out, lse)


def _attention_bwd(scale, static_window, block, residuals, d_out):
  q, k, v, segment_ids, window, out, lse = residuals
  length, num_kv_heads = q.shape[1], k.shape[2]
  qs, d_outs = _split_heads(q, num_kv_heads), _split_heads(d_out, num_kv_heads)  # [B, K, G, T, H]
  ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
  # delta_t = sum_h dO * O = sum_s P * dP: the softmax's backward, per query.
  delta = jnp.sum(d_outs.astype(jnp.float32) * _split_heads(out, num_kv_heads).astype(jnp.float32), axis=-1)
  dq_blocks = []
  dk = [None] * (-(-length // block))
  dv = [None] * len(dk)
  for (a, b), keys in _blocks(length, block, static_window):
    q_i, do_i = qs[:, :, :, a:b], d_outs[:, :, :, a:b]
    lse_i, delta_i = lse[:, :, :, a:b, None], delta[:, :, :, a:b, None]
    dq_i = None
    for c, d in keys:
      j = c // block
      s = jnp.einsum("BKGTH,BKSH->BKGTS", q_i, ks[:, :, c:d], preferred_element_type=jnp.float32) * scale
      p = jnp.where(_tile_mask(a, b, c, d, segment_ids, window), jnp.exp(s - lse_i), 0.0)  # [B, K, G, bq, bk]
      dv_j = jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, vs[:, :, c:d], preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i) * scale).astype(q.dtype)
      dq_ij = jnp.einsum("BKGTS,BKSH->BKGTH", ds, ks[:, :, c:d], preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("BKGTS,BKGTH->BKSH", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = dq_ij if dq_i is None else dq_i + dq_ij
      dk[j] = dk_j if dk[j] is None else dk[j] + dk_j
      dv[j] = dv_j if dv[j] is None else dv[j] + dv_j
    dq_blocks.append(dq_i)
  dq = _merge_heads(jnp.concatenate(dq_blocks, axis=3)).astype(q.dtype)
  # Every key block is seen by at least its own query block (the diagonal tile).
  dk = jnp.swapaxes(jnp.concatenate(dk, axis=2), 1, 2).astype(k.dtype)  # [B, S, K, H]
  dv = jnp.swapaxes(jnp.concatenate(dv, axis=2), 1, 2).astype(v.dtype)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
