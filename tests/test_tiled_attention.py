"""Tiled causal attention (online softmax, recomputing backward) against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_ops, tiled_attention
from tests import reference
from tests.jitted import output_and_vjp

B, H = 2, 8


def _inputs(length, num_heads, num_kv_heads, seed):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, length, num_heads, H)).astype(np.float32)
  k, v = (rng.standard_normal((B, length, num_kv_heads, H)).astype(np.float32) for _ in range(2))
  return q, k, v


def _dense_float64(q, k, v, segments, window):
  """Plain jnp in float64: every (query, key) logit at once, one mask, one softmax."""
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * head_dim**-0.5
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  mask = (j <= i) & ((window == 0) | (i - j < window))
  mask = jnp.asarray(mask)[None, None]
  if segments is not None:
    mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


CASES = [  # heads, kv heads, length, block, window, segments, traced window
    (4, 2, 300, 64, 0, False, False),  # GQA; T = 300 leaves a ragged last block
    (2, 1, 300, 64, 70, True, False),  # MQA, packed segments, a static window that skips whole tiles
    (4, 4, 300, 128, 33, True, True),  # a traced window (alternating layers in a scan): masked, nothing skipped
    (2, 2, 256, 64, 20, True, False),  # whole blocks, a window shorter than a block, segment id -1 in the data
]


@pytest.mark.parametrize("heads,kv_heads,length,block,window,segmented,traced", CASES)
def test_tiled_attention_and_its_gradients_match_float64(heads, kv_heads, length, block, window, segmented, traced):
  q, k, v = _inputs(length, heads, kv_heads, seed=heads + block)
  segments = None
  if segmented:
    segments = np.repeat(np.array([[1, 2, 3], [1, 1, 2]]), [length - 180, 100, 80], axis=1)
    if length % block == 0:
      segments = segments - 2  # ids -1, -1, 0 and -1, -1, 0: the value the tiles pad with
  cotangent = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
  seg32 = None if segments is None else jnp.asarray(segments, jnp.int32)

  def tiled(q, k, v, window_arg=window):  # traced: the window a jit argument (a tracer), as in a layer scan
    return tiled_attention.causal_attention(q, k, v, seg32, scale=H**-0.5, sliding_window=window_arg, block=block)

  out, grads = output_and_vjp(tiled, (q, k, v), cotangent, *((jnp.int32(window),) if traced else ()))
  with jax.enable_x64(True):
    q64, k64, v64, c64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v, cotangent))
    seg64 = None if segments is None else jnp.asarray(segments)
    expected, expected_grads = output_and_vjp(lambda q, k, v: _dense_float64(q, k, v, seg64, window),
                                              (q64, k64, v64), c64)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
  for name, got, want in zip("qkv", grads, expected_grads):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_the_xla_path_on_cpu_takes_tiles_and_matches_the_reference():
  """dot_product_attention's causal self-attention on a CPU (T >= 256, no ALiBi or soft-cap) runs in
  tiles; the loop reference is independent of both paths."""
  q, k, v = _inputs(260, 2, 1, seed=7)
  segments = np.repeat(np.array([[1, 2], [1, 1]]), [150, 110], axis=1)
  seg = jnp.asarray(segments)

  def attend(q, k, v, softcap=0.0):
    return attention_ops.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                               sliding_window=100, logit_softcap=softcap)

  # Only the platform's branch is lowered: the tiles pad T = 260 to whole blocks, the query blocks
  # (taken with a soft-cap) never pad.
  assert "stablehlo.pad" in jax.jit(attend).lower(q, k, v).as_text()
  assert "stablehlo.pad" not in jax.jit(lambda q, k, v: attend(q, k, v, 5.0)).lower(q, k, v).as_text()
  expected = reference.attention(q, k, v, causal=True, window=100, q_segments=segments, kv_segments=segments)
  np.testing.assert_allclose(attend(q, k, v), expected, atol=2e-5, rtol=2e-5)


def test_bfloat16_gradients_through_the_dispatch_under_jit_and_remat():
  """The custom_vjp inside the platform switch, under jit and jax.checkpoint, in bfloat16, against
  float64 gradients of the dense reference (bfloat16 rounding: 2-3 significant digits)."""
  q, k, v = _inputs(300, 4, 2, seed=11)
  cotangent = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)

  def loss(q, k, v):
    out = attention_ops.dot_product_attention(q, k, v, causal=True, sliding_window=90)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  grads = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(
      *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
  with jax.enable_x64(True):
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (q, k, v)]
    expected = jax.grad(lambda q, k, v: jnp.sum(_dense_float64(q, k, v, None, 90) * cotangent), argnums=(0, 1, 2))(
        *(jnp.asarray(x) for x in rounded))
  for name, got, want in zip("qkv", grads, expected):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2 * scale, err_msg=f"d{name}")


@pytest.mark.parametrize("batch,heads,length,block", [(4, 8, 512, 128), (1, 8, 2048, 256), (1, 8, 8192, 512),
                                                      (64, 32, 256, 64), (1, 2, 256, 256), (1, 1, 300, 512)])
def test_tile_size(batch, heads, length, block):
  """Tiles of at most 2 MiB of float32 logits, at least 64 long, no longer than the sequence needs,
  and at most 16 blocks per axis."""
  assert tiled_attention.tile_size(batch, heads, length) == block
