"""Causal self-attention in tiles, with an online softmax forward and a backward that recomputes
each tile's probabilities (FlashAttention-2's algorithm, Dao 2023), in plain jnp: the `xla` path's
causal self-attention on a CPU, for training and prefill.

XLA runs each elementwise op of attention as its own pass over its operand. Over whole rows of
logits ([B, N, Tq, S] at T=2048: 17 MB a block) every pass goes to memory, and at T=2048 one
layer's forward and backward took 4.7x torch's fused CPU kernel (benchmarks/RESULTS.md). Over
tiles small enough to stay in a core's L2 cache (`tile_size`), the passes run from the cache.
Tiles above the diagonal, and those wholly outside a static sliding window, are never computed.

Queries, keys and values keep the decoder's layout ([B, T, N, H], [B, T, K, H]); inside, T is
padded to whole blocks and each query block is [B, K, G * block, H]: a kv head's G query heads
stacked into one tall product (GQA's backward 15% faster than with a separate G axis at T=2048,
K=2), every product written in its dot's own order. Logits, the softmax statistics and all
accumulators are float32.
"""

import functools

import jax
import jax.numpy as jnp

from model.attention_masks import MASKED

_TILE_BYTES = 1 << 21  # one tile's float32 logits [B, N, bq, bk]: 2 MiB, under a core's L2 (1-4 MiB here)
_MAX_BLOCKS = 16  # at most this many blocks per axis (the tile loops are unrolled into the program)


def tile_size(batch: int, num_heads: int, length: int) -> int:
  """The block length (queries and keys alike): a power of two in [64, 512] whose [B, N, b, b]
  float32 tile fits _TILE_BYTES and no longer than length needs, raised so that length needs at
  most _MAX_BLOCKS blocks. B and N are the global ones: under a mesh each device's tile is smaller."""
  block = 512
  while block > 64 and (batch * num_heads * block * block * 4 > _TILE_BYTES or block // 2 >= length):
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
  """softmax(q k^T * scale, causal and masked) v, for tokens at positions 0..T-1. Returns [B, T, N, H].

  Reverse-mode autodiff only (a custom_vjp): jax.jvp, jacfwd and hessian raise through it."""
  batch, length, num_heads, _ = q.shape
  block = block or tile_size(batch, num_heads, length)
  static_window = sliding_window if isinstance(sliding_window, int) else 0
  window = jnp.asarray(sliding_window, jnp.int32)
  if segment_ids is not None:  # padded to whole blocks; any id does there: padding is every real query's future
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, -length % block)), constant_values=-1)
  return _attention(q, k, v, segment_ids, window, float(scale), int(static_window), int(block))


def _blocks(length: int, block: int, static_window: int):
  """(i, a, [(j, c)]) for query block i starting at a: the key blocks j (starting at c) at or below
  the diagonal that a static window does not wholly hide, the diagonal last."""
  starts = range(0, length, block)
  for i, a in enumerate(starts):
    keys = [(j, c) for j, c in enumerate(starts[: i + 1]) if not (static_window and c + block - 1 <= a - static_window)]
    yield i, a, keys


def _tile_mask(a, c, block, segment_ids, window):
  """[B or 1, 1, 1, bq, bk] bool: may query a + t see key c + s (causal, window, segments); padded
  positions past T are keys no real query sees (they lie in its future)."""
  q_pos = a + jnp.arange(block)[:, None]
  k_pos = c + jnp.arange(block)[None, :]
  mask = ((k_pos <= q_pos) & ((window == 0) | (q_pos - k_pos < window)))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, a:a + block, None] == segment_ids[:, None, c:c + block])
  return mask[:, None, None]


def _to_blocks(x, block, num_kv_heads):
  """[B, T, N, H] -> [n, B, K, G * block, H]: T padded to n blocks, each block's rows ordered (G, t),
  so a tile's product is one tall dot per kv head (GQA's query heads stacked, not a G axis). Keys
  and values [B, S, K, H] (G = 1) become [n, B, K, block, H]."""
  batch, length, num_heads, head_dim = x.shape
  n = -(-length // block)
  x = jnp.pad(x, ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
  x = x.reshape(batch, n, block, num_kv_heads, num_heads // num_kv_heads, head_dim)
  x = jnp.transpose(x, (1, 0, 3, 4, 2, 5))  # [n, B, K, G, block, H]
  return x.reshape(n, batch, num_kv_heads, -1, head_dim)


def _from_blocks(x, length, group):
  """[n, B, K, G * block, H] -> [B, T, N, H]."""
  n, batch, num_kv_heads, rows, head_dim = x.shape
  x = x.reshape(n, batch, num_kv_heads, group, rows // group, head_dim)
  x = jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(batch, -1, num_kv_heads * group, head_dim)
  return x[:, :length]


def _logits(q_i, k_j, scale):  # [B, K, G*bq, H] x [B, K, bk, H] -> [B, K, G*bq, bk] float32
  return jnp.einsum("BKMH,BKSH->BKMS", q_i, k_j, preferred_element_type=jnp.float32) * scale


def _masked(x, mask, value):  # x [B, K, G*bq, bk] where mask [B|1, 1, 1, bq, bk], else value
  batch, kv_heads, rows, cols = x.shape
  group = rows // mask.shape[-2]
  return jnp.where(mask, x.reshape(batch, kv_heads, group, -1, cols), value).reshape(x.shape)


def _forward(q, k, v, segment_ids, window, scale, static_window, block):
  """(out [B, T, N, H], logsumexp [n, B, K, G * block] float32)."""
  length, num_kv_heads = q.shape[1], k.shape[2]
  group = q.shape[2] // num_kv_heads
  qb, kb, vb = (_to_blocks(x, block, num_kv_heads) for x in (q, k, v))
  outs, lses = [], []
  for i, a, keys in _blocks(length, block, static_window):
    m = l = acc = None
    # The diagonal tile first: every query sees itself there, so m is a visible logit's from then on
    # and exp(MASKED - m) is 0 without a second select.
    for j, c in keys[-1:] + keys[:-1]:
      mask = _tile_mask(a, c, block, segment_ids, window)
      s = _masked(_logits(qb[i], kb[j], scale), mask, MASKED)
      m_new = jnp.max(s, axis=-1) if m is None else jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])  # [B, K, G*bq, bk]
      pv = jnp.einsum("BKMS,BKSH->BKMH", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
      if m is None:
        l, acc = jnp.sum(p, axis=-1), pv
      else:
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + pv
      m = m_new
    outs.append(acc / l[..., None])  # every query sees at least itself: l > 0 (padded rows too)
    lses.append(m + jnp.log(l))
  return _from_blocks(jnp.stack(outs), length, group).astype(q.dtype), jnp.stack(lses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, segment_ids, window, scale, static_window, block):
  return _forward(q, k, v, segment_ids, window, scale, static_window, block)[0]


def _attention_fwd(q, k, v, segment_ids, window, scale, static_window, block):
  out, lse = _forward(q, k, v, segment_ids, window, scale, static_window, block)
  return out, (q, k, v, segment_ids, window, out, lse)


def _attention_bwd(scale, static_window, block, residuals, d_out):
  q, k, v, segment_ids, window, out, lse = residuals
  length, num_kv_heads = q.shape[1], k.shape[2]
  group = q.shape[2] // num_kv_heads
  qb, kb, vb = (_to_blocks(x, block, num_kv_heads) for x in (q, k, v))
  d_outs = _to_blocks(d_out, block, num_kv_heads)  # padded rows: zero cotangent, so they add nothing
  # delta = sum_h dO * O = sum_s P * dP: the softmax's backward, per query.
  delta = jnp.sum(d_outs.astype(jnp.float32) * _to_blocks(out, block, num_kv_heads).astype(jnp.float32), axis=-1)
  dq, dk, dv = [], [None] * qb.shape[0], [None] * qb.shape[0]
  for i, a, keys in _blocks(length, block, static_window):
    dq_i = None
    for j, c in keys:
      mask = _tile_mask(a, c, block, segment_ids, window)
      p = _masked(jnp.exp(_logits(qb[i], kb[j], scale) - lse[i][..., None]), mask, 0.0)  # [B, K, G*bq, bk]
      dv_j = jnp.einsum("BKMS,BKMH->BKSH", p.astype(d_outs.dtype), d_outs[i], preferred_element_type=jnp.float32)
      dp = jnp.einsum("BKMH,BKSH->BKMS", d_outs[i], vb[j], preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
      dq_ij = jnp.einsum("BKMS,BKSH->BKMH", ds, kb[j], preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("BKMS,BKMH->BKSH", ds, qb[i], preferred_element_type=jnp.float32)
      dq_i = dq_ij if dq_i is None else dq_i + dq_ij
      dk[j] = dk_j if dk[j] is None else dk[j] + dk_j
      dv[j] = dv_j if dv[j] is None else dv[j] + dv_j
    dq.append(dq_i)
  # Every key block is seen by at least its own query block (the diagonal tile).
  dq = _from_blocks(jnp.stack(dq), length, group).astype(q.dtype)
  dk = _from_blocks(jnp.stack(dk), length, 1).astype(k.dtype)
  dv = _from_blocks(jnp.stack(dv), length, 1).astype(v.dtype)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
