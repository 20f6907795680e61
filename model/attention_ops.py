"""Attention as a function of q, k, v: the plain-jnp reference (`xla`), cuDNN (`cudnn`) and our
Pallas flash attention (`pallas`) backends, and `attention`, the one call of the decoder's layers
that picks among them, LongLoRA's shifted sparse attention, ring attention and the KV-cache paths.

All backends honour causal masks, sliding windows, segment ids and GQA, and none of them
repeats K/V heads: queries are viewed as [B, T, K, G, H] so each kv head serves its G queries.
"""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from model import kv_cache, ring_attention, sharding, tiled_attention
from model.attention_masks import BTKH, BTNH, MASKED, attention_mask


def default_positions(batch: int, q_len: int, kv_len: int) -> tuple[jax.Array, jax.Array]:
  """Queries are the last T of S positions (bottom-right alignment, as in chunked prefill)."""
  q_positions = jnp.broadcast_to(jnp.arange(q_len) + (kv_len - q_len), (batch, q_len))
  kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
  return q_positions, kv_positions


def xla_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    mask: jax.Array,  # [B, T, S] bool
    scale: float,
    logit_softcap: float = 0.0,
    alibi_bias: jax.Array | None = None,  # [B, N, T, S] float32, added to the logits
    kv_axes: str = "BSKH",  # or "BKSH": k and v as a KVCache holds them
) -> jax.Array:
  """Reference attention in plain jnp; logits and softmax in float32. Returns [B, T, N, H]."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[kv_axes.index("K")]
  group = num_heads // num_kv_heads
  q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits = jnp.einsum(f"BTKGH,{kv_axes}->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  if logit_softcap:
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
  if alibi_bias is not None:
    logits += alibi_bias.reshape(batch, num_kv_heads, group, q_len, -1)
  mask = mask[:, None, None, :, :]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(jnp.where(mask, logits, MASKED), axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # a fully masked row attends to nothing
  # In the dot's own output order, then transposed: XLA:CPU writes a permuted dot output slowly
  # (B=4, T=512, K=4, G=2, H=64: 47 ms into [B, T, K, G, H], 19 ms plus the transpose).
  out = jnp.einsum(f"BKGTS,{kv_axes}->BKGTH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


@functools.cache
def _warn_once(message: str) -> None:
  logging.warning(message)


def cudnn_unsupported_reason(q, *, logit_softcap, alibi, sliding_window, custom_positions) -> str | None:
  if jax.default_backend() != "gpu":
    return f"cuDNN attention needs a GPU, but the default backend is {jax.default_backend()!r}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}"
  if logit_softcap:
    return "cuDNN attention has no logit soft-cap"
  if alibi:
    return "cuDNN attention is not used with ALiBi biases"
  if not isinstance(sliding_window, int):
    return "cuDNN attention needs a static sliding window (scan_layers=False for mixed windows)"
  if custom_positions:
    return "cuDNN attention is used only with default positions (training and prefill)"
  return None


def cudnn_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal, sliding_window, scale):
  """jax.nn.dot_product_attention with the cuDNN implementation; GQA is native there."""
  mask = None
  if q_segment_ids is not None:
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
  window = (sliding_window - 1, 0) if sliding_window else None
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=causal, local_window_size=window, implementation="cudnn"
  )


def pallas_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    q_segment_ids: jax.Array | None = None,  # [B, T]
    kv_segment_ids: jax.Array | None = None,  # [B, S]
    causal: bool = True,
    sliding_window: int = 0,
    logit_softcap: float = 0.0,
    scale: float | None = None,
) -> jax.Array:
  """pallas_kernels.flash_attention, run per shard inside `sharding.axis_rules`.

  A Pallas kernel is one custom call that XLA's partitioner cannot split: on a mesh it would
  gather q, k and v onto every device and compute all of attention there. So under a mesh the
  kernel runs in `jax.shard_map` over the batch and head shards of the activations (their
  logical axes, BTNH/BTKH, mapped by the context's rules). Where the rules shard query heads but
  not kv heads alike (fewer kv heads than the head axis, or other axes), the kv heads are whole on
  every shard and each takes the ones its queries use. A sequence-sharded T or S is gathered
  first: each device then attends its batch and head shard over whole sequences (no ring
  attention).
  """
  try:
    from pallas_kernels import flash_attention  # noqa: PLC0415 (optional backend)
  except ImportError as e:
    raise ValueError("attention_impl='pallas' needs pallas_kernels.flash_attention, which is not available") from e
  call = functools.partial(flash_attention, causal=causal, sliding_window=sliding_window or None,
                           logit_softcap=logit_softcap or None, scale=scale)
  segments = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)

  def attend(q, k, v, *segments):
    return call(q, k, v, segment_ids=tuple(segments) or None)

  context = sharding.current_context()
  if context is None:
    return attend(q, k, v, *segments)
  mesh, rules = context
  batch, _, heads, heads_kv = (sharding.logical_to_spec(BTNH, q.shape, mesh, rules)[:3]
                               + sharding.logical_to_spec(BTKH, k.shape, mesh, rules)[2:3])
  if heads_kv != heads:  # kv heads whole on every shard; each takes the ones its query heads use
    heads_kv = None
  group = q.shape[2] // k.shape[2]
  head_axes = () if heads is None else (heads,) if isinstance(heads, str) else tuple(heads)
  local_heads = q.shape[2] // math.prod(mesh.shape[axis] for axis in head_axes)
  if heads_kv is None and local_heads % group and group % local_heads:
    # A shard's query heads would straddle kv groups unevenly: keep the heads whole instead.
    _warn_once(f"attention_impl='pallas': {q.shape[2]} query heads over {heads!r} straddle groups of "
               f"{group}; the heads are gathered for attention.")
    heads, head_axes, local_heads = None, (), q.shape[2]

  def attend_shard(q, k, v, *segments):
    if head_axes and heads_kv is None:  # query heads split, kv heads whole: this shard's kv heads
      first, count = jax.lax.axis_index(head_axes) * local_heads // group, max(1, local_heads // group)
      k = jax.lax.dynamic_slice_in_dim(k, first, count, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v, first, count, axis=2)
    return attend(q, k, v, *segments)

  q_spec = PartitionSpec(batch, None, heads, None)
  kv_spec = PartitionSpec(batch, None, heads_kv, None)
  segment_specs = (PartitionSpec(batch, None),) * len(segments)
  return jax.shard_map(attend_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *segment_specs),
                       out_specs=q_spec, check_vma=False)(q, k, v, *segments)


def dot_product_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    impl: str = "xla",
    q_segment_ids: jax.Array | None = None,  # [B, T]
    kv_segment_ids: jax.Array | None = None,  # [B, S]
    q_positions: jax.Array | None = None,  # [B, T]; default: the last T of S
    kv_positions: jax.Array | None = None,  # [B, S]; default: 0..S-1
    causal: bool = True,
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    scale: float | None = None,
    alibi_slopes: np.ndarray | None = None,  # [N]
) -> jax.Array:
  """Attention through the backend `impl` ('xla', 'cudnn', 'pallas'). Returns [B, T, N, H].

  'xla' computes causal self-attention (T = S >= 256, default positions, T not sharded over
  `sequence`) without the blocks above the diagonal: in query blocks, or when the program is
  compiled for a CPU, there is no ALiBi or soft-cap and q and kv share one segment-id array, in
  cache-sized tiles (model/tiled_attention.py). Both branches are traced, and the tiles are a
  custom_vjp, so forward-mode autodiff (jax.jvp, jacfwd) does not go through this path."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads {num_heads} are not a multiple of kv heads {num_kv_heads}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  scale = head_dim**-0.5 if scale is None else scale
  custom_positions = q_positions is not None or kv_positions is not None

  if impl == "cudnn":
    reason = cudnn_unsupported_reason(
        q, logit_softcap=logit_softcap, alibi=alibi_slopes is not None, sliding_window=sliding_window,
        custom_positions=custom_positions,
    )
    if reason is None and causal and q_len != kv_len:
      reason = "cuDNN causal attention is used only when T == S"
    if reason is None:
      return cudnn_attention(
          q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
          sliding_window=sliding_window, scale=scale,
      )
    _warn_once(f"attention_impl='cudnn' falls back to 'xla': {reason}.")
  elif impl == "pallas":
    if custom_positions or alibi_slopes is not None or not isinstance(sliding_window, int):
      _warn_once("attention_impl='pallas' falls back to 'xla' for custom positions, ALiBi or traced windows.")
    else:
      return pallas_attention(
          q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
          sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale,
      )
  elif impl != "xla":
    raise ValueError(f"attention impl {impl!r} is not one of ('xla', 'cudnn', 'pallas')")

  if q_positions is None or kv_positions is None:
    default_q, default_kv = default_positions(batch, q_len, kv_len)
    q_positions = default_q if q_positions is None else q_positions
    kv_positions = default_kv if kv_positions is None else kv_positions
  attend = functools.partial(_masked_xla_attention, causal=causal, sliding_window=sliding_window, scale=scale,
                             logit_softcap=logit_softcap, alibi_slopes=alibi_slopes)
  # With the query length sharded (sequence parallelism), slicing it into blocks would move shards between devices.
  if not (causal and not custom_positions and q_len == kv_len and q_len >= 2 * _MIN_CAUSAL_BLOCK) or length_axes(q):
    return attend(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  # Causal self-attention by index: query block [a, b) sees keys [lo, b) only (lo > 0 with a static
  # window), so the blocks above the diagonal are never computed: (n + 1) / 2n of the work for n blocks.
  block = max(_MIN_CAUSAL_BLOCK, -(-q_len // _MAX_CAUSAL_BLOCKS))
  static_window = sliding_window if isinstance(sliding_window, int) else 0
  rows = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731

  def causal_blocks(q, k, v):
    outs = []
    for start in range(0, q_len, block):
      end = min(start + block, q_len)
      lo = max(0, start - static_window + 1) if static_window > 0 else 0
      outs.append(attend(
          q[:, start:end], k[:, lo:end], v[:, lo:end], q_positions[:, start:end], kv_positions[:, lo:end],
          rows(q_segment_ids, start, end), rows(kv_segment_ids, lo, end),
      ))
    return jnp.concatenate(outs, axis=1)

  if alibi_slopes is not None or logit_softcap or q_segment_ids is not kv_segment_ids:
    return causal_blocks(q, k, v)

  def tiles(q, k, v):  # model/tiled_attention.py: tiles that stay in a core's cache
    return tiled_attention.causal_attention(q, k, v, q_segment_ids, scale=scale, sliding_window=sliding_window)

  # Tiles where the program is compiled for a CPU, blocks elsewhere (a program compiled on this
  # host for a TPU topology included): only the branch of the platform is lowered.
  return jax.lax.platform_dependent(q, k, v, cpu=tiles, default=causal_blocks)


def shifted_sparse_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    *,
    group: int,
    positions: jax.Array,  # [B, T]
    segment_ids: jax.Array | None = None,  # [B, T]
    impl: str = "xla",
    **kwargs,
) -> jax.Array:
  """LongLoRA's shifted sparse attention, S^2-Attn (Chen et al. 2023), for fine-tuning at long T:
  each token attends causally within its group of `group` positions, and the second half of the
  heads uses groups shifted by group // 2, so that information crosses group boundaries. Returns
  [B, T, N, H].

  The groups are segment ids, so each backend runs it with the block skipping it already has for
  packed segments (the flash kernel's cost is then linear in T), and ring attention runs each half
  when the rules in context shard the sequence. One difference from LongLoRA's
  code, which rolls the shifted heads' tokens: here the shifted groups do not wrap around the
  row's end, so no token sees a later position (LongLoRA's roll puts the row's last half-group in
  the first group, before its first tokens)."""
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  if num_heads % 2 or (num_kv_heads % 2 and num_kv_heads != 1):
    raise ValueError(f"shifted sparse attention splits the heads in halves: {num_heads} query heads and "
                     f"{num_kv_heads} kv heads must be even (or 1 kv head)")
  alibi_slopes = kwargs.pop("alibi_slopes", None)  # [N]: each half takes its heads' slopes
  rows = jnp.zeros_like(positions) if segment_ids is None else segment_ids
  groups_per_row = q.shape[1] // group + 2  # more than any row's group index, so ids stay distinct
  half, half_kv = num_heads // 2, max(1, num_kv_heads // 2)
  outs = []
  for i, shift in enumerate((0, group // 2)):
    ids = rows * groups_per_row + (positions + shift) // group  # [B, T]: (segment, group)
    kv = slice(i * half_kv, (i + 1) * half_kv) if num_kv_heads > 1 else slice(None)
    heads = slice(i * half, (i + 1) * half)
    slopes = None if alibi_slopes is None else alibi_slopes[heads]
    outs.append(_causal_rows(q[:, :, heads], k[:, :, kv], v[:, :, kv], impl=impl, segment_ids=ids,
                             alibi_slopes=slopes, ring=True, **kwargs))
  return jnp.concatenate(outs, axis=2)


# The xla path's causal blocks: at least this many queries each, and at most this many blocks (compile time).
_MIN_CAUSAL_BLOCK = 128
_MAX_CAUSAL_BLOCKS = 8


def length_axes(q: jax.Array) -> tuple[str, ...]:
  """The mesh axes that the rules in context put on the length T of q [B, T, N, H] (sequence
  parallelism); () outside `sharding.axis_rules` or where T stays whole."""
  context = sharding.current_context()
  if context is None:
    return ()
  spec = sharding.logical_to_spec(BTNH, q.shape, *context)[1]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def cache_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, K, S, H]: one layer of a KVCache, slot s holding position s
    v: jax.Array,  # [B, K, S, H]
    positions: jax.Array,  # [B, T]
    *,
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    scale: float,
    alibi_slopes: np.ndarray | None = None,  # [N]
) -> jax.Array:
  """Causal attention of T tokens over a row's cache slots, in plain jnp (a decode step's [B, T, S]
  logits are small, and the fused backends take no custom positions). Returns [B, T, N, H]."""
  batch, slots = q.shape[0], k.shape[2]
  kv_positions = jnp.broadcast_to(jnp.arange(slots), (batch, slots))
  return _masked_xla_attention(q, k, v, positions, kv_positions, None, None, causal=True,
                               sliding_window=sliding_window, scale=scale, logit_softcap=logit_softcap,
                               alibi_slopes=alibi_slopes, kv_axes="BKSH")


def _masked_xla_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, causal,
                          sliding_window, scale, logit_softcap, alibi_slopes, kv_axes="BSKH"):
  """xla_attention with the mask (and ALiBi's bias) built from positions and segment ids."""
  mask = attention_mask(
      q_positions, kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
      sliding_window=sliding_window,
  )
  alibi_bias = None
  if alibi_slopes is not None:
    distance = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)  # [B, T, S]
    alibi_bias = -jnp.asarray(alibi_slopes, jnp.float32)[None, :, None, None] * distance[:, None]
  return xla_attention(q, k, v, mask=mask, scale=scale, logit_softcap=logit_softcap, alibi_bias=alibi_bias,
                       kv_axes=kv_axes)


def paged_attention(
    q: jax.Array,  # [T, N, H]: a step's tokens, flattened across sequences
    k_pages: jax.Array,  # [P, block_size, K, H]: one layer of a PagedKVCache
    v_pages: jax.Array,  # [P, block_size, K, H]
    block_tables: jax.Array,  # [B, M] int32
    seq_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32; < 0 for padding
    *,
    impl: str = "xla",
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    scale: float | None = None,
    alibi_slopes: np.ndarray | None = None,
    max_q_len: int | None = None,  # the most tokens one sequence has in this step (the kernel's tiling)
) -> jax.Array:
  """Attention of a flattened step's tokens over their sequences' blocks (pallas_kernels/paged_reference.py
  states it). 'pallas' runs our Pallas kernel (compiled on TPU, interpreted on CPU); everything else,
  and the kernel's unsupported cases (ALiBi, a traced window, a mesh), the plain-jnp reference."""
  from pallas_kernels.paged_reference import paged_attention_reference  # noqa: PLC0415

  kwargs = dict(scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
  if impl == "pallas":
    reason = ("ALiBi" if alibi_slopes is not None else "a traced sliding window" if not isinstance(sliding_window, int)
              else "a mesh (the kernel is not yet wrapped in shard_map)" if sharding.current_context() else None)
    if reason is None:
      from pallas_kernels.paged_attention import paged_attention as kernel  # noqa: PLC0415

      return kernel(q, k_pages, v_pages, block_tables, seq_ids, positions, max_q_len=max_q_len, **kwargs)
    _warn_once(f"attention_impl='pallas': paged attention falls back to the jnp reference for {reason}.")
  elif impl not in ("xla", "cudnn"):
    raise ValueError(f"attention impl {impl!r} is not one of ('xla', 'cudnn', 'pallas')")
  return paged_attention_reference(q, k_pages, v_pages, block_tables, seq_ids, positions, alibi_slopes=alibi_slopes,
                                   **kwargs)


def attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, T, K, H]: this chunk's keys
    v: jax.Array,  # [B, T, K, H]
    *,
    positions: jax.Array,  # [B, T]
    segment_ids: jax.Array | None,  # [B, T]
    impl: str,
    scale: float,
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    alibi_slopes: np.ndarray | None = None,  # [N]
    shifted_sparse_group: int = 0,  # LongLoRA's S^2-Attn group; 0 is off
    # (k, v [L, B, K, S, H], layer, None) or, paged, (k, v [L, P, bs, K, H], layer, PageTable)
    cache: tuple | None = None,
    from_start: bool = False,  # with a dense cache: the chunk is positions and slots 0..T-1 of its rows
) -> tuple[jax.Array, tuple | None]:
  """The decoder's causal attention, every path in one call. Returns (out [B, T, N, H], the cache
  with this chunk's keys and values written, or None without one).

  Without a cache: shifted sparse attention when `shifted_sparse_group` is set (fine-tuning only,
  never with a cache; each half of the heads as below); else ring attention when the rules in
  context shard the sequence (its chunk pairs through the flash kernel when `impl` is 'pallas' and
  there is no ALiBi, else in jnp); else `dot_product_attention` through `impl`. With a dense cache
  from the start, the slots past the chunk lie beyond every query: the chunk attends to itself
  alone through `impl`, as in training, and is written at slots 0..T-1. Otherwise the chunk is written at its positions and attends over
  its row's cache (or, paged, its sequence's blocks).
  """
  kwargs = dict(sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale)
  if cache is not None and not from_start:
    return _cached_attention(q, k, v, positions, cache, impl=impl, alibi_slopes=alibi_slopes, **kwargs)
  if cache is None and shifted_sparse_group:
    out = shifted_sparse_attention(q, k, v, group=shifted_sparse_group, positions=positions, segment_ids=segment_ids,
                                   impl=impl, alibi_slopes=alibi_slopes, **kwargs)
  else:
    out = _causal_rows(q, k, v, impl=impl, segment_ids=segment_ids, alibi_slopes=alibi_slopes, ring=cache is None,
                       **kwargs)
  if cache is not None:  # from the start
    all_k, all_v, layer, _ = cache
    cache = (kv_cache.write_from_start(all_k, layer, k), kv_cache.write_from_start(all_v, layer, v), layer, None)
  return out, cache


def _causal_rows(q, k, v, *, impl, segment_ids, alibi_slopes, ring: bool, **kwargs) -> jax.Array:
  """Causal attention within each row [B, T, N, H]: ring attention when `ring` and the rules in
  context shard the sequence, else dot_product_attention through `impl`."""
  if ring and (axis := _ring_axis(q)) is not None:
    block_impl = _ring_block_impl(impl, kwargs.get("sliding_window", 0))
    if block_impl == "pallas" and alibi_slopes is not None:
      _warn_once("ring attention with ALiBi runs its chunk pairs in jnp: the flash kernel takes no ALiBi bias")
      block_impl = "xla"
    return ring_attention.ring_attention(q, k, v, mesh_axis=axis, causal=True, q_segment_ids=segment_ids,
                                         kv_segment_ids=segment_ids, block_impl=block_impl,
                                         alibi_slopes=alibi_slopes, **kwargs)
  return dot_product_attention(q, k, v, impl=impl, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                               alibi_slopes=alibi_slopes, **kwargs)


def _ring_block_impl(impl: str, sliding_window) -> str:
  """The ring's chunk pairs through the flash kernel when impl is 'pallas' (its [T/2P, T/2P] scores
  never stored), else in jnp; the kernel takes static windows only."""
  if impl != "pallas":
    return "xla"
  if not isinstance(sliding_window, int):
    _warn_once("attention_impl='pallas': ring attention runs its blocks in jnp for a traced sliding window.")
    return "xla"
  return "pallas"


def _ring_axis(q: jax.Array) -> str | None:
  """The mesh axis of q's length when ring attention can run over it (one axis, T divisible by twice
  its size for the zig-zag layout); else None, and a warning once where the length is sharded but
  the ring cannot take it: the sequence is then gathered."""
  axes = length_axes(q)
  if not axes:
    return None
  mesh = sharding.current_context()[0]
  size = math.prod(mesh.shape[a] for a in axes)
  if len(axes) != 1 or q.shape[1] % (2 * size):
    _warn_once(f"the sequence is sharded over {axes} ({size} shards) but ring attention needs one axis "
               f"and T={q.shape[1]} divisible by {2 * size}: attention gathers the sequence instead")
    return None
  return axes[0]


def _cached_attention(q, k, v, positions, cache, *, impl, sliding_window, logit_softcap, scale, alibi_slopes):
  """A decode or chunked-prefill step: write the chunk's keys and values into the cache, then attend
  over it. Returns (out [B, T, N, H], the cache)."""
  all_k, all_v, layer, table = cache
  kwargs = dict(sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale, alibi_slopes=alibi_slopes)
  if table is None:  # dense: the chunk sits at slots positions[:, 0] .. positions[:, 0] + T - 1 of its row
    all_k = kv_cache.write(all_k, layer, k, positions[:, 0])
    all_v = kv_cache.write(all_v, layer, v, positions[:, 0])
    return cache_attention(q, all_k[layer], all_v[layer], positions, **kwargs), (all_k, all_v, layer, None)
  # Paged: one flattened row [1, T] of a serving step, each token attending over its own sequence's blocks.
  if q.shape[0] != 1:
    raise ValueError(f"a paged step runs its tokens as one flattened row [1, T], got batch {q.shape[0]}")
  position = positions[0]  # [T]
  all_k = kv_cache.write_paged(all_k, layer, k[0], table, position)
  all_v = kv_cache.write_paged(all_v, layer, v[0], table, position)
  out = paged_attention(q[0], all_k[layer], all_v[layer], table.block_tables, table.seq_ids, position, impl=impl,
                        max_q_len=table.max_q_len, **kwargs)
  return out[None], (all_k, all_v, layer, table)
