"""The TPU (Mosaic) layout of flash attention: the key/value blocks are a grid dimension, not a loop.

flash_attention_gpu.py's layout gives each program a query block and its kv head's whole K/V
rows, walked with a `fori_loop`; on TPU those rows sit in VMEM, which caps the sequence length
(16-32 MiB of VMEM against 4 MiB for K and V of one head at S = 8k, H = 128, bfloat16, double
buffered). Here the grid is (batch, head, query block, key block) with the last dimension
sequential ("arbitrary"): each step gets one [block_kv, H] tile of K and V (the pipeline DMAs the
next while this one computes), the online-softmax state (m, l and the output accumulator) lives
in VMEM scratch across the key steps, and the output is written at the last one. Blocks that
causality or the window hide are skipped (`pl.when`), and their index maps are clamped to the
visible range (and to the array, for blocks of padding alone) so that no DMA fetches a hidden
tile. Without segment ids, tiles every pair of which is visible (no padding) skip building the
mask (`_when_visible`). The visible range of each tile row also excludes the blocks that cannot
share a segment id (packed documents), from a [B, blocks, 2] int32 table scalar-prefetched into
SMEM (8 bytes per block and row: 64 KiB at B=32, T=32k, 128-row blocks, to keep in mind on
chips with small SMEM). The backward pass has the same shape: dQ over
(b, n, i, j) with a dQ accumulator, dK/dV over (b, kv head, j, i) with the G query heads of the kv
head in each query tile and dK/dV accumulators.

Every block's last two dimensions are Mosaic-tileable: the tiles of q, k, v, o and the gradients
are [block, H]; the per-row log-sum-exp and delta are [B, N, T, 1] arrays read in [block_q, 1]
tiles (the 1 is the whole dimension), and segment ids [B, T, 1] and [B, 1, S]; on TPU block_q
should be a multiple of 8 and block_kv of 128. Used on TPU, and on CPU in TPU interpret mode
(`interpret=pltpu.InterpretParams()`), which is how the tests run it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_vmem
from pallas_kernels.flash_geometry import (MASKED, FlashStatic, block_spec, div, full_kv_range, full_q_range, kv_range,
                                           logits, mask, mask_free_blocks, q_range, segment_block_ranges)


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _visible_kv(b, i, kv_ranges_ref, *, block_q, block_kv, num_kv_blocks, offset, causal, window):
  """Key blocks [lo, hi) of query block i in row b: those the geometry lets it see, narrowed to the
  blocks that can share a segment id (kv_ranges [B, nq, 2] in SMEM, from segment_block_ranges)."""
  lo, hi = kv_range(i, block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks, offset=offset,
                    causal=causal, window=window)
  return jnp.maximum(lo, kv_ranges_ref[b, i, 0]), jnp.minimum(hi, kv_ranges_ref[b, i, 1])


def _visible_q(b, j, q_ranges_ref, *, block_q, block_kv, num_q_blocks, offset, causal, window):
  """Query blocks [lo, hi) of key block j in row b (see _visible_kv)."""
  lo, hi = q_range(j, block_q=block_q, block_kv=block_kv, num_q_blocks=num_q_blocks, offset=offset, causal=causal,
                   window=window)
  return jnp.maximum(lo, q_ranges_ref[b, j, 0]), jnp.minimum(hi, q_ranges_ref[b, j, 1])


def _clamped_kv(b, i, j, kv_ranges_ref, *, num_kv_blocks, **geometry):
  """Key block j of query block i, moved into the visible range (a hidden step re-reads a visible
  tile) and into the array: a query block of padding alone (lengths padded to the larger of the
  forward and backward blocks) can have an empty range that starts past the last key block."""
  lo, hi = _visible_kv(b, i, kv_ranges_ref, num_kv_blocks=num_kv_blocks, **geometry)
  return jnp.clip(jnp.clip(j, lo, jnp.maximum(hi - 1, lo)), jnp.int32(0), jnp.int32(num_kv_blocks - 1))


def _clamped_q(b, j, i, q_ranges_ref, *, num_q_blocks, **geometry):
  """Query block i of key block j, moved into the visible range and into the array (see _clamped_kv)."""
  lo, hi = _visible_q(b, j, q_ranges_ref, num_q_blocks=num_q_blocks, **geometry)
  return jnp.clip(jnp.clip(i, lo, jnp.maximum(hi - 1, lo)), jnp.int32(0), jnp.int32(num_q_blocks - 1))


def _tile_mask(i, j, qseg_ref, kvseg_ref, *, block_q, block_kv, offset, causal, window, kv_len):
  """[bq, bk] visibility of key tile j to query tile i, from 2-D int32 iotas and the segment tiles
  qseg [bq, 1] and kvseg [1, bk] (no 1-D vectors: Mosaic tiles the last two dimensions)."""
  shape = (block_q, block_kv)
  q_pos = i * block_q + offset + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  kv_pos = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return mask(q_pos, kv_pos, qseg_ref[...], kvseg_ref[...], causal=causal, window=window, kv_len=kv_len)


def _query_major_step(kv_ranges_ref, full_blocks, *, block_q, block_kv, num_kv_blocks, offset, causal, window):
  """(i, j, visible, full) of a step on the grid (b, n, i, j): its query tile, its key tile, whether
  any key of tile j may be visible to a query of tile i, and whether every pair is (None with
  segment ids; see _when_visible)."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = _visible_kv(b, i, kv_ranges_ref, block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks,
                       offset=offset, causal=causal, window=window)
  return i, j, (j >= lo) & (j < hi), _in_range(j, full_blocks and full_blocks(i))


def _when_visible(visible, full, step):
  """Runs step(masked) on a visible tile: without a mask where `full` (every pair visible, no
  padding; None with segment ids), with one elsewhere."""
  if full is None:
    pl.when(visible)(functools.partial(step, masked=True))
    return
  pl.when(visible & jnp.logical_not(full))(functools.partial(step, masked=True))
  pl.when(full)(functools.partial(step, masked=False))


def _in_range(index, bounds):
  return None if bounds is None else (index >= bounds[0]) & (index < bounds[1])


def _forward_kernel(kv_ranges_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                    scale, causal, window, softcap, block_kv, num_kv_blocks, offset, full_blocks, kv_len):
  block_q = q_ref.shape[0]
  i, j, visible, full = _query_major_step(kv_ranges_ref, full_blocks, block_q=block_q, block_kv=block_kv,
                                          num_kv_blocks=num_kv_blocks, offset=offset, causal=causal, window=window)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def _step(masked):
    v = v_ref[...]
    s, _ = logits(q_ref[...], k_ref[...], scale=scale, softcap=softcap)
    if masked:
      pairs = _tile_mask(i, j, qseg_ref, kvseg_ref, block_q=block_q, block_kv=block_kv, offset=offset,
                        causal=causal, window=window, kv_len=kv_len)  # [bq, bk]
      s = jnp.where(pairs, s, MASKED)
    m = m_scr[...]  # [bq, 1]
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    p = jnp.exp(s - m_new)
    if masked:
      p = jnp.where(pairs, p, np.float32(0))
    alpha = jnp.exp(m - m_new)
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
    acc_scr[...] = alpha * acc_scr[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_scr[...] = m_new

  _when_visible(visible, full, _step)

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    l = l_scr[...]
    seen = l > 0  # a fully masked row attends to nothing: output 0
    safe = jnp.where(seen, l, np.float32(1))
    o_ref[...] = jnp.where(seen, acc_scr[...] / safe, np.float32(0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(safe), np.float32(np.inf))


def _dq_kernel(kv_ranges_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *,
               scale, causal, window, softcap, block_kv, num_kv_blocks, offset, full_blocks, kv_len):
  block_q = q_ref.shape[0]
  i, j, visible, full = _query_major_step(kv_ranges_ref, full_blocks, block_q=block_q, block_kv=block_kv,
                                          num_kv_blocks=num_kv_blocks, offset=offset, causal=causal, window=window)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def _step(masked):
    k, v = k_ref[...], v_ref[...]
    s, dtanh = logits(q_ref[...], k, scale=scale, softcap=softcap)
    p = jnp.exp(s - lse_ref[...])  # lse, delta: [bq, 1]
    if masked:
      p = jnp.where(_tile_mask(i, j, qseg_ref, kvseg_ref, block_q=block_q, block_kv=block_kv, offset=offset,
                              causal=causal, window=window, kv_len=kv_len), p, np.float32(0))
    dp = jax.lax.dot_general(do_ref[...], v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if softcap:
      ds = ds * dtanh
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _when_visible(visible, full, _step)

  @pl.when(j == num_kv_blocks - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ranges_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, scale, causal, window, softcap, block_q, num_q_blocks, offset, full_blocks, kv_len):
  """Key block j of one kv head, query block i of its G query heads (the grid's last dimension)."""
  block_kv = k_ref.shape[0]
  group = q_ref.shape[0]
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = _visible_q(b, j, q_ranges_ref, block_q=block_q, block_kv=block_kv, num_q_blocks=num_q_blocks,
                      offset=offset, causal=causal, window=window)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def _step(masked):
    if masked:
      pairs = _tile_mask(i, j, qseg_ref, kvseg_ref, block_q=block_q, block_kv=block_kv, offset=offset,
                        causal=causal, window=window, kv_len=kv_len)
    k, v = k_ref[...], v_ref[...]
    dk, dv = dk_scr[...], dv_scr[...]
    for g in range(group):  # static: the G query heads of this kv head
      q, do = q_ref[g], do_ref[g]
      s, dtanh = logits(q, k, scale=scale, softcap=softcap)
      p = jnp.exp(s - lse_ref[g])  # [bq, bk]; lse, delta: [bq, 1]
      if masked:
        p = jnp.where(pairs, p, np.float32(0))
      dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      ds = p * (dp - delta_ref[g])
      if softcap:
        ds = ds * dtanh
      dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    dk_scr[...], dv_scr[...] = dk, dv

  _when_visible((i >= lo) & (i < hi), _in_range(i, full_blocks and full_blocks(j)), _step)

  @pl.when(i == num_q_blocks - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _query_major_specs(st, head_dim, group, num_kv_blocks):
  """(q, k, v, q_seg, kv_seg) on the grid (b, n, i, j) with the key-range table prefetched: query
  tile i, key tile j (clamped)."""
  kv = functools.partial(_clamped_kv, block_q=st.block_q, block_kv=st.block_kv, num_kv_blocks=num_kv_blocks,
                         offset=st.offset, causal=st.causal, window=st.window)
  return [
      block_spec((None, None, st.block_q, head_dim), lambda b, n, i, j, r: (b, n, i, 0)),
      block_spec((None, None, st.block_kv, head_dim), lambda b, n, i, j, r: (b, div(n, group), kv(b, i, j, r), 0)),
      block_spec((None, None, st.block_kv, head_dim), lambda b, n, i, j, r: (b, div(n, group), kv(b, i, j, r), 0)),
      block_spec((None, st.block_q, 1), lambda b, n, i, j, r: (b, i, 0)),
      block_spec((None, 1, st.block_kv), lambda b, n, i, j, r: (b, 0, kv(b, i, j, r))),
  ]


def _ranges(q_seg, kv_seg, st: FlashStatic):
  """(kv_ranges [B, nq, 2], q_ranges [B, nk, 2]): the blocks that can share a segment id, prefetched
  into SMEM so that the index maps skip the others' DMAs too (flash_geometry.segment_block_ranges)."""
  return segment_block_ranges(q_seg, kv_seg, st.block_q, st.block_kv, st.q_len, st.kv_len)


def _segment_columns(q_seg, kv_seg):
  """[B, Tp] and [B, Sp] -> [B, Tp, 1] and [B, 1, Sp]: blocks whose last two dimensions Mosaic can tile."""
  return q_seg[:, :, None], kv_seg[:, None, :]


def forward(q, k, v, q_seg, kv_seg, st: FlashStatic):
  """q [B, N, Tp, H], k/v [B, K, Sp, H] (padded to the blocks), segment ids [B, Tp] / [B, Sp]
  -> (o [B, N, Tp, H], lse [B, N, Tp, 1])."""
  batch, heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  num_kv_blocks = kv_len // st.block_kv
  tpu_vmem.check_flash("forward", block_q=st.block_q, block_kv=st.block_kv, head_dim=head_dim, dtype=q.dtype,
                       group=heads // kv_heads, interpret=st.interpret)
  kernel = functools.partial(_forward_kernel, scale=st.scale, causal=st.causal, window=st.window, softcap=st.softcap,
                             block_kv=st.block_kv, num_kv_blocks=num_kv_blocks, offset=st.offset,
                             full_blocks=mask_free_blocks(full_kv_range, st), kv_len=st.kv_len)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, heads, q_len // st.block_q, num_kv_blocks),
          in_specs=_query_major_specs(st, head_dim, heads // kv_heads, num_kv_blocks),
          out_specs=[
              block_spec((None, None, st.block_q, head_dim), lambda b, n, i, j, r: (b, n, i, 0)),
              block_spec((None, None, st.block_q, 1), lambda b, n, i, j, r: (b, n, i, 0)),
          ],
          scratch_shapes=[pltpu.VMEM((st.block_q, 1), jnp.float32), pltpu.VMEM((st.block_q, 1), jnp.float32),
                          pltpu.VMEM((st.block_q, head_dim), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32)],
      compiler_params=_params(),
      interpret=st.interpret,
      name="flash_attention_forward_tpu",
  )(_ranges(q_seg, kv_seg, st)[0], q, k, v, *_segment_columns(q_seg, kv_seg))


def backward(q, k, v, q_seg, kv_seg, o, lse, do, st: FlashStatic):
  """The forward's inputs, o, lse [B, N, Tp, 1] and do [B, N, Tp, H] -> (dq, dk, dv), each in its input's shape."""
  batch, heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  num_q_blocks, num_kv_blocks = q_len // st.block_q, kv_len // st.block_kv
  tpu_vmem.check_flash("backward", block_q=st.block_q, block_kv=st.block_kv, head_dim=head_dim, dtype=q.dtype,
                       group=group, interpret=st.interpret)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, N, Tp, 1]
  kv_ranges, q_ranges = _ranges(q_seg, kv_seg, st)
  q_seg, kv_seg = _segment_columns(q_seg, kv_seg)
  common = dict(scale=st.scale, causal=st.causal, window=st.window, softcap=st.softcap, offset=st.offset,
                kv_len=st.kv_len)
  row = lambda b, n, i, j, r: (b, n, i, 0)  # noqa: E731
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=st.block_kv, num_kv_blocks=num_kv_blocks,
                        full_blocks=mask_free_blocks(full_kv_range, st), **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, heads, num_q_blocks, num_kv_blocks),
          in_specs=[
              *_query_major_specs(st, head_dim, group, num_kv_blocks),
              block_spec((None, None, st.block_q, head_dim), row),
              block_spec((None, None, st.block_q, 1), row),
              block_spec((None, None, st.block_q, 1), row),
          ],
          out_specs=block_spec((None, None, st.block_q, head_dim), row),
          scratch_shapes=[pltpu.VMEM((st.block_q, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(),
      interpret=st.interpret,
      name="flash_attention_dq_tpu",
  )(kv_ranges, q, k, v, q_seg, kv_seg, do, lse, delta)

  qi = functools.partial(_clamped_q, block_q=st.block_q, block_kv=st.block_kv, num_q_blocks=num_q_blocks,
                         offset=st.offset, causal=st.causal, window=st.window)
  heads_tile = block_spec((None, group, st.block_q, head_dim), lambda b, h, j, i, r: (b, h, qi(b, j, i, r), 0))
  heads_row = block_spec((None, group, st.block_q, 1), lambda b, h, j, i, r: (b, h, qi(b, j, i, r), 0))
  kv_tile = block_spec((None, None, st.block_kv, head_dim), lambda b, h, j, i, r: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=st.block_q, num_q_blocks=num_q_blocks,
                        full_blocks=mask_free_blocks(full_q_range, st), **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, kv_heads, num_kv_blocks, num_q_blocks),
          in_specs=[
              heads_tile, kv_tile, kv_tile,
              block_spec((None, st.block_q, 1), lambda b, h, j, i, r: (b, qi(b, j, i, r), 0)),
              block_spec((None, 1, st.block_kv), lambda b, h, j, i, r: (b, 0, j)),
              heads_tile, heads_row, heads_row,
          ],
          out_specs=[kv_tile, kv_tile],
          scratch_shapes=[pltpu.VMEM((st.block_kv, head_dim), jnp.float32),
                          pltpu.VMEM((st.block_kv, head_dim), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(),
      interpret=st.interpret,
      name="flash_attention_dkv_tpu",
  )(q_ranges, q, k, v, q_seg, kv_seg, do, lse, delta)
  return dq, dk, dv
