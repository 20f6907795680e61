"""Plain-jnp attention with flash_attention's signature: the T x S matrix materialized.

Its mask is built here from the definitions, not from the kernels' block geometry, so that the
tests compare the kernels against an independent statement of what they compute.
"""

import jax
import jax.numpy as jnp


def visibility(q_len, kv_len, *, causal, sliding_window):
  """[T, S] bool: whether query t sees key s by position. The queries are the last T of the S
  positions (bottom-right alignment), so query t sits at p = t + S - T; causal: s <= p; a window w:
  p - w < s (the w keys up to p itself, when causal)."""
  position = jnp.arange(q_len)[:, None] + (kv_len - q_len)  # [T, 1]
  key = jnp.arange(kv_len)[None, :]  # [1, S]
  visible = jnp.ones((q_len, kv_len), bool)
  if causal:
    visible &= key <= position
  if sliding_window:
    visible &= position - sliding_window < key
  return visible


def reference_attention(
    q, k, v, *, segment_ids=None, causal=True, sliding_window=None, logit_softcap=None, scale=None,
    block_sizes=None, interpret=None,
):
  """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H] in q's dtype, computed in float32 (float64 for
  float64 inputs, under enable_x64). Query head n reads kv head n // G (G = N / K, GQA). Fully
  masked rows are 0. block_sizes and interpret are accepted and ignored."""
  del block_sizes, interpret
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if segment_ids is None:
    q_seg, kv_seg = jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
  elif isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  mask = visibility(q_len, kv_len, causal=causal, sliding_window=sliding_window)[None] & (
      q_seg[:, :, None] == kv_seg[:, None, :])  # [B, T, S]
  group = heads // kv_heads
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim).astype(dtype)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(dtype)) * (head_dim**-0.5 if scale is None else scale)
  if logit_softcap:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  m = mask[:, None, None]  # [B, 1, 1, T, S]
  # A finite fill: a fully masked row's softmax is then finite (and zeroed), and so is its gradient.
  p = jnp.where(m, jax.nn.softmax(jnp.where(m, s, jnp.finfo(dtype).min), axis=-1), 0.0)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(dtype))
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
