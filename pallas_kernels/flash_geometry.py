"""What both flash-attention layouts share: which blocks and pairs are visible, and the tile logits.

Positions are absolute: query t of T sits at t + offset, key s at s; offset = S - T in
`flash_attention` (the queries are the last T positions), any offset in one block of a longer
sequence (`flash_attention_block`; causal there only with offset <= S - T, so that padded keys
still follow every query). Query t sees key s iff their segment ids match, s <= t + offset when
causal (s < S when not: padded keys are hidden by position), and t + offset - s < window when a
window is set. Blocks are numbered along the padded lengths: query block i holds queries
[i * block_q, (i + 1) * block_q), key block j keys [j * block_kv, (j + 1) * block_kv).

Index arithmetic is int32 throughout, explicitly: program ids and grid indices are int32, and with
`jax_enable_x64` a Python int or a default `jnp.arange` is int64, which `lax.div` refuses to mix
with int32 and Mosaic's and Triton's index maps do not want.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

# float32, not a Python float: in a jnp.where, a Python float would be a float64 constant under x64.
MASKED = np.float32(-0.7 * np.finfo(np.float32).max)  # finite: exp(MASKED - MASKED) is not NaN


@dataclasses.dataclass(frozen=True)
class FlashStatic:
  """The static (hashable) arguments of one platform's kernels, fixed when flash_attention traces."""

  causal: bool
  window: int  # 0: none
  softcap: float  # 0.0: none
  scale: float
  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  offset: int  # position of query 0 less that of key 0 (S - T: the queries are the last T positions)
  q_len: int  # T and S before padding
  kv_len: int
  segments: bool  # segment ids given: every block is masked
  interpret: Any  # bool, or pltpu.InterpretParams (TPU interpret mode)
  kv_grid: bool  # the TPU layout (flash_attention_tpu.py): key blocks as a grid dimension
  gpu_params: Any = None  # pltriton.CompilerParams when compiled for GPU: the Triton lowering, by name


def block_spec(block_shape, index_map):
  """pl.BlockSpec whose index map returns int32 block indices: its literal 0s too, which would be
  int64 under x64 (Mosaic and Triton take int32 indices)."""
  return pl.BlockSpec(block_shape, lambda *grid: tuple(jnp.int32(index) for index in index_map(*grid)))


def div(a, b):
  """Truncating a / b on block indices, in int32. Where a < 0 only max(0, .) of it is used, or it
  is an upper bound that is then below the range's start, so truncation and floor agree on the
  range; and it lowers without floor division's sign fix-ups (which Mosaic lowers per TPU generation)."""
  return jax.lax.div(jnp.int32(a), jnp.int32(b))


def kv_range(i, *, block_q, block_kv, num_kv_blocks, offset, causal, window):
  """Key blocks [lo, hi) that query block i can see at all (int32 scalars)."""
  hi = jnp.int32(num_kv_blocks)
  if causal:
    hi = jnp.minimum(hi, div((i + 1) * block_q + offset + block_kv - 1, block_kv))
  lo = jnp.int32(0)
  if window:
    lo = jnp.maximum(lo, div(i * block_q + offset - window + 1, block_kv))
  return lo, hi


def q_range(j, *, block_q, block_kv, num_q_blocks, offset, causal, window):
  """Query blocks [lo, hi) that can see key block j at all (int32 scalars)."""
  lo = jnp.int32(0)
  if causal:
    lo = jnp.maximum(lo, div(j * block_kv - offset, block_q))
  hi = jnp.int32(num_q_blocks)
  if window:
    hi = jnp.minimum(hi, div((j + 1) * block_kv - 1 + window - offset + block_q - 1, block_q))
  return lo, hi


def full_kv_range(i, *, block_q, block_kv, q_len, kv_len, offset, causal, window):
  """Key blocks [lo, hi) that every query of query block i sees whole, so that no mask is needed
  (without segment ids): none while the block holds padded queries, none with padded keys."""
  # int32 operands: a jnp.where of two Python ints fails Pallas's Triton lowering once multiplied.
  hi = jnp.where((i + 1) * block_q <= q_len, jnp.int32(kv_len // block_kv), jnp.int32(0))
  if causal:  # the block's last key <= its first query
    hi = jnp.minimum(hi, div(i * block_q + offset + 1, block_kv))
  lo = jnp.int32(0)
  if window:  # its last query - its first key < window
    lo = jnp.maximum(lo, div((i + 1) * block_q + offset - window + block_kv - 1, block_kv))
  return lo, hi


def full_q_range(j, *, block_q, block_kv, q_len, kv_len, offset, causal, window):
  """Query blocks [lo, hi) all of whose queries see all of key block j (see full_kv_range)."""
  hi = jnp.where((j + 1) * block_kv <= kv_len, jnp.int32(q_len // block_q), jnp.int32(0))
  lo = jnp.int32(0)
  if causal:
    lo = jnp.maximum(lo, div((j + 1) * block_kv - 1 - offset + block_q - 1, block_q))
  if window:
    hi = jnp.minimum(hi, div(window + j * block_kv - offset, block_q))
  return lo, hi


def mask_free_blocks(full_range, st: FlashStatic):
  """i -> the mask-free block range of block i (full_kv_range / full_q_range); None with segment ids."""
  if st.segments:
    return None
  return functools.partial(full_range, block_q=st.block_q, block_kv=st.block_kv, q_len=st.q_len, kv_len=st.kv_len,
                           offset=st.offset, causal=st.causal, window=st.window)


def segment_block_ranges(q_seg, kv_seg, block_q, block_kv, q_len, kv_len):
  """Per row, the key blocks [lo, hi) each query block may share a segment id with, and the query
  blocks each key block may. Two blocks share an id only if the intervals [min, max] of their ids
  overlap, so no block outside these ranges holds a visible pair, whatever the ids; for the
  non-decreasing ids of packed rows the ranges are exact, and attention over documents packed
  into a row costs about their own lengths, not the row's. Padding (positions from q_len / kv_len
  on) is left out of the intervals: a block of padding alone overlaps nothing.
  q_seg [B, Tp], kv_seg [B, Sp] int32 -> kv_ranges [B, Tp/bq, 2], q_ranges [B, Sp/bk, 2], int32."""
  batch = q_seg.shape[0]
  big, small = jnp.int32(jnp.iinfo(jnp.int32).max), jnp.int32(jnp.iinfo(jnp.int32).min)

  def intervals(ids, length, block):  # [B, L] -> ([B, L/block] min, max) over the unpadded positions
    real = (jnp.arange(ids.shape[1], dtype=jnp.int32) < length)[None]
    return (jnp.where(real, ids, big).reshape(batch, -1, block).min(-1),
            jnp.where(real, ids, small).reshape(batch, -1, block).max(-1))

  q_min, q_max = intervals(q_seg, q_len, block_q)
  kv_min, kv_max = intervals(kv_seg, kv_len, block_kv)
  overlap = (q_min[:, :, None] <= kv_max[:, None, :]) & (kv_min[:, None, :] <= q_max[:, :, None])  # [B, nq, nk]

  def first_to_last(x):  # [..., n] -> [..., 2]: [first true, last true + 1), [0, 0) when none
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    hi = jnp.max(jnp.where(x, index + 1, jnp.int32(0)), axis=-1)
    lo = jnp.minimum(jnp.min(jnp.where(x, index, jnp.int32(x.shape[-1])), axis=-1), hi)
    return jnp.stack([lo, hi], axis=-1)

  return first_to_last(overlap), first_to_last(jnp.swapaxes(overlap, 1, 2))


def mask(q_pos, kv_pos, q_seg, kv_seg, *, causal, window, kv_len):
  """Whether the queries at absolute positions q_pos see the keys at kv_pos, from the positions and
  the segment ids; q_pos and q_seg broadcast against kv_pos and kv_seg (e.g. [bq, 1] and [1, bk]).
  Padded keys (from kv_len on) are hidden by position, not by their segment id (-1), which a
  caller's ids may share; with causal masking they lie after every query anyway."""
  visible = q_seg == kv_seg
  if causal:
    visible &= kv_pos <= q_pos
  else:
    visible &= kv_pos < kv_len
  if window:
    visible &= q_pos - kv_pos < window
  return visible


def logits(q, k, *, scale, softcap):
  """[bq, bk] scaled (and soft-capped) logits of q [bq, H] and k [bk, H] in float32, and tanh'
  for the backward pass (None without soft-cap)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  if softcap:
    t = jnp.tanh(s / softcap)
    return softcap * t, 1.0 - t * t
  return s, None
