"""Flash attention (Dao et al. 2022) in Pallas: tiled online softmax, the T x S matrix never stored.

Layout of this first lowering: one program per (batch, query head, query block) that walks the
key/value blocks it can see (blocks that causality or the window hide entirely are skipped), the
FlashAttention-2 structure of jax's own GPU kernels. GQA is in the index maps: query head n reads
kv head n // G, so K and V are never repeated. The backward pass is a custom_vjp with a dQ kernel
(per query block) and a dK/dV kernel (per key block, over the G query heads of its kv head).
Without segment ids, each kernel's loop is split as in FlashAttention-2: the blocks every pair of
which is visible (inside the causal triangle and the window, no padding) are walked without
building a mask; only the blocks on the diagonal, at the window's edge or holding padding are
masked. With segment ids, each loop (and the TPU layout's grid walk) is narrowed to the blocks
that can share an id (_segment_block_ranges): for documents packed into a row, attention costs
about the documents' own lengths, not the row's.

Where it runs: in Pallas interpret mode on CPU (the tests), and compiled on GPU. On TPU, and in
TPU interpret mode (`interpret=pltpu.InterpretParams()` or inside `pltpu.force_tpu_interpret_mode()`),
the layout of flash_attention_tpu.py is used instead (key blocks as a grid dimension, the softmax
state in VMEM scratch), since this one would keep a head's whole K/V rows in VMEM. The choice is
made per platform when the computation is lowered (`jax.lax.platform_dependent`), not from the
default backend at trace time, so lowering or exporting for another platform gets its kernels.

GPU lowering: Pallas's Triton backend, named by passing `pltriton.CompilerParams`. jax 0.11
deprecates it in favour of Mosaic GPU, and since jax 0.10 a GPU pallas_call without compiler
params lowers with Mosaic GPU, which rejects these kernels (seen by lowering them for CUDA on a
CPU host: Mosaic GPU cannot lay out their iotas). Triton is chosen because (1) it is present and
working in both jax 0.10.2 (our registry's newest) and 0.11.x (the GPU machines'), deprecated
there but not removed; (2) it compiles the very kernel bodies that the interpret-mode tests check
against the float64 reference, where a Mosaic GPU kernel is a separate program (warpgroup
matmuls, SMEM buffers and barriers written out by hand, Hopper-first) whose only checks without
a GPU would be Mosaic GPU's experimental interpret mode and its lowering, with no compiler here to
read its resources the way benchmarks/triton_resources.py reads Triton's; (3) Triton pipelines the
key loop itself (`num_stages`). The port to Mosaic GPU is due when Triton
is removed from Pallas, or sooner if the benchmark shows Triton far from cuDNN. On GPU, blocks are
at least 16 (Triton's dot) and the head dimension is padded to a power of two.

Status: forward and backward are tested in Pallas interpret mode and the TPU layout in TPU
interpret mode on CPU; the Triton lowering of all three kernels, and the Mosaic lowering of the
TPU layout's, are checked by lowering for CUDA and TPU on CPU (tests/test_flash_attention.py),
and benchmarks/triton_resources.py compiles their Triton IR for sm_90a with the `triton` package
(shared memory, registers, spills; the GPU BlockSizes come from it). Nothing has run on a real
GPU or TPU yet and no block size is timed; `bash benchmarks/gpu_check.sh` is the prepared check
for when a GPU is lent.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(_MASKED - _MASKED) is not NaN


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the kernels and, on GPU, Triton's launch parameters.

  block_q x block_kv tiles the forward pass; block_q_bwd x block_kv_bwd (None: the forward's) the dQ
  and dK/dV kernels, which hold more per tile (dK and dV accumulators, P, dP and dS). Defaults per
  backend from `get_default(backend, head_dim)`. None has been timed on a chip (none was lent): TPU
  takes 128 x 128 tiles (the lane width); GPU takes the largest tiles whose three kernels compile
  for sm_90a (H100/H200) without spilling registers, within shared memory, as measured by
  benchmarks/triton_resources.py with Triton 3.9 (the figures are in benchmarks/RESULTS.md)."""

  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None
  num_warps: int | None = None  # GPU (Triton) only; None lets Pallas choose (4)
  num_stages: int | None = None  # GPU (Triton) only: software-pipelining depth of the key loop

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
      value = getattr(self, name)
      if value is not None and (value <= 0 or value & (value - 1)):
        raise ValueError(f"BlockSizes.{name}={value} must be a positive power of two")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"BlockSizes.{name}={value} must be positive")

  @property
  def backward(self) -> tuple[int, int]:
    """(block_q, block_kv) of the backward kernels."""
    return self.block_q_bwd or self.block_q, self.block_kv_bwd or self.block_kv

  @classmethod
  def get_default(cls, backend: str | None = None, head_dim: int = 128) -> "BlockSizes":
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
      # Each the largest tiles with no register spills in any of the three kernels (with segments,
      # window and soft-cap) on sm_90a, 8 warps, 2 stages: benchmarks/triton_resources.py.
      if head_dim <= 64:
        return cls(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=64, num_warps=8, num_stages=2)
      if head_dim <= 128:
        return cls(block_q=128, block_kv=64, block_q_bwd=128, block_kv_bwd=32, num_warps=8, num_stages=2)
      return cls(block_q=64, block_kv=64, block_q_bwd=32, block_kv_bwd=32, num_warps=8, num_stages=2)
    return cls()


def _mask(q_idx, kv_idx, q_seg, kv_seg, *, causal, window, kv_len):
  """[bq, bk] visibility from absolute indices and segment ids. Padded keys (from kv_len on) are
  hidden by position, not by their segment id (-1), which a caller's ids may share; with causal
  masking they lie after every query anyway."""
  mask = q_seg[:, None] == kv_seg[None, :]
  if causal:
    mask &= kv_idx[None, :] <= q_idx[:, None]
  else:
    mask &= kv_idx[None, :] < kv_len
  if window:
    mask &= q_idx[:, None] - kv_idx[None, :] < window
  return mask


def _logits(q, k, *, scale, softcap):
  """Scaled (and soft-capped) logits in float32, and tanh' for the backward pass."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  if softcap:
    t = jnp.tanh(s / softcap)
    return softcap * t, 1.0 - t * t
  return s, None


def _div(a, b):
  """Truncating a / b on block indices. Where a < 0 only max(0, .) of it is used, or it is an
  upper bound that is then below the range's start, so truncation and floor agree on the range;
  and it lowers without floor division's sign fix-ups (which Mosaic lowers per TPU generation)."""
  return jax.lax.div(a, b)


def _kv_range(i, *, block_q, block_kv, num_kv_blocks, offset, causal, window):
  """Key blocks [lo, hi) that query block i can see at all."""
  hi = num_kv_blocks
  if causal:
    hi = jnp.minimum(num_kv_blocks, _div((i + 1) * block_q + offset + block_kv - 1, block_kv))
  lo = 0
  if window:
    lo = jnp.maximum(0, _div(i * block_q + offset - window + 1, block_kv))
  return lo, hi


def _q_range(j, *, block_q, block_kv, num_q_blocks, offset, causal, window):
  """Query blocks [lo, hi) that can see key block j at all."""
  lo = 0
  if causal:
    lo = jnp.maximum(0, _div(j * block_kv - offset, block_q))
  hi = num_q_blocks
  if window:
    hi = jnp.minimum(num_q_blocks, _div((j + 1) * block_kv - 1 + window - offset + block_q - 1, block_q))
  return lo, hi


def _full_kv_range(i, *, block_q, block_kv, q_len, kv_len, offset, causal, window):
  """Key blocks [lo, hi) that every query of query block i sees whole, so that no mask is needed
  (without segment ids): none while the block holds padded queries, none with padded keys."""
  # int32 operands: a jnp.where of two Python ints fails Pallas's Triton lowering once multiplied.
  hi = jnp.where((i + 1) * block_q <= q_len, jnp.int32(kv_len // block_kv), jnp.int32(0))
  if causal:  # the block's last key <= its first query
    hi = jnp.minimum(hi, _div(i * block_q + offset + 1, block_kv))
  lo = 0
  if window:  # its last query - its first key < window
    lo = jnp.maximum(0, _div((i + 1) * block_q + offset - window + block_kv - 1, block_kv))
  return lo, hi


def _full_q_range(j, *, block_q, block_kv, q_len, kv_len, offset, causal, window):
  """Query blocks [lo, hi) all of whose queries see all of key block j (see _full_kv_range)."""
  hi = jnp.where((j + 1) * block_kv <= kv_len, jnp.int32(q_len // block_q), jnp.int32(0))
  lo = 0
  if causal:
    lo = jnp.maximum(0, _div((j + 1) * block_kv - 1 - offset + block_q - 1, block_q))
  if window:
    hi = jnp.minimum(hi, _div(window + j * block_kv - offset, block_q))
  return lo, hi


def _segment_block_ranges(q_seg, kv_seg, block_q, block_kv, q_len, kv_len):
  """Per row, the key blocks [lo, hi) each query block may share a segment id with, and the query
  blocks each key block may. Two blocks share an id only if the intervals [min, max] of their ids
  overlap, so no block outside these ranges holds a visible pair, whatever the ids; for the
  non-decreasing ids of packed rows the ranges are exact, and attention over documents packed
  into a row costs about their own lengths, not the row's. Padding (positions from q_len / kv_len
  on) is left out of the intervals: a block of padding alone overlaps nothing.
  q_seg [B, Tp], kv_seg [B, Sp] -> kv_ranges [B, Tp/bq, 2], q_ranges [B, Sp/bk, 2], int32."""
  batch = q_seg.shape[0]
  big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min

  def intervals(ids, length, block):  # [B, L] -> ([B, L/block] min, max) over the unpadded positions
    real = (jnp.arange(ids.shape[1]) < length)[None]
    return (jnp.where(real, ids, big).reshape(batch, -1, block).min(-1),
            jnp.where(real, ids, small).reshape(batch, -1, block).max(-1))

  q_min, q_max = intervals(q_seg, q_len, block_q)
  kv_min, kv_max = intervals(kv_seg, kv_len, block_kv)
  overlap = (q_min[:, :, None] <= kv_max[:, None, :]) & (kv_min[:, None, :] <= q_max[:, :, None])  # [B, nq, nk]

  def first_to_last(x):  # [..., n] -> [..., 2]: [first true, last true + 1), [0, 0) when none
    index = jnp.arange(x.shape[-1])
    hi = jnp.max(jnp.where(x, index + 1, 0), axis=-1)
    lo = jnp.minimum(jnp.min(jnp.where(x, index, x.shape[-1]), axis=-1), hi)
    return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)

  return first_to_last(overlap), first_to_last(jnp.swapaxes(overlap, 1, 2))


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


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, range_ref, o_ref, lse_ref, *, scale, causal, window,
                    softcap, block_kv, num_kv_blocks, offset, full_blocks, kv_len):
  block_q = q_ref.shape[0]
  i = pl.program_id(2)
  q = q_ref[...]
  q_idx = i * block_q + offset + jnp.arange(block_q)
  q_seg = qseg_ref[...]

  def body(j, carry, masked):
    m, l, acc = carry
    k = k_ref[pl.ds(j * block_kv, block_kv), :]
    v = v_ref[pl.ds(j * block_kv, block_kv), :]
    s, _ = _logits(q, k, scale=scale, softcap=softcap)
    if masked:
      kv_idx = j * block_kv + jnp.arange(block_kv)
      mask = _mask(q_idx, kv_idx, q_seg, kvseg_ref[pl.ds(j * block_kv, block_kv)], causal=causal, window=window,
                   kv_len=kv_len)
      s = jnp.where(mask, s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, alpha * l + p.sum(axis=-1), acc

  lo, hi = _kv_range(i, block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks, offset=offset,
                     causal=causal, window=window)
  lo, hi = jnp.maximum(lo, range_ref[0]), jnp.minimum(hi, range_ref[1])  # and the blocks sharing a segment
  init = (jnp.full((block_q,), _MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros(o_ref.shape, jnp.float32))
  m, l, acc = _loop_with_mask_free_middle(lo, hi, full_blocks and full_blocks(i), body, init)
  seen = l > 0  # a fully masked row attends to nothing: output 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, range_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               causal, window, softcap, block_kv, num_kv_blocks, offset, full_blocks, kv_len):
  block_q = q_ref.shape[0]
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_idx = i * block_q + offset + jnp.arange(block_q)
  q_seg = qseg_ref[...]

  def body(j, dq, masked):
    k = k_ref[pl.ds(j * block_kv, block_kv), :]
    v = v_ref[pl.ds(j * block_kv, block_kv), :]
    s, dtanh = _logits(q, k, scale=scale, softcap=softcap)
    p = jnp.exp(s - lse[:, None])
    if masked:
      kv_idx = j * block_kv + jnp.arange(block_kv)
      mask = _mask(q_idx, kv_idx, q_seg, kvseg_ref[pl.ds(j * block_kv, block_kv)], causal=causal, window=window,
                   kv_len=kv_len)
      p = jnp.where(mask, p, 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    if softcap:
      ds = ds * dtanh
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  lo, hi = _kv_range(i, block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks, offset=offset,
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
  kv_idx = j * block_kv + jnp.arange(block_kv)
  kv_seg = kvseg_ref[...]
  lo, hi = _q_range(j, block_q=block_q, block_kv=block_kv, num_q_blocks=num_q_blocks, offset=offset, causal=causal,
                    window=window)
  lo, hi = jnp.maximum(lo, range_ref[0]), jnp.minimum(hi, range_ref[1])  # and the blocks sharing a segment

  def body(step, carry, masked):
    # One (query block, query head) pair per step, heads innermost: one q and one dO tile live at a
    # time (a static loop over the G heads kept G of each, which overflowed a GPU's shared memory).
    dk, dv = carry
    i, g = jax.lax.div(step, group), jax.lax.rem(step, group)  # step >= 0: no floor-division fix-ups
    q = q_ref[g, pl.ds(i * block_q, block_q), :]
    do = do_ref[g, pl.ds(i * block_q, block_q), :]
    lse = lse_ref[g, pl.ds(i * block_q, block_q)]
    delta = delta_ref[g, pl.ds(i * block_q, block_q)]
    s, dtanh = _logits(q, k, scale=scale, softcap=softcap)
    p = jnp.exp(s - lse[:, None])  # [bq, bk]
    if masked:
      q_idx = i * block_q + offset + jnp.arange(block_q)
      mask = _mask(q_idx, kv_idx, qseg_ref[pl.ds(i * block_q, block_q)], kv_seg, causal=causal, window=window,
                   kv_len=kv_len)
      p = jnp.where(mask, p, 0.0)
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


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  window: int
  softcap: float
  scale: float
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  offset: int  # S - T: queries are the last T positions
  q_len: int  # T and S before padding
  kv_len: int
  segments: bool  # segment ids given: every block is masked
  interpret: Any  # bool, or pltpu.InterpretParams (TPU interpret mode)
  kv_grid: bool  # the TPU layout (flash_attention_tpu.py): key blocks as a grid dimension
  gpu_params: Any = None  # pltriton.CompilerParams when compiled for GPU: the Triton lowering, by name


def _query_block_specs(block_q, kv_len, head_dim, group):
  """Specs of (q, k, v, q_seg, kv_seg, kv_ranges) on the grid (b, n, i): a query block and its kv
  head's whole rows."""
  return [
      pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
      pl.BlockSpec((None, None, kv_len, head_dim), lambda b, n, i: (b, _div(n, group), 0, 0)),
      pl.BlockSpec((None, None, kv_len, head_dim), lambda b, n, i: (b, _div(n, group), 0, 0)),
      pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)),
      pl.BlockSpec((None, kv_len), lambda b, n, i: (b, 0)),
      pl.BlockSpec((None, None, 2), lambda b, n, i: (b, i, 0)),  # key blocks sharing a segment
  ]


def _full_blocks(full_range, st: _Static):
  """i -> the mask-free block range of block i (_full_kv_range / _full_q_range); None with segment ids."""
  if st.segments:
    return None
  return functools.partial(full_range, block_q=st.block_q, block_kv=st.block_kv, q_len=st.q_len, kv_len=st.kv_len,
                           offset=st.offset, causal=st.causal, window=st.window)


def _forward(q, k, v, q_seg, kv_seg, st: _Static):
  """q [B, N, Tp, H], k/v [B, K, Sp, H] (padded to the blocks) -> (o [B, N, Tp, H], lse [B, N, Tp])."""
  batch, heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  kernel = functools.partial(
      _forward_kernel, scale=st.scale, causal=st.causal, window=st.window, softcap=st.softcap,
      block_kv=st.block_kv, num_kv_blocks=kv_len // st.block_kv, offset=st.offset,
      full_blocks=_full_blocks(_full_kv_range, st), kv_len=st.kv_len,
  )
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, q_len // st.block_q),
      in_specs=_query_block_specs(st.block_q, kv_len, head_dim, group),
      out_specs=[
          pl.BlockSpec((None, None, st.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, st.block_q), lambda b, n, i: (b, n, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      interpret=st.interpret,
      compiler_params=st.gpu_params,
      name="flash_attention_forward",
  )(q, k, v, q_seg, kv_seg, _segment_block_ranges(q_seg, kv_seg, st.block_q, st.block_kv, st.q_len, st.kv_len)[0])


def _backward(q, k, v, q_seg, kv_seg, o, lse, do, st: _Static):
  batch, heads, q_len, head_dim = q.shape
  kv_heads, kv_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, N, Tp]
  common = dict(scale=st.scale, causal=st.causal, window=st.window, softcap=st.softcap, offset=st.offset,
                kv_len=st.kv_len)
  kv_ranges, q_ranges = _segment_block_ranges(q_seg, kv_seg, st.block_q, st.block_kv, st.q_len, st.kv_len)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=st.block_kv, num_kv_blocks=kv_len // st.block_kv,
                        full_blocks=_full_blocks(_full_kv_range, st), **common),
      grid=(batch, heads, q_len // st.block_q),
      in_specs=[
          *_query_block_specs(st.block_q, kv_len, head_dim, group),
          pl.BlockSpec((None, None, st.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, st.block_q), lambda b, n, i: (b, n, i)),
          pl.BlockSpec((None, None, st.block_q), lambda b, n, i: (b, n, i)),
      ],
      out_specs=pl.BlockSpec((None, None, st.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=st.interpret,
      compiler_params=st.gpu_params,
      name="flash_attention_dq",
  )(q, k, v, q_seg, kv_seg, kv_ranges, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=st.block_q, num_q_blocks=q_len // st.block_q,
                        full_blocks=_full_blocks(_full_q_range, st), **common),
      grid=(batch, kv_heads, kv_len // st.block_kv),
      in_specs=[
          pl.BlockSpec((None, group, q_len, head_dim), lambda b, h, j: (b, h, 0, 0)),
          pl.BlockSpec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((None, q_len), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, st.block_kv), lambda b, h, j: (b, j)),
          pl.BlockSpec((None, None, 2), lambda b, h, j: (b, j, 0)),  # query blocks sharing a segment
          pl.BlockSpec((None, group, q_len, head_dim), lambda b, h, j: (b, h, 0, 0)),
          pl.BlockSpec((None, group, q_len), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, group, q_len), lambda b, h, j: (b, h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((None, None, st.block_kv, head_dim), lambda b, h, j: (b, h, j, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=st.interpret,
      compiler_params=st.gpu_params,
      name="flash_attention_dkv",
  )(q, k, v, q_seg, kv_seg, q_ranges, do, lse, delta)
  return dq, dk, dv


def _layout(st: _Static):
  """(forward, backward) of the layout st asks for."""
  if st.kv_grid:
    from pallas_kernels import flash_attention_tpu  # noqa: PLC0415 (it imports this module's helpers)

    return flash_attention_tpu.forward, flash_attention_tpu.backward
  return _forward, _backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, st):
  return _layout(st)[0](q, k, v, q_seg, kv_seg, st)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, st):
  o, lse = _layout(st)[0](q, k, v, q_seg, kv_seg, st)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(st, residuals, do):
  q, k, v, q_seg, kv_seg, o, lse = residuals
  backward_st = dataclasses.replace(st, block_q=st.block_q_bwd, block_kv=st.block_kv_bwd)
  dq, dk, dv = _layout(st)[1](q, k, v, q_seg, kv_seg, o, lse, do, backward_st)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tpu_interpret_forced() -> bool:
  """Inside `pltpu.force_tpu_interpret_mode()`, where every pallas_call runs in TPU interpret mode."""
  from jax._src import config  # noqa: PLC0415 (the flag has no public reader)

  return getattr(config, "pallas_tpu_interpret_mode_context_manager", None) is not None and bool(
      config.pallas_tpu_interpret_mode_context_manager.value)


@functools.cache
def _has_pallas_triton() -> bool:
  try:
    from jax.experimental.pallas import triton  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def _triton_params(blocks: BlockSizes):
  """The GPU lowering, named explicitly: without compiler params, jax >= 0.10 lowers a GPU
  pallas_call with Mosaic GPU, which these kernels (whole K/V rows per program, loads of
  dynamic slices) are not written for. Called only where _has_pallas_triton()."""
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 (deprecated in jax 0.11: imported lazily)

  return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _pad(x, axis, multiple, value=0):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(
    jax.jit, static_argnames=("causal", "sliding_window", "logit_softcap", "scale", "block_sizes", "interpret")
)
def flash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    segment_ids=None,  # [B, T] when T == S, or (q_segment_ids [B, T], kv_segment_ids [B, S])
    causal: bool = True,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: "bool | pltpu.InterpretParams | None" = None,
) -> jax.Array:
  """Attention without the T x S matrix; returns [B, T, N, H] in q's dtype. See `reference_attention`.

  interpret: None picks the kernels per platform when the computation is lowered
  (`jax.lax.platform_dependent`, so lowering or exporting for another platform works): Pallas
  interpret mode on CPU, Triton on GPU, the TPU layout (flash_attention_tpu.py: key blocks as a
  grid dimension) through Mosaic on TPU. False: compiled kernels only (lowering for CPU fails).
  True: Pallas interpret mode on any platform. `pltpu.InterpretParams()`, or a call inside
  `pltpu.force_tpu_interpret_mode()`: the TPU layout in TPU interpret mode (Mosaic semantics
  simulated on CPU)."""
  batch, q_len, heads, head_dim = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k and v must be [B, S, K, H] matching q [B, T, N, H]; got {q.shape=}, {k.shape=}, {v.shape=}")
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"query heads {heads=} must be a multiple of kv heads {kv_heads=}")
  if causal and q_len > kv_len:
    raise ValueError(f"causal attention needs T <= S; got {q_len=} > {kv_len=}")
  if segment_ids is None:
    q_seg, kv_seg = jnp.ones((batch, q_len), jnp.int32), jnp.ones((batch, kv_len), jnp.int32)
  elif isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(f"one segment_ids array needs T == S; give a (q, kv) pair for {q_len=}, {kv_len=}")
    q_seg = kv_seg = segment_ids
  if q_seg.shape != (batch, q_len) or kv_seg.shape != (batch, kv_len):
    raise ValueError(f"segment ids must be [B, T] and [B, S]; got {q_seg.shape} and {kv_seg.shape}")
  run = functools.partial(
      _attend, causal=causal, window=int(sliding_window or 0), softcap=float(logit_softcap or 0.0),
      scale=float(head_dim**-0.5 if scale is None else scale), block_sizes=block_sizes,
      segments=segment_ids is not None,
  )
  args = (q, k, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
  if isinstance(interpret, pltpu.InterpretParams):
    return run(*args, mode="tpu", interpret=interpret)
  if _tpu_interpret_forced():  # every pallas_call runs in TPU interpret mode: the TPU layout
    return run(*args, mode="tpu", interpret=False)
  if interpret:
    return run(*args, mode="interpret", interpret=True)
  # The kernels are chosen per platform when the computation is lowered, not by the default
  # backend at trace time, so that lowering or exporting for another platform gets its kernels.
  branches = dict(tpu=functools.partial(run, mode="tpu", interpret=False))
  if _has_pallas_triton():  # deprecated in jax 0.11: its removal must not break CPU and TPU
    branches.update(cuda=functools.partial(run, mode="triton", interpret=False),
                    rocm=functools.partial(run, mode="triton", interpret=False))
  if interpret is None:
    branches["cpu"] = functools.partial(run, mode="interpret", interpret=True)
  return jax.lax.platform_dependent(*args, **branches)


def _attend(q, k, v, q_seg, kv_seg, *, mode, interpret, causal, window, softcap, scale, block_sizes, segments):
  """One platform's attention: pad to its blocks, run its kernels, slice back.

  mode: "interpret" (the first layout, Pallas interpret mode), "triton" (the first layout
  compiled for GPU) or "tpu" (flash_attention_tpu.py's layout, compiled or in TPU interpret mode)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  triton = mode == "triton"
  # On GPU the head dimension is padded to a power of two (Triton's arrays): zero columns of q and k
  # leave the logits unchanged, zero columns of v give output columns that are sliced away.
  padded_head_dim = max(16, pl.next_power_of_2(head_dim)) if triton else head_dim
  blocks = block_sizes or BlockSizes.get_default({"triton": "gpu", "tpu": "tpu"}.get(mode, "cpu"), padded_head_dim)
  # Small inputs take small blocks, not a block of padding: at least 8 rows (TPU's sublane tile),
  # 16 on GPU (Triton's tl.dot needs M, N, K >= 16; smaller blocks given are raised to 16 there).
  smallest = 16 if triton else 8
  fit_q = lambda block: max(smallest, min(block, pl.next_power_of_2(q_len)))  # noqa: E731
  fit_kv = lambda block: max(smallest, min(block, pl.next_power_of_2(kv_len)))  # noqa: E731
  block_q, block_kv = fit_q(blocks.block_q), fit_kv(blocks.block_kv)
  block_q_bwd, block_kv_bwd = fit_q(blocks.backward[0]), fit_kv(blocks.backward[1])
  st = _Static(
      causal=causal, window=window, softcap=softcap, scale=scale, block_q=block_q, block_kv=block_kv,
      block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd, offset=kv_len - q_len, q_len=q_len, kv_len=kv_len,
      segments=segments, interpret=interpret, kv_grid=mode == "tpu",
      gpu_params=_triton_params(blocks) if triton else None,
  )
  # Padding: padded keys get segment -1 (seen by no query); padded queries are sliced away.
  # Lengths are padded to the larger of the forward and backward blocks (powers of two: a multiple of both).
  q_multiple, kv_multiple = max(block_q, block_q_bwd), max(block_kv, block_kv_bwd)
  qt = _pad(_pad(jnp.swapaxes(q, 1, 2), 2, q_multiple), 3, padded_head_dim)  # [B, N, Tp, Hp]
  kt = _pad(_pad(jnp.swapaxes(k, 1, 2), 2, kv_multiple), 3, padded_head_dim)  # [B, K, Sp, Hp]
  vt = _pad(_pad(jnp.swapaxes(v, 1, 2), 2, kv_multiple), 3, padded_head_dim)
  q_seg = _pad(q_seg, 1, q_multiple, value=-2)
  kv_seg = _pad(kv_seg, 1, kv_multiple, value=-1)
  out = _flash(qt, kt, vt, q_seg, kv_seg, st)[..., :head_dim]
  return jnp.swapaxes(out[:, :, :q_len], 1, 2)


def reference_attention(
    q, k, v, *, segment_ids=None, causal=True, sliding_window=None, logit_softcap=None, scale=None,
    block_sizes=None, interpret=None,
):
  """Plain-jnp attention with flash_attention's signature (the T x S matrix materialized)."""
  del block_sizes, interpret
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if segment_ids is None:
    q_seg, kv_seg = jnp.ones((batch, q_len), jnp.int32), jnp.ones((batch, kv_len), jnp.int32)
  elif isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  q_idx = jnp.arange(q_len) + (kv_len - q_len)
  by_index = _mask(q_idx, jnp.arange(kv_len), jnp.zeros(q_len), jnp.zeros(kv_len), causal=causal, kv_len=kv_len,
                   window=int(sliding_window or 0))  # [T, S]
  mask = by_index[None] & (q_seg[:, :, None] == kv_seg[:, None, :])  # [B, T, S]
  group = heads // kv_heads
  dtype = jnp.promote_types(q.dtype, jnp.float32)  # float64 inputs stay float64 (under enable_x64)
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim).astype(dtype)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(dtype)) * (head_dim**-0.5 if scale is None else scale)
  if logit_softcap:
    s = logit_softcap * jnp.tanh(s / logit_softcap)
  m = mask[:, None, None]
  p = jnp.where(m, jax.nn.softmax(jnp.where(m, s, _MASKED), axis=-1), 0.0)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(dtype))
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
