"""Independent float64 numpy references used by several tests (loops, explicit repeats, no jax)."""

import numpy as np


def attention(q, k, v, *, causal=True, window=0, q_segments=None, kv_segments=None, softcap=0.0, scale=None,
              alibi_slopes=None):
  """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H], float64, one head at a time.

  Queries are the last T of S positions. A fully masked query row gives zeros.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  scale = head_dim**-0.5 if scale is None else scale
  out = np.zeros_like(q)
  for b in range(batch):
    for n in range(num_heads):
      kv_head = n // (num_heads // num_kv_heads)  # kv head shared by a group of query heads
      for t in range(q_len):
        i = t + kv_len - q_len
        logits = np.array([q[b, t, n] @ k[b, j, kv_head] * scale for j in range(kv_len)])
        if softcap:
          logits = softcap * np.tanh(logits / softcap)
        if alibi_slopes is not None:
          logits = logits - alibi_slopes[n] * np.abs(i - np.arange(kv_len))
        visible = np.ones(kv_len, bool)
        for j in range(kv_len):
          if causal and j > i:
            visible[j] = False
          if window and not i - window < j:
            visible[j] = False
          if q_segments is not None and q_segments[b, t] != kv_segments[b, j]:
            visible[j] = False
        if not visible.any():
          continue
        weights = np.exp(logits[visible] - logits[visible].max())
        weights /= weights.sum()
        out[b, t, n] = weights @ v[b, visible, kv_head]
  return out
