"""Ring attention (context parallelism): self-attention whose sequence is sharded over a mesh axis.

Liu et al. 2023, "Ring Attention with Blockwise Transformers": each of the P devices on the axis
keeps its T/P queries and passes its key/value block around the ring (`jax.lax.ppermute`), so after
P steps every query block has met every key block, and no device ever holds more than one [T/P, T/P]
block of scores. Partial softmaxes are merged with a running max and sum (flash attention's online
softmax, Dao et al. 2022, eq. in sec. 3.1). The backward pass is FlashAttention-2's (Dao 2023,
alg. 2) run around the ring a second time: dq stays home, and dk/dv accumulators travel with their
key/value block and arrive back at its owner after P steps; only out and the log-sum-exp are saved.

Causal load balancing is the zig-zag layout (Brandon et al. 2023, "Striped Attention" discusses
the alternatives): the sequence is cut into 2P chunks and device d holds chunks d and 2P-1-d, so
every device has as many visible (query, key) pairs as any other. Each device's block is then two
chunks, and a (query chunk, key chunk) pair whose mask is all False is skipped with `lax.cond`
(its matmuls are not run): that skips the chunk pairs above the causal diagonal, outside a sliding
window, or across packed segments. Masks come from absolute positions and segment ids carried with
each key/value block, so causal, window and segment masking are those of
`attention_masks.attention_mask`.

Each (query chunk, key chunk) pair runs in plain jnp in float32 (`block_impl='xla'`), which holds
its [T/2P, T/2P] scores, or through the Pallas flash kernel (`block_impl='pallas'`), which holds
none: `pallas_kernels.flash_attention_block` returns the pair's output and log-sum-exp, merged
into the row's as partial softmaxes merge, and `flash_attention_block_backward` takes the row's
merged output and log-sum-exp. Chunks are contiguous, so a pair is a kernel call with a static
offset between its query and key positions: the diagonal (causal), a pair whose queries all follow
its keys (no mask), one cut by the window's edge (the window at its offset), or none (skipped).
`_flash_kinds` lists the calls a ring can need, and each pair picks its call with `lax.switch`.

The decoder's one attention call, `attention_ops.attention`, runs the ring when the rules in
context shard the sequence.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from model import sharding
from model.attention_masks import BTKH, BTNH, MASKED, attention_mask


def zigzag_indices(seq_len: int, num_shards: int) -> np.ndarray:
  """[T] token order of the zig-zag layout: x[:, idx] puts chunks (d, 2P-1-d) on shard d.

  np.argsort(idx) is the inverse permutation (back to sequence order)."""
  if seq_len % (2 * num_shards):
    raise ValueError(f"zig-zag needs seq_len={seq_len} divisible by 2 * num_shards={2 * num_shards}")
  chunk = seq_len // (2 * num_shards)
  order = [c for d in range(num_shards) for c in (d, 2 * num_shards - 1 - d)]
  return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order])


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static settings of one ring call (hashable: custom_vjp's non-differentiable argument)."""

  mesh: Mesh
  axis: str
  batch_spec: object  # mesh axes of B (and of K, below) that stay sharded inside the ring
  heads_spec: object
  causal: bool
  logit_softcap: float
  scale: float
  chunks: int  # chunks per device block: 2 with zig-zag, else 1
  alibi: bool  # ALiBi's bias, -slope * |query position - key position|, added to the logits
  flash: "_Flash | None" = None  # each pair through the flash kernel; None: in jnp

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]


@dataclasses.dataclass(frozen=True)
class _Flash:
  """Static settings of the flash kernel's calls: `kinds[i]` is branch i + 1's (causal, window, offset),
  `table[d + C - 1]` the branch of a pair whose query chunk is d chunks after its key chunk (0: skip)."""

  window: int
  segments: bool  # segment ids given (else the kernel skips masks inside the visible region)
  block_sizes: object  # pallas_kernels.BlockSizes, or None: the kernel's defaults
  kinds: tuple
  table: tuple


def _flash_kinds(causal: bool, window: int, chunk: int, num_chunks: int) -> tuple[tuple, tuple]:
  """(kinds, table) of _Flash for chunks of `chunk` positions, `num_chunks` in the sequence.

  Query chunk qc against key chunk kc: t + d - s over t, s in [0, chunk) with d = (qc - kc) * chunk,
  between d - chunk + 1 and d + chunk - 1. Causal: d < 0 sees nothing, d = 0 is the diagonal (the
  window binds there only below chunk), and d > 0 sees every key causally, so it is causal=False,
  as the kernel wants a block whose queries all follow its keys. Then the window: nothing where
  d - chunk + 1 >= window, everything where d + chunk - 1 < window, else the window at offset d."""
  kinds, table = [], []
  for d in range(-(num_chunks - 1), num_chunks):
    offset = d * chunk
    if causal and offset < 0:
      kind = None
    elif causal and offset == 0:
      kind = (True, window if window < chunk else 0, 0)
    elif window and offset - chunk + 1 >= window:
      kind = None
    elif not window or offset + chunk - 1 < window:
      kind = (False, 0, 0)
    else:
      kind = (False, window, offset)
    if kind is not None and kind not in kinds:
      kinds.append(kind)
    table.append(0 if kind is None else 1 + kinds.index(kind))
  return tuple(kinds), tuple(table)


def ring_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    *,
    mesh: Mesh | None = None,  # default: the mesh of `sharding.axis_rules` in context
    mesh_axis: str = "sequence",
    causal: bool = True,
    q_segment_ids: jax.Array | None = None,  # [B, T]
    kv_segment_ids: jax.Array | None = None,  # [B, T]
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    scale: float | None = None,
    load_balance: bool | None = None,  # zig-zag layout; default: when causal
    block_impl: str = "xla",  # each chunk pair in jnp ('xla') or the Pallas flash kernel ('pallas')
    block_sizes=None,  # pallas_kernels.BlockSizes of the flash kernel; None: its defaults
    alibi_slopes: np.ndarray | None = None,  # [N]: ALiBi (jnp blocks only)
) -> jax.Array:
  """Self-attention with T split over `mesh_axis` and key/value blocks passed around a ring.

  Takes and returns tokens in sequence order; with load balancing it permutes them into the
  zig-zag layout and back (a gather along the sharded T, i.e. an all-to-all: a data pipeline that
  feeds zig-zagged rows could skip both). Positions are 0..T-1. Batch and head axes stay sharded as
  the context's rules shard BTNH and BTKH. block_impl='pallas' needs a static (int) sliding_window,
  as the kernel does, and no ALiBi. Returns [B, T, N, H] in q's dtype."""
  batch, seq_len, num_heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[:2] != (batch, seq_len) or k.shape[3] != head_dim:
    raise ValueError(f"ring attention is self-attention: q {q.shape}, k {k.shape} and v {v.shape} must share B, T, H")
  if num_heads % k.shape[2]:
    raise ValueError(f"query heads {num_heads} are not a multiple of kv heads {k.shape[2]}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  context = sharding.current_context()
  if mesh is None:
    if context is None:
      raise ValueError("ring_attention needs a mesh: pass mesh= or call it inside sharding.axis_rules")
    mesh = context[0]
  if mesh_axis not in mesh.shape:
    raise ValueError(f"mesh_axis={mesh_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
  size = mesh.shape[mesh_axis]
  load_balance = causal if load_balance is None else load_balance
  chunks = 2 if load_balance else 1
  if seq_len % (chunks * size):
    raise ValueError(f"seq_len={seq_len} is not divisible by {chunks} * {mesh_axis} size {size}")
  if alibi_slopes is not None and np.shape(alibi_slopes) != (num_heads,):
    raise ValueError(f"alibi_slopes has shape {np.shape(alibi_slopes)}; expected ({num_heads},), one per query head")
  flash = None
  if block_impl == "pallas":
    if alibi_slopes is not None:
      raise ValueError("block_impl='pallas' takes no ALiBi bias (the flash kernel has none); use block_impl='xla'")
    if not isinstance(sliding_window, int):
      raise ValueError("block_impl='pallas' needs a static (int) sliding_window; use block_impl='xla' for a traced one")
    chunk = seq_len // (chunks * size)
    flash = _Flash(sliding_window, q_segment_ids is not None, block_sizes,
                   *_flash_kinds(causal, sliding_window, chunk, chunks * size))
  elif block_impl != "xla":
    raise ValueError(f"block_impl={block_impl!r} is not one of ('xla', 'pallas')")

  batch_spec = heads_spec = None
  if context is not None and context[0] == mesh:
    q_spec = sharding.logical_to_spec(BTNH, q.shape, mesh, context[1])
    kv_spec = sharding.logical_to_spec(BTKH, k.shape, mesh, context[1])
    uses_axis = lambda s: s is not None and mesh_axis in ((s,) if isinstance(s, str) else s)  # noqa: E731
    batch_spec = None if uses_axis(q_spec[0]) else q_spec[0]
    # Heads stay split only where query and kv heads split alike (else each shard would need other kv heads).
    heads_spec = q_spec[2] if q_spec[2] == kv_spec[2] and not uses_axis(q_spec[2]) else None
  ring = _Ring(mesh, mesh_axis, batch_spec, heads_spec, causal, float(logit_softcap),
               float(head_dim**-0.5 if scale is None else scale), chunks, alibi_slopes is not None, flash)

  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  if q_segment_ids is None:
    q_segment_ids = kv_segment_ids = jnp.zeros((batch, seq_len), jnp.int32)
  window = jnp.asarray(sliding_window, jnp.int32)
  slopes = jnp.zeros((num_heads,), jnp.float32) if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
  arrays = (q, k, v, positions, q_segment_ids, kv_segment_ids)
  if load_balance:
    order = zigzag_indices(seq_len, size)
    arrays = tuple(x[:, order] for x in arrays)
  out = _ring_attention(ring, *arrays, window, slopes)
  return out[:, np.argsort(order)] if load_balance else out


# The custom_vjp over the sharded program: forward and backward each one shard_map of a ring.


def _specs(ring: _Ring):
  b, n, t = ring.batch_spec, ring.heads_spec, ring.axis
  return PartitionSpec(b, t, n, None), PartitionSpec(b, t), PartitionSpec(b, n, None, t)  # BTNH, BT, BKGT


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes):
  return _ring_fwd(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes)[0]


def _ring_fwd(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes):
  x, bt, lse_spec = _specs(ring)
  heads = PartitionSpec(ring.heads_spec)  # slopes [N] split as q's heads are
  out, lse = jax.shard_map(
      functools.partial(_flash_forward_shard if ring.flash else _forward_shard, ring), mesh=ring.mesh,
      in_specs=(x, x, x, bt, bt, bt, PartitionSpec(), heads), out_specs=(x, lse_spec), check_vma=False,
  )(q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes)
  return out, (q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes, out, lse)


def _ring_bwd(ring, residuals, dout):
  q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes, out, lse = residuals
  x, bt, lse_spec = _specs(ring)
  heads = PartitionSpec(ring.heads_spec)
  dq, dk, dv = jax.shard_map(
      functools.partial(_flash_backward_shard if ring.flash else _backward_shard, ring), mesh=ring.mesh,
      in_specs=(x, x, x, bt, bt, bt, PartitionSpec(), heads, x, lse_spec, x), out_specs=(x, x, x), check_vma=False,
  )(q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes, out, lse, dout)
  return dq, dk, dv, None, None, None, None, None


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


# One device's share. Shapes are local: Tl = T / P queries and keys, Tc = Tl / chunks per chunk.


def _split(x, chunks, axis):
  return tuple(jnp.split(x, chunks, axis=axis))


def _pass_on(ring: _Ring, tree):
  """Send each array to the next device on the ring (device d receives d - 1's block)."""
  perm = [(j, (j + 1) % ring.size) for j in range(ring.size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axis, perm), tree)


def _mask(ring, q_pos, kv_pos, q_seg, kv_seg, window):
  """[B, 1, 1, Tc, Sc] bool for one (query chunk, key chunk) pair."""
  mask = attention_mask(q_pos, kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=ring.causal,
                        sliding_window=window)
  return mask[:, None, None]


def _bias(ring, slopes, q_pos, kv_pos):
  """ALiBi's [B, K, G, Tc, Sc] bias for one chunk pair (slopes [K, G]); 0.0 without ALiBi."""
  if not ring.alibi:
    return 0.0
  distance = jnp.abs(q_pos[:, :, None] - kv_pos[:, None, :]).astype(jnp.float32)  # [B, Tc, Sc]
  return -slopes[None, :, :, None, None] * distance[:, None, None]


def _logits(ring, q, k, bias):
  """Scaled (and soft-capped) logits [B, K, G, Tc, Sc] in float32 plus `bias`, and tanh of the cap (or None)."""
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * ring.scale
  if not ring.logit_softcap:
    return s + bias, None
  t = jnp.tanh(s / ring.logit_softcap)
  return ring.logit_softcap * t + bias, t


def _forward_shard(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes):
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  slopes = slopes.reshape(num_kv_heads, group)
  dtype = q.dtype
  q = q.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, group, head_dim)  # [B, Tl, K, G, H]
  qs = _split(q, ring.chunks, 1)
  q_pos, q_seg = _split(positions, ring.chunks, 1), _split(q_segment_ids, ring.chunks, 1)
  tc = q_len // ring.chunks
  stats = tuple((jnp.zeros((batch, num_kv_heads, group, tc, head_dim), jnp.float32),  # o, [B, K, G, Tc, H]
                 jnp.full((batch, num_kv_heads, group, tc), MASKED, jnp.float32),  # running max m
                 jnp.zeros((batch, num_kv_heads, group, tc), jnp.float32))  # running sum l
                for _ in qs)

  def attend(stat, q, k, v, mask, bias):
    o, m, l = stat
    s, _ = _logits(ring, q, k, bias)
    s = jnp.where(mask, s, MASKED)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    o = o * correction[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p, v.astype(jnp.float32))
    return o, m_new, l * correction + p.sum(-1)

  def step(_, carry):
    stats, block = carry
    k, v, kv_pos, kv_seg = block
    stats = list(stats)
    for a in range(ring.chunks):
      for b in range(ring.chunks):
        mask = _mask(ring, q_pos[a], kv_pos[b], q_seg[a], kv_seg[b], window)
        bias = _bias(ring, slopes, q_pos[a], kv_pos[b])
        stats[a] = jax.lax.cond(mask.any(), attend, lambda stat, *_: stat, stats[a], qs[a], k[b], v[b], mask, bias)
    # The last step's pass only brings each block home: one block's transfer, overlapped with compute.
    return tuple(stats), _pass_on(ring, block)

  # k and v travel in their own dtype (half the bytes of float32 for bfloat16) and are upcast per block.
  kv = (_split(k, ring.chunks, 1), _split(v, ring.chunks, 1), _split(positions, ring.chunks, 1),
        _split(kv_segment_ids, ring.chunks, 1))
  stats, _ = jax.lax.fori_loop(0, ring.size, step, (stats, kv))
  outs, lses = [], []
  for o, m, l in stats:
    seen = l > 0  # a row that saw no key attends to nothing: zeros, as attention_ops does
    outs.append(o / jnp.where(seen, l, 1.0)[..., None])
    lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf))  # exp(s - inf) = 0 backward
  out = jnp.transpose(jnp.concatenate(outs, axis=3), (0, 3, 1, 2, 4))  # [B, Tl, K, G, H]
  return out.reshape(batch, q_len, num_heads, head_dim).astype(dtype), jnp.concatenate(lses, axis=3)


def _backward_shard(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes, out, lse, dout):
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  slopes = slopes.reshape(num_kv_heads, group)
  as5 = lambda x: x.astype(jnp.float32).reshape(batch, q_len, num_kv_heads, group, head_dim)  # noqa: E731
  q5, do5 = as5(q), as5(dout)
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", do5, as5(out))  # D_i = rowsum(dO * O), FA-2 alg. 2 line 4
  qs, dos = _split(q5, ring.chunks, 1), _split(do5, ring.chunks, 1)
  deltas, lses = _split(delta, ring.chunks, 3), _split(lse, ring.chunks, 3)
  q_pos, q_seg = _split(positions, ring.chunks, 1), _split(q_segment_ids, ring.chunks, 1)
  dqs = tuple(jnp.zeros_like(x) for x in qs)

  def grads(acc, q, do, delta, lse, k, v, mask, bias):
    dq, dk, dv = acc
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    s, t = _logits(ring, q, k, bias)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)  # [B, K, G, Tc, Sc]
    dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p, do)
    ds = p * (jnp.einsum("BTKGH,BSKH->BKGTS", do, v) - delta[..., None])
    if t is not None:
      ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
    ds = ds * ring.scale
    return (dq + jnp.einsum("BKGTS,BSKH->BTKGH", ds, k), dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q), dv)

  def step(_, carry):
    dqs, block = carry
    k, v, kv_pos, kv_seg, dk, dv = block
    dqs, dk, dv = list(dqs), list(dk), list(dv)
    for a in range(ring.chunks):
      for b in range(ring.chunks):
        mask = _mask(ring, q_pos[a], kv_pos[b], q_seg[a], kv_seg[b], window)
        dqs[a], dk[b], dv[b] = jax.lax.cond(
            mask.any(), grads, lambda acc, *_: acc, (dqs[a], dk[b], dv[b]), qs[a], dos[a], deltas[a], lses[a],
            k[b], v[b], mask, _bias(ring, slopes, q_pos[a], kv_pos[b]))
    # dk and dv travel with their block; the P-th pass brings them home to the block's owner.
    return tuple(dqs), _pass_on(ring, (k, v, kv_pos, kv_seg, tuple(dk), tuple(dv)))

  ks, vs = _split(k, ring.chunks, 1), _split(v, ring.chunks, 1)
  zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in ks)  # dk, dv accumulate in float32
  block = (ks, vs, _split(positions, ring.chunks, 1), _split(kv_segment_ids, ring.chunks, 1), zeros, zeros)
  dqs, block = jax.lax.fori_loop(0, ring.size, step, (dqs, block))
  dk, dv = jnp.concatenate(block[4], axis=1), jnp.concatenate(block[5], axis=1)
  dq = jnp.concatenate(dqs, axis=1).reshape(q.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# The same ring with each chunk pair through the flash kernel. The chunks are stacked, [c, B, Tc, ...],
# and the c * c pairs of a step walked in a fori_loop, so each kind of kernel call is traced once.


def _stack(x, chunks):
  return jnp.stack(_split(x, chunks, 1))  # [c, B, Tc, ...]


def _branch(ring, q_pos, kv_pos, q_seg, kv_seg):
  """The lax.switch branch of a pair (_Flash.table; 0 skips it) from its chunks' first positions,
  [B, Tc] each (0..T-1 in every row); and 0 where no row's query and key segment ids can match (their
  [min, max] intervals are apart: exact for packed rows), without building the pair's mask."""
  chunk = q_pos.shape[1]
  d = (q_pos[0, 0] - kv_pos[0, 0]) // chunk
  branch = jnp.asarray(ring.flash.table, jnp.int32)[d + ring.chunks * ring.size - 1]
  if not ring.flash.segments:
    return branch
  overlap = (q_seg.min(1) <= kv_seg.max(1)) & (kv_seg.min(1) <= q_seg.max(1))  # [B]
  return jnp.where(overlap.any(), branch, 0)


def _kernel_args(ring, kind, q_seg, kv_seg):
  causal, window, offset = kind
  return dict(segment_ids=(q_seg, kv_seg) if ring.flash.segments else None, offset=offset, causal=causal,
              sliding_window=window, logit_softcap=ring.logit_softcap, scale=ring.scale,
              block_sizes=ring.flash.block_sizes)


def _flash_forward_shard(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes):
  from pallas_kernels import flash_attention_block  # noqa: PLC0415 (optional backend, as in attention_ops)

  del window, slopes  # the window is static (ring.flash.window, in its kinds); no ALiBi with the kernel
  batch, q_len, num_heads, head_dim = q.shape
  c = ring.chunks
  qs, q_pos, q_seg = (_stack(x, c) for x in (q, positions, q_segment_ids))
  # The kernel's blocks come in q's dtype; the row's output and log-sum-exp merge in float32.
  init = (jnp.zeros(qs.shape, jnp.float32), jnp.full((c, batch, num_heads, q_len // c), -jnp.inf, jnp.float32))

  def attend(kind, o, lse, q, k, v, q_seg, kv_seg):  # o [B, Tc, N, H], lse [B, N, Tc]
    o_block, lse_block = flash_attention_block(q, k, v, **_kernel_args(ring, kind, q_seg, kv_seg))
    lse_block = jnp.where(lse_block == jnp.inf, -jnp.inf, lse_block)  # the kernel's +inf: saw no key
    merged = jnp.logaddexp(lse, lse_block)  # -inf where neither block saw a key
    safe = jnp.where(jnp.isfinite(merged), merged, 0.0)
    weight = lambda x: jnp.swapaxes(jnp.exp(x - safe), 1, 2)[..., None]  # noqa: E731  [B, Tc, N, 1]
    return o * weight(lse) + o_block.astype(jnp.float32) * weight(lse_block), merged

  branches = [lambda o, lse, *_: (o, lse)] + [functools.partial(attend, kind) for kind in ring.flash.kinds]

  def pair(p, carry):
    (o, lse), block = carry
    a, b = p // c, p % c
    k, v, kv_pos, kv_seg = (x[b] for x in block)
    o_a, lse_a = jax.lax.switch(_branch(ring, q_pos[a], kv_pos, q_seg[a], kv_seg), branches, o[a], lse[a], qs[a], k,
                                v, q_seg[a], kv_seg)
    return (o.at[a].set(o_a), lse.at[a].set(lse_a)), block

  def step(_, carry):
    stats, block = carry
    stats, _ = jax.lax.fori_loop(0, c * c, pair, (stats, block))
    return stats, _pass_on(ring, block)

  block = tuple(_stack(x, c) for x in (k, v, positions, kv_segment_ids))
  (o, lse), _ = jax.lax.fori_loop(0, ring.size, step, (init, block))
  out = jnp.moveaxis(o, 0, 1).reshape(q.shape)  # [c, B, Tc, N, H] -> [B, Tl, N, H]
  lse = jnp.moveaxis(lse, 0, 2).reshape(batch, num_heads, q_len)  # [B, N, Tl]
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # a row that saw no key: exp(s - inf) = 0 backward
  return out.astype(q.dtype), lse.reshape(batch, k.shape[2], -1, q_len)  # lse as _specs' [B, K, G, Tl]


def _flash_backward_shard(ring, q, k, v, positions, q_segment_ids, kv_segment_ids, window, slopes, out, lse, dout):
  from pallas_kernels import flash_attention_block_backward  # noqa: PLC0415 (optional backend)

  del window, slopes
  batch, q_len, num_heads, _ = q.shape
  c = ring.chunks
  qs, outs, dos, q_pos, q_seg = (_stack(x, c) for x in (q, out, dout, positions, q_segment_ids))
  lses = jnp.moveaxis(lse.reshape(batch, num_heads, c, q_len // c), 2, 0)  # [c, B, N, Tc]

  def grads(kind, dq, dk, dv, q, o, lse, do, k, v, q_seg, kv_seg):
    g = flash_attention_block_backward(q, k, v, o, lse, do, **_kernel_args(ring, kind, q_seg, kv_seg))
    return tuple(acc + x.astype(jnp.float32) for acc, x in zip((dq, dk, dv), g))

  branches = [lambda dq, dk, dv, *_: (dq, dk, dv)] + [functools.partial(grads, kind) for kind in ring.flash.kinds]

  def pair(p, carry):
    dq, (k, v, kv_pos, kv_seg, dk, dv) = carry
    a, b = p // c, p % c
    dq_a, dk_b, dv_b = jax.lax.switch(
        _branch(ring, q_pos[a], kv_pos[b], q_seg[a], kv_seg[b]), branches, dq[a], dk[b], dv[b], qs[a], outs[a],
        lses[a], dos[a], k[b], v[b], q_seg[a], kv_seg[b])
    return dq.at[a].set(dq_a), (k, v, kv_pos, kv_seg, dk.at[b].set(dk_b), dv.at[b].set(dv_b))

  def step(_, carry):
    # dk and dv accumulate in float32 and travel with their block, home after the P-th pass.
    dq, block = jax.lax.fori_loop(0, c * c, pair, carry)
    return dq, _pass_on(ring, block)

  ks = _stack(k, c)
  block = (ks, _stack(v, c), _stack(positions, c), _stack(kv_segment_ids, c), jnp.zeros(ks.shape, jnp.float32),
           jnp.zeros(ks.shape, jnp.float32))
  dq, block = jax.lax.fori_loop(0, ring.size, step, (jnp.zeros(qs.shape, jnp.float32), block))
  unstack = lambda x, like: jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)  # noqa: E731
  return unstack(dq, q), unstack(block[4], k), unstack(block[5], v)
