"""The GPU (Triton) and Pallas-interpret layout of flash attention: one program per query block.

One program per (batch, query head, query block) walks the key/value blocks it can see (blocks
that causality or the window hide entirely are skipped), the FlashAttention-2 structure of jax's
own GPU kernels. GQA is in the index maps: query head n reads kv head n // G, so K and V are never
repeated. The backward pass is a dQ kernel (per query block) and a dK/dV kernel (per key block,
over the G query heads of its kv head). Without segment ids, each kernel's loop is split as in
FlashAttention-2: the blocks every pair of which is visible (inside the causal triangle and the
window, no padding) are walked without building a mask; only the blocks on the diagonal, at the
window's edge or holding padding are masked. With segment ids, each loop is narrowed to the
blocks that can share an id (flash_geometry.segment_block_ranges): for documents packed into a
row, attention costs about the documents' own lengths, not the row's.

Each program holds its kv head's whole K/V rows, which suits a GPU's loads of dynamic slices but
not TPU's VMEM: TPU takes flash_attention_tpu.py's layout instead. On GPU, blocks are at least 16
(Triton's dot) and the head dimension is padded to a power of two (flash_attention.py does both).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.flash_geometry import (MASKED, FlashStatic, block_spec, div, full_kv_range, full_q_range, kv_range,
                                           logits, mask, mask_free_blocks, q_range, segment_block_ranges)


def _loop_with_mask_free_middle(lo, hi, full, body, init):
  """fori_loop of body(index, carry, masked) over [lo, hi): unmasked on the part of [lo, hi) inside
  `full` (the blocks that need no mask; FlashAttention-2's split of the diagonal blocks from the
  rest), masked before and after it. full=None: masked throughout (segment ids)."""
  masked = functools.partial(body, masked=True)
  if full is None:
    return jax.lax.fori_loop(lo, hi, masked, init)
  start = jnp.clip(full[0], lo, hi)
  stop = jnp.clip(full[1], start, hi)
  carry = jax.lax.fori_loop(lo, start, masked, init)
  carry = jax.lax.fori_loop(start, stop, functools.partial(body, masked=False), carry)
  return jax.lax.fori_loop(stop, hi, masked, carry)


def _key_block_mask(j, q_pos, q_seg, kvseg_ref, *, block_kv, causal, window, kv_len):
  """[bq, bk] visibility of key block j to the queries at q_pos [bq, 1] with ids q_seg [bq, 1]."""
  kv_pos = (j * block_kv + jnp.arange(block_kv, dtype=jnp.int32))[None, :]
  kv_seg = kvseg_ref[pl.ds(j * block_kv, block_kv)][None, :]
  return mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal, window=window, kv_len=kv_len)


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, range_ref, o_ref, lse_ref, *, scale, causal, window,
                    softcap, block_kv, num_kv_blocks, offset, full_blocks, kv_len):
  block_q = q_ref.shape[0]
  i = pl.program_id(2)
  q = q_ref[...]
  q_pos = (i * block_q + offset + jnp.arange(block_q, dtype=jnp.int32))[:, None]  # [bq, 1]
  q_seg = qseg_ref[...][:, None]

  def body(j, carry, masked):
    m, l, acc = carry
    k = k_ref[pl.ds(j * block_kv, block_kv), :]
    v = v_ref[pl.ds(j * block_kv, block_kv), :]
    s, _ = logits(q, k, scale=scale, softcap=softcap)
    if masked:
      visible = _key_block_mask(j, q_pos, q_seg, kvseg_ref, block_kv=block_kv, causal=causal, window=window,
                                kv_len=kv_len)
      s = jnp.where(visible, s, MASKED)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[:, None])
    if masked:
      p = jnp.where(visible, p, np.float32(0))
    alpha = jnp.exp(m - m_new)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, alpha * l + p.sum(axis=-1), acc

  lo, hi = kv_range(i, block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks, offset=offset,
                    causal=causal, window=window)
  lo, hi = jnp.maximum(lo, range_ref[0]), jnp.minimum(hi, range_ref[1])  # and the blocks sharing a segment
  init = (jnp.full((block_q,), MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros(o_ref.shape, jnp.float32))
  m, l, acc = _loop_with_mask_free_middle(lo, hi, full_blocks and full_blocks(i), body, init)
  seen = l > 0  # a fully masked row attends to nothing: output 0
  safe = jnp.where(seen, l, np.float32(1))
  o_ref[...] = jnp.where(seen[:, None], acc / safe[:, None], np.float32(0)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe), np.float32(np.inf))


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, range_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               causal, window, softcap, block_kv, num_kv_blocks, offset, full_blocks, kv_len):
  block_q = q_ref.shape[0]
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = (i * block_q + offset + jnp.arange(block_q, dtype=jnp.int32))[:, None]  # [bq, 1]
  q_seg = qseg_ref[...][:, None]

  def body(j, dq, masked):
    k = k_ref[pl.ds(j * block_kv, block_kv), :]
    v = v_ref[pl.ds(j * block_kv, block_kv), :]
    s, dtanh = logits(q, k, scale=scale, softcap=softcap)
    p = jnp.exp(s - lse[:, None])
    if masked:
      visible = _key_block_mask(j, q_pos, q_seg, kvseg_ref, block_kv=block_kv, causal=causal, window=window,
                                kv_len=kv_len)
      p = jnp.where(visible, p, np.float32(0))
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if softcap:
      ds = ds * dtanh
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  lo, hi = kv_range(i, block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks, offset=offset,
                    causal=causal, window=window)
  lo, hi = jnp.maximum(lo, range_ref[0]), jnp.minimum(hi, range_ref[1])
  dq = _loop_with_mask_free_middle(lo, hi, full_blocks and full_blocks(i), body,
                                   jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, range_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, causal, window, softcap, block_q, num_q_blocks, offset, full_blocks, kv_len):
  """One key block of one kv head: sums over every query block and the G query heads it serves."""
  block_kv = k_ref.shape[0]
  group = q_ref.shape[0]
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kv_pos = (j * block_kv + jnp.arange(block_kv, dtype=jnp.int32))[None, :]  # [1, bk]
  kv_seg = kvseg_ref[...][None, :]
  lo, hi = q_range(j, block_q=block_q, block_kv=block_kv, num_q_blocks=num_q_blocks, offset=offset, causal=causal,
                   window=window)
  lo, hi = jnp.maximum(lo, range_ref[0]), jnp.minimum(hi, range_ref[1])  # and the blocks sharing a segment

  def body(step, carry, masked):
    # One (query block, query head) pair per step, heads innermost: one q and one dO tile live at a
    # time (a static loop over the G heads kept G of each, which overflowed a GPU's shared memory).
    dk, dv = carry
    i, g = div(step, group), jax.lax.rem(step, jnp.int32(group))  # step >= 0: no floor-division fix-ups
    q = q_ref[g, pl.ds(i * block_q, block_q), :]
    do = do_ref[g, pl.ds(i * block_q, block_q), :]
    lse = lse_ref[g, pl.ds(i * block_q, block_q)]
    delta = delta_ref[g, pl.ds(i * block_q, block_q)]
    s, dtanh = logits(q, k, scale=scale, softcap=softcap)
    p = jnp.exp(s - lse[:, None])  # [bq, bk]
    if masked:
      q_pos = (i * block_q + offset + jnp.arange(block_q, dtype=jnp.int32))[:, None]  # [bq, 1]
      visible = mask(q_pos, kv_pos, qseg_ref[pl.ds(i * block_q, block_q)][:, None], kv_seg, causal=causal,
                     window=window, kv_len=kv_len)
      p = jnp.where(visible, p, np.float32(0))
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if softcap:
      ds = ds * dtanh
    dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(dk_ref.shape, jnp.float32)
  full = full_blocks and full_blocks(j)
  full = full and (full[0] * group, full[1] * group)
  dk, dv = _loop_with_mask_free_middle(lo * group, hi * group, full, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_block_specs(block_q, kv_len, head_dim, group):
  """Specs of (q, k, v, q_seg, kv_seg, kv_ranges) on the grid (b, n, i): a query block and its kv
  head's whole rows."""
  return [
      block_spec((None, None, block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
      block_spec((None, None, kv_len, head_dim), lambda b, n, i: (b, div(n, group), 0, 0)),
      block_spec((None, None, kv_len, head_dim), lambda b, n, i: (b, div(n, group), 0, 0)),
      block_spec((None, block_q), lambda b, n, i: (b, i)),
      block_spec((None, kv_len), lambda b, n, i: (b, 0)),
      block_spec((None, None, 2), lambda b, n, i: (b, i, 0)),  # key blocks sharing a segment
  ]


def forward(q, k, v, q_seg, kv_seg, st: FlashStatic):
  """q [B, N, Tp, H], k/v [B, K, Sp, H] (padded to the blocks), segment ids [B, Tp] / [B, Sp] int32
  -> (o [B, N, Tp, H], lse [B, N, Tp] float32)."""
  batch, heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  kernel = functools.partial(
      _forward_kernel, scale=st.scale, causal=st.causal, window=st.window, softcap=st.softcap,
      block_kv=st.block_kv, num_kv_blocks=kv_len // st.block_kv, offset=st.offset,
      full_blocks=mask_free_blocks(full_kv_range, st), kv_len=st.kv_len,
  )
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, q_len // st.block_q),
      in_specs=_query_block_specs(st.block_q, kv_len, head_dim, group),
      out_specs=[
          block_spec((None, None, st.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
          block_spec((None, None, st.block_q), lambda b, n, i: (b, n, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      interpret=st.interpret,
      compiler_params=st.gpu_params,
      name="flash_attention_forward",
  )(q, k, v, q_seg, kv_seg, segment_block_ranges(q_seg, kv_seg, st.block_q, st.block_kv, st.q_len, st.kv_len)[0])


def backward(q, k, v, q_seg, kv_seg, o, lse, do, st: FlashStatic):
  """The forward's inputs, o, lse and do [B, N, Tp, H] -> (dq, dk, dv), each in its input's shape."""
  batch, heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, N, Tp]
  common = dict(scale=st.scale, causal=st.causal, window=st.window, softcap=st.softcap, offset=st.offset,
                kv_len=st.kv_len)
  kv_ranges, q_ranges = segment_block_ranges(q_seg, kv_seg, st.block_q, st.block_kv, st.q_len, st.kv_len)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=st.block_kv, num_kv_blocks=kv_len // st.block_kv,
                        full_blocks=mask_free_blocks(full_kv_range, st), **common),
      grid=(batch, heads, q_len // st.block_q),
      in_specs=[
          *_query_block_specs(st.block_q, kv_len, head_dim, group),
          block_spec((None, None, st.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
          block_spec((None, None, st.block_q), lambda b, n, i: (b, n, i)),
          block_spec((None, None, st.block_q), lambda b, n, i: (b, n, i)),
      ],
      out_specs=block_spec((None, None, st.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=st.interpret,
      compiler_params=st.gpu_params,
      name="flash_attention_dq",
  )(q, k, v, q_seg, kv_seg, kv_ranges, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=st.block_q, num_q_blocks=q_len // st.block_q,
                        full_blocks=mask_free_blocks(full_q_range, st), **common),
      grid=(batch, kv_heads, kv_len // st.block_kv),
      in_specs=[
          block_spec((None, group, q_len, head_dim), lambda b, h, j: (b, h, 0, 0)),
          block_spec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
          block_spec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
          block_spec((None, q_len), lambda b, h, j: (b, 0)),
          block_spec((None, st.block_kv), lambda b, h, j: (b, j)),
          block_spec((None, None, 2), lambda b, h, j: (b, j, 0)),  # query blocks sharing a segment
          block_spec((None, group, q_len, head_dim), lambda b, h, j: (b, h, 0, 0)),
          block_spec((None, group, q_len), lambda b, h, j: (b, h, 0)),
          block_spec((None, group, q_len), lambda b, h, j: (b, h, 0)),
      ],
      out_specs=[
          block_spec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
          block_spec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=st.interpret,
      compiler_params=st.gpu_params,
      name="flash_attention_dkv",
  )(q, k, v, q_seg, kv_seg, q_ranges, do, lse, delta)
  return dq, dk, dv
