"""Pallas flash attention (interpret mode on CPU): forward and all three gradients against the
reference computed in float64, over causal/bidirectional, T == S and T < S, GQA ratios, windows,
packed segments, soft-cap and lengths off the block size; and with jax_enable_x64 on."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import (BlockSizes, flash_attention, flash_attention_block, flash_attention_block_backward,
                            flash_geometry, reference_attention)
from tests.jitted import output_and_vjp

# Small blocks: several per row, and ragged ends (16 on a GPU, the least Triton's dot takes; these
# tests then run the compiled kernels there: `python -m pytest tests/test_flash_attention.py`).
BLOCKS = BlockSizes(block_q=16, block_kv=16) if jax.default_backend() == "gpu" else BlockSizes(block_q=8, block_kv=8)


def _inputs(q_len, kv_len, heads, kv_heads, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (2, q_len, heads, 16), dtype)
  k = jax.random.normal(keys[1], (2, kv_len, kv_heads, 16), dtype)
  v = jax.random.normal(keys[2], (2, kv_len, kv_heads, 16), dtype)
  cotangent = jax.random.normal(keys[3], (2, q_len, heads, 16), jnp.float32)
  return q, k, v, cotangent


def _segments(q_len, kv_len):
  """Row 0 packs three documents (ids 1, 2, 3); row 1 repeats ids out of order (1, 2, 1), which
  packing never makes but the API allows."""
  kv = np.ones((2, kv_len), np.int32)
  kv[0, kv_len // 3:] = 2
  kv[0, 2 * kv_len // 3:] = 3
  kv[1, kv_len // 3:] = 2
  kv[1, 2 * kv_len // 3:] = 1
  return jnp.asarray(kv[:, kv_len - q_len:]), jnp.asarray(kv)


def _float64_reference(q, k, v, cotangent, kwargs):
  with jax.enable_x64(True):
    q, k, v, cotangent = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
    out, grads = output_and_vjp(lambda q, k, v: reference_attention(q, k, v, **kwargs), (q, k, v), cotangent)
    return [out, *grads]


CASES = [
    # (T, S, N, K, causal, window, segments, softcap)
    (20, 20, 4, 4, True, None, False, None),  # MHA, lengths off the block size
    (20, 20, 4, 1, False, None, False, None),  # MQA (N/K = N), bidirectional
    (12, 28, 4, 1, True, None, False, None),  # T < S: queries are the last T positions
    (24, 24, 8, 2, True, 5, False, None),  # GQA 4, sliding window
    (40, 40, 4, 2, True, 20, False, None),  # a window wide enough for mask-free blocks inside it
    (24, 24, 4, 2, True, None, True, None),  # packed segments
    (16, 26, 4, 2, True, 7, True, 3.0),  # T < S with window, segments and soft-cap
]


# Every case in float32; bfloat16 (the same kernels, inputs and outputs cast) on the MQA case and
# the case with every feature at once.
DTYPE_CASES = ([(*case, jnp.float32, 2e-5) for case in CASES]
               + [(*CASES[i], jnp.bfloat16, 3e-2) for i in (1, len(CASES) - 1)])


@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,causal,window,segments,softcap,dtype,atol", DTYPE_CASES)
def test_forward_and_gradients_match_float64(q_len, kv_len, heads, kv_heads, causal, window, segments, softcap,
                                             dtype, atol):
  q, k, v, cotangent = _inputs(q_len, kv_len, heads, kv_heads, dtype)
  kwargs = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
  if segments:
    kwargs["segment_ids"] = _segments(q_len, kv_len)
  out, grads = output_and_vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=BLOCKS, **kwargs), (q, k, v),
                              cotangent.astype(dtype))
  expected = _float64_reference(q, k, v, cotangent.astype(dtype), kwargs)
  assert out.dtype == dtype
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol * scale, err_msg=name)


def test_backward_blocks_differ_from_the_forward_blocks():
  """BlockSizes.block_q_bwd/block_kv_bwd tile dQ and dK/dV apart from the forward (lengths padded to
  the larger of each pair): T < S, GQA 4, window, segments and soft-cap against float64."""
  smallest = 16 if jax.default_backend() == "gpu" else 8
  blocks = BlockSizes(smallest, 2 * smallest, block_q_bwd=2 * smallest, block_kv_bwd=smallest)
  q, k, v, cotangent = _inputs(20, 44, 4, 1, jnp.float32, seed=5)
  kwargs = dict(sliding_window=13, logit_softcap=5.0, segment_ids=_segments(20, 44))
  out, grads = output_and_vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, **kwargs), (q, k, v),
                              cotangent)
  expected = _float64_reference(q, k, v, cotangent, kwargs)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-5, err_msg=name)


def test_block_ranges_against_brute_force_visibility():
  """The block ranges the kernels walk, against visibility computed pair by pair from the
  definitions (query t sees key s iff s <= t + offset when causal and t + offset - s < window;
  offset S - T, and bidirectional also 24, queries after their keys as in a ring's blocks): every
  block holding a visible pair is walked (kv_range, q_range), and the mask-free ranges
  (full_kv_range, full_q_range) hold exactly the blocks where every pair is visible and no row or
  column is padding, so the unmasked loop is exact and not vacuous."""
  checked_full = 0
  for block_q, block_kv in [(8, 8), (8, 16), (16, 8)]:
    for q_len, kv_len in [(20, 20), (13, 37), (10, 16), (5, 12), (40, 40), (8, 64), (33, 18)]:
      for causal, offset in [(True, kv_len - q_len), (False, kv_len - q_len), (False, 24)]:
        if causal and q_len > kv_len:
          continue
        for window in (0, 1, 5, 13, 40):
          pad = max(block_q, block_kv)
          num_q, num_kv = -(-q_len // pad) * pad // block_q, -(-kv_len // pad) * pad // block_kv
          t = np.arange(num_q * block_q)[:, None]
          k = np.arange(num_kv * block_kv)[None, :]
          visible = (t < q_len) & (k < kv_len)
          if causal:
            visible &= k <= t + offset
          if window:
            visible &= t + offset - k < window
          tiles = visible.reshape(num_q, block_q, num_kv, block_kv)
          any_pair, every_pair = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))  # [num_q, num_kv]
          geometry = dict(block_q=block_q, block_kv=block_kv, offset=offset, causal=causal, window=window)
          full = dict(geometry, q_len=q_len, kv_len=kv_len)
          for i in range(num_q):
            lo, hi = (int(x) for x in flash_geometry.kv_range(i, num_kv_blocks=num_kv, **geometry))
            assert all(lo <= j < hi for j in np.flatnonzero(any_pair[i])), (i, lo, hi, geometry)
            lo, hi = (int(x) for x in flash_geometry.full_kv_range(i, **full))
            assert set(range(lo, hi)) == set(np.flatnonzero(every_pair[i])), (i, lo, hi, geometry)
            checked_full += hi > lo
          for j in range(num_kv):
            lo, hi = (int(x) for x in flash_geometry.q_range(j, num_q_blocks=num_q, **geometry))
            assert all(lo <= i < hi for i in np.flatnonzero(any_pair[:, j])), (j, lo, hi, geometry)
            lo, hi = (int(x) for x in flash_geometry.full_q_range(j, **full))
            assert set(range(lo, hi)) == set(np.flatnonzero(every_pair[:, j])), (j, lo, hi, geometry)
  assert checked_full > 100  # the mask-free path is common, not an edge case


@pytest.mark.parametrize("layout", ["interpret", "tpu_interpret"])
def test_blocks_merged_by_log_sum_exp_match_float64(layout):
  """flash_attention_block over the visible (query block, key block) pairs of a row, merged by their
  log-sum-exps, and flash_attention_block_backward given the merged o and lse, summed over the
  pairs: the row's attention and gradients, against float64 (blocks of 12 positions, which the
  kernel pads to 16; causal, a window of 9 that cuts the diagonal pairs and the pair below them,
  soft-cap, segments, GQA 2). The pair above the diagonal sees nothing and is left out, as a ring
  skips it."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  size, window = 12, 9
  q, k, v, cotangent = _inputs(2 * size, 2 * size, 2, 1, jnp.float32, seed=11)
  q_seg, kv_seg = _segments(2 * size, 2 * size)
  kwargs = dict(sliding_window=window, logit_softcap=3.0, block_sizes=BLOCKS,
                interpret=pltpu.InterpretParams() if layout == "tpu_interpret" else None)
  pairs = [(0, 0, dict(causal=True, offset=0)), (1, 1, dict(causal=True, offset=0)),
           (1, 0, dict(causal=False, offset=size))]  # (query block, key block, its call)
  rows = lambda x, i: x[:, i * size:(i + 1) * size]  # noqa: E731

  def blocks(q, k, v, cotangent):
    parts = [dict(q=rows(q, i), k=rows(k, j), v=rows(v, j), segment_ids=(rows(q_seg, i), rows(kv_seg, j)), **call)
             for i, j, call in pairs]
    out, lse = [0.0, 0.0], [-jnp.inf, -jnp.inf]
    for (i, _, _), part in zip(pairs, parts):
      o_block, lse_block = flash_attention_block(**part, **kwargs)
      lse_block = jnp.where(lse_block == jnp.inf, -jnp.inf, lse_block)  # +inf: the row saw no key here
      merged = jnp.logaddexp(lse[i], lse_block)
      safe = jnp.where(jnp.isfinite(merged), merged, 0.0)
      weight = lambda x: jnp.swapaxes(jnp.exp(x - safe), 1, 2)[..., None]  # noqa: E731
      out[i], lse[i] = out[i] * weight(lse[i]) + o_block * weight(lse_block), merged
    out, lse = jnp.concatenate(out, axis=1), jnp.concatenate(lse, axis=2)
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    grads = [jnp.zeros_like(x) for x in (q, k, v)]
    for (i, j, _), part in zip(pairs, parts):
      dq, dk, dv = flash_attention_block_backward(**part, o=rows(out, i), lse=lse[:, :, i * size:(i + 1) * size],
                                                  do=rows(cotangent, i), **kwargs)
      for n, (grad, block) in enumerate(zip((dq, dk, dv), (i, j, j))):
        grads[n] = grads[n].at[:, block * size:(block + 1) * size].add(grad)
    return out, *grads

  got = jax.jit(blocks)(q, k, v, cotangent)
  expected = _float64_reference(q, k, v, cotangent, dict(causal=True, sliding_window=window, logit_softcap=3.0,
                                                           segment_ids=(q_seg, kv_seg)))
  for name, got, want in zip(("out", "dq", "dk", "dv"), got, expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "q_len,kv_len,blocks,kwargs",
    [(8, 40, BlockSizes(8, 64, block_q_bwd=8, block_kv_bwd=16), dict(causal=True)),
     (40, 40, BlockSizes(8, 8, block_q_bwd=64), dict(causal=True, sliding_window=1)),
     (40, 40, BlockSizes(8, 8, block_q_bwd=64), dict(causal=False, sliding_window=3))],
    ids=["T<S_bwd_kv_blocks", "window1_bwd_q_blocks", "bidirectional_window3_bwd_q_blocks"],
)
def test_tpu_layout_with_backward_blocks_reads_only_inside_the_arrays(q_len, kv_len, blocks, kwargs):
  """Lengths padded to the larger of the forward and backward blocks leave blocks of padding alone,
  whose empty visible range can start past the array's last block; TPU interpret mode (which
  raises on an out-of-bounds block index) checks the clamped index maps stay inside, and the
  float64 reference the values."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  q, k, v, cotangent = _inputs(q_len, kv_len, 2, 1, jnp.float32, seed=7)
  interpret = pltpu.InterpretParams()
  out, grads = output_and_vjp(
      lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, interpret=interpret, **kwargs), (q, k, v), cotangent)
  expected = _float64_reference(q, k, v, cotangent, kwargs)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, err_msg=name)


def test_segment_block_ranges_against_brute_force():
  """The key blocks a query block walks, and the query blocks a key block walks, narrowed to the
  blocks that can share a segment id: every block pair sharing an id is inside (any ids, padding
  included); for packed rows (non-decreasing ids) they are exactly those pairs, so documents
  packed into one row cost about their own lengths."""
  rng = np.random.default_rng(0)
  skipped = 0
  ranges = jax.jit(flash_geometry.segment_block_ranges, static_argnums=(2, 3, 4, 5))  # a compile per shape, not per op
  for trial in range(30):
    block_q, block_kv = [(8, 8), (8, 16), (16, 8)][trial % 3]
    length = int(rng.integers(5, 70))
    packed = trial % 2 == 0
    if packed:  # documents of random lengths, ids counting up
      ids = np.cumsum(rng.random(length) < 0.15) + 1
    else:  # runs of ids in any order, repeating
      ids = np.repeat(rng.integers(0, 4, length), rng.integers(1, 6, length))[:length]
    pad = max(block_q, block_kv)
    padded = -(-length // pad) * pad
    q_seg = np.full((1, padded), -2, np.int32)
    kv_seg = np.full((1, padded), -1, np.int32)
    q_seg[0, :length] = kv_seg[0, :length] = ids
    kv_ranges, q_ranges = (np.asarray(x[0]) for x in ranges(
        jnp.asarray(q_seg), jnp.asarray(kv_seg), block_q, block_kv, length, length))
    shared = q_seg[0][:, None] == kv_seg[0][None, :]  # padding (-2 / -1) shares no id
    tiles = shared.reshape(padded // block_q, block_q, padded // block_kv, block_kv).any(axis=(1, 3))
    for i, (lo, hi) in enumerate(kv_ranges):
      needed = set(np.flatnonzero(tiles[i]))
      assert needed <= set(range(lo, hi)), (trial, i, lo, hi, needed)
      if packed:
        assert needed == set(range(lo, hi)), (trial, i, lo, hi, needed)
      skipped += len(tiles[i]) - (hi - lo)
    for j, (lo, hi) in enumerate(q_ranges):
      needed = set(np.flatnonzero(tiles[:, j]))
      assert needed <= set(range(lo, hi)), (trial, j, lo, hi, needed)
      if packed:
        assert needed == set(range(lo, hi)), (trial, j, lo, hi, needed)
  assert skipped > 100


@pytest.mark.parametrize("layout", ["interpret", "tpu_interpret"])
def test_padded_keys_stay_hidden_whatever_the_segment_ids(layout):
  """Bidirectional attention over a length off the block size, with segment ids that include -1
  (the id padded keys carry): padded keys are hidden by position, so no query sees them."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  q, k, v, cotangent = _inputs(12, 21, 2, 1, jnp.float32, seed=9)
  kv_seg = jnp.asarray(np.where(np.arange(21) < 15, 3, -1)[None].repeat(2, 0))  # the last queries: -1
  kwargs = dict(causal=False, segment_ids=(kv_seg[:, -12:], kv_seg))
  interpret = pltpu.InterpretParams() if layout == "tpu_interpret" else None
  out, grads = output_and_vjp(
      lambda q, k, v: flash_attention(q, k, v, block_sizes=BLOCKS, interpret=interpret, **kwargs), (q, k, v), cotangent)
  expected = _float64_reference(q, k, v, cotangent, kwargs)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, err_msg=name)


def test_fully_masked_rows_are_zero_with_finite_gradients():
  q, k, v, cotangent = _inputs(16, 16, 4, 2, jnp.float32)
  segments = (jnp.ones((2, 16), jnp.int32), jnp.full((2, 16), 2, jnp.int32))  # nothing shares a segment
  out, grads = output_and_vjp(lambda q, k, v: flash_attention(q, k, v, segment_ids=segments, block_sizes=BLOCKS),
                              (q, k, v), cotangent)
  np.testing.assert_array_equal(out, 0.0)
  assert all(np.isfinite(g).all() and not np.abs(g).max() for g in grads)


def test_bad_arguments_name_the_values():
  q, k, v, _ = _inputs(16, 16, 3, 2, jnp.float32)
  with pytest.raises(ValueError, match="heads=3"):
    flash_attention(q, k, v)
  q, k, v, _ = _inputs(16, 8, 4, 2, jnp.float32)
  with pytest.raises(ValueError, match="q_len=16 > kv_len=8"):
    flash_attention(q, k, v)
  q, k, v, _ = _inputs(16, 16, 4, 2, jnp.float32)
  with pytest.raises(ValueError, match="offset=16, q_len=16, kv_len=16"):
    flash_attention_block(q, k, v, offset=16)
  with pytest.raises(ValueError, match="lse.shape"):
    flash_attention_block_backward(q, k, v, q, jnp.zeros((2, 16, 4)), q, causal=False)
  with pytest.raises(ValueError, match="block_q=12"):
    BlockSizes(block_q=12)
  with pytest.raises(ValueError, match="block_kv_bwd=48"):
    BlockSizes(block_kv_bwd=48)


def test_forward_backward_memory_grows_linearly_in_sequence_length():
  def temp_bytes(seq_len):
    q = jax.ShapeDtypeStruct((1, seq_len, 2, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq_len, 1, 64), jnp.float32)
    grad = jax.grad(lambda q, k, v: flash_attention(q, k, v, block_sizes=BlockSizes(128, 128)).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

  small, medium, large = temp_bytes(2048), temp_bytes(4096), temp_bytes(8192)
  # Linear doubles per doubling of S; a stored S x S matrix would quadruple (8192^2 floats = 256 MiB).
  assert medium / small < 2.5 and large / medium < 2.5, (small, medium, large)
  assert large < 64 * 2**20


def test_runs_under_tpu_interpret_mode():
  """The kernels under Mosaic (TPU) semantics, simulated on CPU, with TPU-shaped (128-lane) blocks."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (1, 256, 2, 128))
  k = jax.random.normal(keys[1], (1, 256, 1, 128))
  v = jax.random.normal(keys[2], (1, 256, 1, 128))
  cotangent = jax.random.normal(keys[3], (1, 256, 2, 128))
  segments = jnp.asarray(np.repeat([[1, 2]], 128, axis=1))
  kwargs = dict(segment_ids=segments, sliding_window=100)
  with pltpu.force_tpu_interpret_mode():
    out, grads = output_and_vjp(
        lambda q, k, v: flash_attention(q, k, v, block_sizes=BlockSizes(128, 128), interpret=False, **kwargs),
        (q, k, v), cotangent)
  expected = _float64_reference(q, k, v, cotangent, kwargs)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-4, err_msg=name)


_TPU_SEGMENTS = (24, 40, 4, 1, dict(causal=True, sliding_window=9, logit_softcap=3.0, segments=True))
_TPU_NO_SEGMENTS = (28, 44, 2, 1, dict(causal=True, sliding_window=20, segments=False))  # mask-free tiles in the window


@pytest.mark.parametrize(
    "q_len,kv_len,heads,kv_heads,kwargs",
    [_TPU_SEGMENTS, (40, 40, 2, 2, dict(causal=False, segments=True)), _TPU_NO_SEGMENTS],
    ids=["causal_T<S_window_softcap_gqa4_segments", "bidirectional_segments", "causal_T<S_window_gqa2_no_segments"],
)
def test_tpu_layout_under_tpu_interpret_mode(q_len, kv_len, heads, kv_heads, kwargs):
  """The TPU layout (key blocks as a grid dimension, VMEM scratch; flash_attention_tpu.py), which
  `interpret=pltpu.InterpretParams()` selects, against the float64 reference; blocks of 8 so the
  hidden blocks that its clamped index maps skip are many."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  kwargs = dict(kwargs)
  if kwargs.pop("segments"):
    kwargs["segment_ids"] = _segments(q_len, kv_len)
  q, k, v, cotangent = _inputs(q_len, kv_len, heads, kv_heads, jnp.float32, seed=3)
  interpret = pltpu.InterpretParams()
  out, grads = output_and_vjp(
      lambda q, k, v: flash_attention(q, k, v, block_sizes=BLOCKS, interpret=interpret, **kwargs), (q, k, v), cotangent)
  expected = _float64_reference(q, k, v, cotangent, kwargs)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, err_msg=name)


_KERNELS = ["flash_attention_dkv", "flash_attention_dq", "flash_attention_forward"]
_LOWERING_CASES = [(256, 256, 4, 2, 64, dict()),
                   (100, 300, 8, 2, 80, dict(sliding_window=33, logit_softcap=30.0, segments=True)),
                   (128, 128, 4, 1, 128, dict(causal=False))]


def _lowered(platform, q_len, kv_len, heads, kv_heads, head_dim, kwargs):
  """The text of forward+backward lowered for `platform` on this host (bfloat16; segment ids in
  the default integer type: int64 under x64)."""
  kwargs = dict(kwargs)
  q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, kv_len, kv_heads, head_dim), jnp.bfloat16)
  segments = kwargs.pop("segments", False)
  int_type = jnp.asarray(0).dtype
  seg = (jax.ShapeDtypeStruct((2, q_len), int_type), jax.ShapeDtypeStruct((2, kv_len), int_type))

  def loss(q, k, v, q_seg, kv_seg):
    segment_ids = (q_seg, kv_seg) if segments else None
    return flash_attention(q, k, v, segment_ids=segment_ids, **kwargs).astype(jnp.float32).sum()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad.trace(q, kv, kv, *seg).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text):
  return [line for line in text.splitlines() if "stablehlo.custom_call" in line]


@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,head_dim,kwargs", _LOWERING_CASES,
                         ids=["causal_gqa2_h64", "T<S_window_softcap_segments_h80", "bidirectional_mqa_h128"])
def test_each_platform_lowers_its_own_kernels(platform, q_len, kv_len, heads, kv_heads, head_dim, kwargs):
  """Forward+backward lowered on this CPU host for each platform (the kernels are picked when the
  computation is lowered, jax.lax.platform_dependent): for CUDA all three kernels take Pallas's
  Triton lowering, named explicitly (jax >= 0.10 otherwise lowers a GPU pallas_call with Mosaic
  GPU, which these kernels are not written for), with the default launch parameters; for TPU the
  TPU layout's three kernels go through Pallas's Mosaic lowering; for CPU, interpret mode, no
  kernel call. This runs those lowerings, so an operation they lack, a Triton array whose size is
  not a power of two (head dim 80 is padded to 128) or a block shape Mosaic rejects fails here;
  Triton's and Mosaic's compilers and the chips are not exercised (benchmarks/triton_resources.py
  runs Triton's)."""
  text = _lowered(platform, q_len, kv_len, heads, kv_heads, head_dim, kwargs)
  calls = _kernel_calls(text)
  if platform == "cpu":
    assert not calls
    return
  if platform == "tpu":
    assert all("@tpu_custom_call" in line for line in calls)
    names = sorted(re.search(r'kernel_name = "(\w+)"', line).group(1) for line in calls)
    assert names == [f"{name}_tpu" for name in _KERNELS], names
    return
  assert all("@__gpu$xla.gpu.triton" in line for line in calls)
  names = sorted(re.search(r'name = "(\w+)"', line).group(1) for line in calls)
  assert names == _KERNELS, names
  defaults = BlockSizes.get_default("gpu", pl.next_power_of_2(head_dim))
  for line in calls:  # the GPU defaults reach the launch
    assert re.search(r"num_warps = (\d+)", line).group(1) == str(defaults.num_warps)
    assert re.search(r"num_stages = (\d+)", line).group(1) == str(defaults.num_stages)
  assert "mosaic" not in text.lower()


# With jax_enable_x64 on, a Python int or a default iota is int64 and a Python float in a jnp.where
# a float64 constant; the kernels' index arithmetic (program ids, index maps, block ranges, the
# prefetched segment tables) must stay int32 and their constants float32 all the same.


@pytest.fixture
def x64():
  """jax_enable_x64 on for one test; `jax.enable_x64` is a context, restored when the test ends."""
  before = jnp.asarray(0).dtype
  with jax.enable_x64(True):
    yield
  assert jnp.asarray(0).dtype == before, "x64 leaked out of the test"


# ids other than the bare "tpu": conftest skips an item with a "tpu" keyword off a TPU.
@pytest.mark.parametrize("platform", ["cuda", "tpu"], ids=["triton", "mosaic"])
def test_x64_lowers_the_same_kernels(x64, platform):
  """Each platform's kernels lowered with x64 on are the very kernels lowered with it off (Triton
  IR and Mosaic module, byte for byte), int64 segment ids included: no int64 index or float64
  constant reaches Triton or Mosaic, which have no use for them (and TPUs have no float64)."""
  case = _LOWERING_CASES[1]  # T < S, window, soft-cap, segments, GQA 4

  def payloads(calls):  # each call's attributes (the serialized kernel among them), not its operand names
    return sorted(line.split(") {", 1)[1] for line in calls)

  with_x64 = payloads(_kernel_calls(_lowered(platform, *case)))
  with jax.enable_x64(False):
    without = payloads(_kernel_calls(_lowered(platform, *case)))
  assert len(with_x64) == 3 and with_x64 == without


@pytest.mark.parametrize(
    "layout,q_len,kv_len,heads,kv_heads,kwargs",
    [("default", *_TPU_SEGMENTS), ("tpu_interpret", *_TPU_SEGMENTS), ("default", *_TPU_NO_SEGMENTS)],
    ids=["default-causal_T<S_window_softcap_gqa4_segments", "tpu_interpret-causal_T<S_window_softcap_gqa4_segments",
         "default-causal_T<S_window_gqa2_no_segments"],
)
def test_forward_and_gradients_with_x64(x64, layout, q_len, kv_len, heads, kv_heads, kwargs):
  """float32 inputs and int64 segment ids with x64 on, against the float64 reference: the default
  call (on CPU Pallas interpret mode, with the TPU layout traced too, in jax.lax.platform_dependent's
  other branch) and the TPU layout in TPU interpret mode where int64 segment ids reach it; the shapes
  of test_tpu_layout_under_tpu_interpret_mode."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  kwargs = dict(kwargs)
  if kwargs.pop("segments"):
    kwargs["segment_ids"] = tuple(jnp.asarray(np.asarray(x), jnp.int64) for x in _segments(q_len, kv_len))
  q, k, v, cotangent = _inputs(q_len, kv_len, heads, kv_heads, jnp.float32, seed=3)
  interpret = pltpu.InterpretParams() if layout == "tpu_interpret" else None
  out, grads = output_and_vjp(lambda q, k, v: flash_attention(q, k, v, block_sizes=BLOCKS, interpret=interpret,
                                                             **kwargs), (q, k, v), cotangent)
  expected = _float64_reference(q, k, v, cotangent, kwargs)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
    assert got.dtype == jnp.float32, (name, got.dtype)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, err_msg=name)
