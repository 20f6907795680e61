"""Attention backends against a float64, one-head-at-a-time numpy reference."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_ops, positional
from tests import reference

B, T, H = 2, 12, 8


def _inputs(num_heads, num_kv_heads, q_len=T, kv_len=T, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (B, q_len, num_heads, H))
  k = jax.random.normal(keys[1], (B, kv_len, num_kv_heads, H))
  v = jax.random.normal(keys[2], (B, kv_len, num_kv_heads, H))
  return q, k, v


SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], [1] * 6 + [2] * 6])


@pytest.mark.parametrize(
    "heads,kv_heads,causal,window,segments,softcap",
    [
        (4, 4, True, 0, False, 0.0),  # MHA
        (4, 1, True, 0, False, 0.0),  # MQA
        (4, 2, False, 0, False, 0.0),  # GQA, bidirectional
        (4, 2, True, 3, False, 0.0),  # sliding window
        (4, 2, True, 0, True, 0.0),  # packed segments
        (4, 2, True, 4, True, 2.0),  # everything at once, soft-capped
    ],
)
def test_xla_attention_matches_float64_reference(heads, kv_heads, causal, window, segments, softcap):
  q, k, v = _inputs(heads, kv_heads)
  seg = jnp.asarray(SEGMENTS) if segments else None
  out = attention_ops.dot_product_attention(
      q, k, v, impl="xla", q_segment_ids=seg, kv_segment_ids=seg, causal=causal, sliding_window=window,
      logit_softcap=softcap,
  )
  expected = reference.attention(
      q, k, v, causal=causal, window=window, q_segments=SEGMENTS if segments else None,
      kv_segments=SEGMENTS if segments else None, softcap=softcap,
  )
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,segments", [(0, False), (150, True)])
def test_causal_blocks_match_float64_reference(window, segments):
  """From T = 256 the xla path computes causal self-attention block by block, skipping the blocks
  above the diagonal (and, with a window, those before it); T = 260 leaves a ragged last block."""
  q_len = 260
  q, k, v = _inputs(2, 1, q_len=q_len, kv_len=q_len, seed=3)
  seg = np.repeat(np.array([[1, 2, 3], [1, 1, 2]]), [90, 100, 70], axis=1) if segments else None
  slopes = positional.alibi_slopes(2)
  kwargs = dict(causal=True, window=window, softcap=2.0, alibi_slopes=slopes, q_segments=seg, kv_segments=seg)
  out = attention_ops.dot_product_attention(
      q, k, v, q_segment_ids=None if seg is None else jnp.asarray(seg), kv_segment_ids=None if seg is None else
      jnp.asarray(seg), causal=True, sliding_window=window, logit_softcap=2.0, alibi_slopes=slopes,
  )
  np.testing.assert_allclose(out, reference.attention(q, k, v, **kwargs), atol=2e-5, rtol=2e-5)
  # Gradients equal those of one masked pass over all of T (the path shorter sequences take).
  segment_ids = None if seg is None else jnp.asarray(seg)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  blocked = functools.partial(
      attention_ops.dot_product_attention, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
      sliding_window=window, logit_softcap=2.0, alibi_slopes=slopes,
  )
  positions = jnp.broadcast_to(jnp.arange(q_len), (B, q_len))
  whole = functools.partial(
      attention_ops._masked_xla_attention, q_positions=positions, kv_positions=positions,
      q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True, sliding_window=window,
      scale=H**-0.5, logit_softcap=2.0, alibi_slopes=slopes,
  )
  got = jax.jit(jax.grad(functools.partial(loss, blocked), argnums=(0, 1, 2)))(q, k, v)  # jit: one compile, not
  want = jax.jit(jax.grad(functools.partial(loss, whole), argnums=(0, 1, 2)))(q, k, v)  # one per eager op
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_shorter_queries_are_the_last_positions():
  q, k, v = _inputs(4, 2, q_len=5, kv_len=T)
  out = attention_ops.dot_product_attention(q, k, v, causal=True, sliding_window=4)
  np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True, window=4), atol=1e-5, rtol=1e-5)


def test_alibi_matches_reference():
  q, k, v = _inputs(4, 2)
  slopes = positional.alibi_slopes(4)
  out = attention_ops.dot_product_attention(q, k, v, alibi_slopes=slopes)
  np.testing.assert_allclose(out, reference.attention(q, k, v, alibi_slopes=slopes), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_the_paper():
  # Press et al.: 8 heads -> 1/2, 1/4, ..., 1/256; 6 heads -> the 4-head slopes + every other 8-head slope.
  np.testing.assert_allclose(positional.alibi_slopes(8), [2.0**-i for i in range(1, 9)])
  np.testing.assert_allclose(positional.alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_fully_masked_rows_are_zero_not_nan():
  q, k, v = _inputs(4, 2)
  q_seg = jnp.ones((B, T), jnp.int32)
  kv_seg = jnp.full((B, T), 2, jnp.int32)  # no key shares a query's segment
  out = attention_ops.dot_product_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  assert not np.isnan(out).any()
  np.testing.assert_array_equal(out, 0.0)
  grads = jax.grad(lambda q: attention_ops.dot_product_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg).sum())(q)
  assert np.isfinite(grads).all()


def test_traced_window_equals_static_window():
  q, k, v = _inputs(4, 2)
  static = attention_ops.dot_product_attention(q, k, v, sliding_window=3)
  traced = jax.jit(lambda w: attention_ops.dot_product_attention(q, k, v, sliding_window=w))(jnp.int32(3))
  off = jax.jit(lambda w: attention_ops.dot_product_attention(q, k, v, sliding_window=w))(jnp.int32(0))
  np.testing.assert_allclose(static, traced, atol=1e-6)
  np.testing.assert_allclose(off, reference.attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_cudnn_falls_back_to_xla_on_cpu_with_a_message(caplog):
  q, k, v = _inputs(4, 2)
  attention_ops._warn_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    out = attention_ops.dot_product_attention(q, k, v, impl="cudnn", sliding_window=3)
  assert "falls back to 'xla'" in caplog.text and "needs a GPU" in caplog.text
  np.testing.assert_allclose(out, reference.attention(q, k, v, window=3), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cudnn_matches_xla_on_gpu():
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(4, 2, q_len=128, kv_len=128))
  seg = jnp.asarray(np.repeat([[1, 2]], B, 0).repeat(64, 1))
  kwargs = dict(q_segment_ids=seg, kv_segment_ids=seg, sliding_window=16)
  cudnn = attention_ops.dot_product_attention(q, k, v, impl="cudnn", **kwargs)
  xla = attention_ops.dot_product_attention(q, k, v, impl="xla", **kwargs)
  np.testing.assert_allclose(np.float32(cudnn), np.float32(xla), atol=2e-2)


def test_bad_inputs_raise_clear_errors():
  q, k, v = _inputs(4, 2)
  with pytest.raises(ValueError, match="impl 'flash'"):
    attention_ops.dot_product_attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    attention_ops.dot_product_attention(q, k, v, q_segment_ids=jnp.ones((B, T), jnp.int32))
  q3, k3, v3 = _inputs(3, 2)
  with pytest.raises(ValueError, match="query heads 3 are not a multiple of kv heads 2"):
    attention_ops.dot_product_attention(q3, k3, v3)


def _shifted_sparse_reference(q, k, v, group, segments):
  """float64 S^2-Attn with its mask built pair by pair: head n (of N) sees key j from query i when
  j <= i, both lie in one packed segment, and in one group of `group` positions, the groups of the
  second half of the heads starting half a group later."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    starts = [t for t in range(length) if t == 0 or segments[b, t] != segments[b, t - 1]]
    pos = np.array([t - max(s for s in starts if s <= t) for t in range(length)])  # position within its segment
    for n in range(num_heads):
      shift = 0 if n < num_heads // 2 else group // 2
      kv_head = n // (num_heads // num_kv_heads)
      for i in range(length):
        visible = [j for j in range(i + 1) if segments[b, j] == segments[b, i]
                   and (pos[i] + shift) // group == (pos[j] + shift) // group]
        logits = np.array([q[b, i, n] @ k[b, j, kv_head] for j in visible]) * head_dim**-0.5
        weights = np.exp(logits - logits.max())
        out[b, i, n] = (weights / weights.sum()) @ v[b, visible, kv_head]
  return out


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("kv_heads,segments", [(2, False), (1, True)])
def test_shifted_sparse_attention_matches_float64_reference(impl, kv_heads, segments):
  q, k, v = _inputs(4, kv_heads)
  seg = SEGMENTS if segments else np.ones((B, T), np.int32)
  positions = np.stack([np.concatenate([np.arange(n) for n in np.unique(row, return_counts=True)[1]]) for row in seg])
  out = attention_ops.shifted_sparse_attention(
      q, k, v, group=4, positions=jnp.asarray(positions), segment_ids=jnp.asarray(seg) if segments else None, impl=impl)
  np.testing.assert_allclose(out, _shifted_sparse_reference(q, k, v, 4, seg), atol=1e-5, rtol=1e-5)
