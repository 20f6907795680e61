"""Paged attention in Pallas for TPU: the serving engine's flattened step read from its block pool.

Computes exactly what `paged_attention_reference` (paged_reference.py) states: token t of the step
(sequence seq_ids[t], at positions[t]) attends that sequence's keys at positions j <= p (and
p - w < j with a window w), read from the blocks block_tables[b] of a pool [P, block_size, K, H];
padding tokens (position < 0) get zeros.

What the caller guarantees (infer/engine.py builds its steps this way), and the kernel relies on:
the tokens of each sequence are contiguous in the step and at consecutive, increasing positions;
sequences appear in increasing row order of block_tables; padding tokens come after all real
ones; a sequence may have no token in the step; no sequence has more than `max_q_len` tokens (a
static bound: a step that breaks it gets wrong rows for the excess tokens).

Layout. The wrapper derives each sequence's query start, count and first position (jnp, on
[T] and [B] arrays), cuts each sequence's tokens into query tiles of block_q tokens and packs the
tiles of all sequences one after another: at most min(T / block_q + B, B * ceil(max_q_len /
block_q)) tiles, so a decode step has one tile per sequence and a chunked step pads only each
sequence's last tile, not every sequence to max_q_len. A tile's queries are laid out per kv head,
[K, block_q * G, H] (row = token * G + query head in the group), so each kv head is one
[rows, H] x [H, keys] matmul. The grid is (tile, kv step), both dynamic (Mosaic takes grid sizes
computed on device): the number of real tiles and the most kv steps any of them needs, so a step
padded to a large T or a table sized for long sequences costs no empty grid steps. A kv step reads
`pages_per_step` consecutive pages of the tile's sequence, each a [block_size, K, H] page (K sits
before H in the pool, so a page is one contiguous DMA serving every head) given by its own
BlockSpec whose index map reads the block table (scalar prefetch, in SMEM): only the sequence's own
pages are DMA'd, starting at the first page the window lets the tile see and stopping at the page
of its last query. Steps past a tile's last page are skipped (`pl.when`) and their index maps
repeat the last page, so they fetch nothing. The online softmax (m, l and the output accumulator
per kv head) lives in VMEM scratch across the kv steps, as in flash_attention_tpu.py; the output
is written at the tile's last step, then gathered back to [T, N, H] by the wrapper.

Scalar prefetch puts the flattened block table (4 * B * M bytes) and five int32 per tile in SMEM,
which is small: that bounds the B * M a call can take.

Platforms: Mosaic on TPU; on CPU, TPU interpret mode (`pltpu.InterpretParams`, Mosaic semantics
simulated, out-of-bounds block indices raise); both lower from any host (tests/test_paged_attention.py
compiles the kernel for a v5e with libtpu on CPU). GPU is not supported: the model uses the reference
there. ALiBi is not supported either (the model falls back to the reference for it).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as jax_config  # the TPU interpret-mode flag has no public reader
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_vmem
from pallas_kernels.flash_geometry import MASKED, block_spec

# Defaults, untimed (no TPU has been lent): query tiles of ~128 rows (tokens x G, the MXU's width)
# and ~128 key positions per kv grid step (pages_per_step * block_size).
DEFAULT_Q_ROWS = 128
DEFAULT_KV_POSITIONS = 128


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """The static shape of the schedule, fixed when paged_attention traces."""

  block_q: int  # tokens per query tile
  pages_per_step: int  # pages per kv grid step
  max_tiles: int  # U: the most query tiles a step can have

  @classmethod
  def choose(cls, *, tokens, num_seqs, table_width, block_size, group, static_window, max_q_len, block_q,
             pages_per_step):
    """static_window: the window where it is a Python int (0: none), None where it is traced."""
    block_q = block_q or min(max_q_len, max(1, DEFAULT_Q_ROWS // group))
    # The most pages one tile can see: block_q - 1 + window positions, unaligned; or the table's.
    seen = min(table_width, (block_q + static_window - 2) // block_size + 2) if static_window else table_width
    pages_per_step = min(pages_per_step or max(1, DEFAULT_KV_POSITIONS // block_size), seen)
    # Only each sequence's last tile is partial: sum_b ceil(c_b / bq) <= (T + min(B, T) (bq - 1)) / bq.
    max_tiles = min(num_seqs * -(-max_q_len // block_q), (tokens + min(num_seqs, tokens) * (block_q - 1)) // block_q)
    return cls(block_q, pages_per_step, max_tiles)


class _Schedule(NamedTuple):
  """The step cut into query tiles, int32; the first six go to SMEM (scalar prefetch)."""

  tile_base: jax.Array  # [U]: the flattened table's index of the tile's first visible page
  tile_first_page: jax.Array  # [U]: that page's index within its sequence
  tile_pages: jax.Array  # [U]: how many pages the tile sees (0: no tile)
  tile_position: jax.Array  # [U]: the position of the tile's first query
  tile_tokens: jax.Array  # [U]: how many of its block_q rows are tokens (0: no tile)
  window: jax.Array  # [1]: the sliding window (0: none)
  token_index: jax.Array  # [U, block_q]: the step token of each tile row (0 for rows of no token)
  out_row: jax.Array  # [T]: each token's row in the tiles' output flattened to [U * block_q]
  num_tiles: jax.Array  # []: the real tiles (at least 1, the grid's first dimension)
  num_steps: jax.Array  # []: the most kv steps any tile needs (at least 1, the second)


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def _sequences(seq_ids, positions, num_seqs):
  """Per sequence (the guarantees make these exact): (count, first token, first position) [B] each;
  the first position is meaningless where the count is 0."""
  real = positions >= 0
  counts = jnp.zeros(num_seqs, jnp.int32).at[jnp.where(real, seq_ids, num_seqs)].add(1, mode="drop")
  starts = jnp.cumsum(counts, dtype=jnp.int32) - counts
  return counts, starts, positions[jnp.clip(starts, 0, positions.shape[0] - 1)]


def _schedule(seq_ids, positions, window, tiling: _Tiling, *, num_seqs, table_width, block_size,
              windowed) -> _Schedule:
  """The query tiles: sequence b's tiles are first_tile[b] ... first_tile[b] + tiles[b] - 1, tile u
  the (u - first_tile[b])-th of them; tiles from the real ones' count on are empty."""
  bq = tiling.block_q
  seq_ids = jnp.clip(seq_ids, 0, num_seqs - 1)
  counts, starts, first_positions = _sequences(seq_ids, positions, num_seqs)
  tiles = (counts + bq - 1) // bq  # [B]
  first_tile = jnp.cumsum(tiles, dtype=jnp.int32) - tiles  # [B]
  num_tiles = jnp.sum(tiles)
  u = jnp.arange(tiling.max_tiles, dtype=jnp.int32)
  b = jnp.clip(_i32(jnp.searchsorted(first_tile + tiles, u, side="right")), 0, num_seqs - 1)  # [U]
  local = u - first_tile[b]  # [U]: the tile's index within its sequence
  rows = jnp.where(u < num_tiles, jnp.clip(counts[b] - local * bq, 0, bq), 0)  # [U]
  first = first_positions[b] + local * bq  # [U]
  lowest = jnp.where(window > 0, jnp.maximum(first - window + 1, 0), 0) if windowed else jnp.zeros_like(first)
  first_page = lowest // block_size
  pages = jnp.where(rows > 0, (first + rows - 1) // block_size + 1 - first_page, 0)  # [U]
  t = jnp.arange(bq, dtype=jnp.int32)[None, :]
  token_index = jnp.where(t < rows[:, None], starts[b][:, None] + local[:, None] * bq + t, 0)  # [U, bq]
  within = jnp.arange(positions.shape[0], dtype=jnp.int32) - starts[seq_ids]  # [T]: index in its sequence
  out_row = jnp.where(positions >= 0, (first_tile[seq_ids] + within // bq) * bq + within % bq, 0)
  steps = (pages + tiling.pages_per_step - 1) // tiling.pages_per_step
  return _Schedule(
      tile_base=b * table_width + first_page, tile_first_page=first_page, tile_pages=pages, tile_position=first,
      tile_tokens=rows, window=window.reshape(1), token_index=token_index, out_row=out_row,
      num_tiles=jnp.maximum(num_tiles, 1), num_steps=jnp.maximum(jnp.max(steps), 1),
  )


def _page_offset(u, j, c, pages_ref, *, pages_per_step):
  """Which of tile u's visible pages copy c reads at kv step j: page j * pps + c while that is
  visible, else the last visible page this copy read (a repeated block index: no DMA)."""
  pages = pages_ref[u]
  own_last = jax.lax.div(jnp.maximum(pages - 1 - c, 0), jnp.int32(pages_per_step))  # its last step
  return jnp.where(c <= pages - 1, jnp.minimum(j, own_last) * pages_per_step + c, jnp.maximum(pages - 1, 0))


def _page_spec(c, *, block_size, kv_heads, head_dim, pages_per_step, num_blocks, table_size):
  """Copy c of the step's pages: [block_size, K, H], its block index read from the block table.
  Both indices are clipped into their arrays, so that a table entry the step never needs, or a
  position past the table (the caller's error), cannot make a DMA or an SMEM read out of bounds."""

  def index_map(u, j, tables_ref, base_ref, first_page_ref, pages_ref, *_):
    del first_page_ref
    offset = _page_offset(u, j, jnp.int32(c), pages_ref, pages_per_step=pages_per_step)
    entry = jnp.minimum(base_ref[u] + offset, table_size - 1)
    return jnp.clip(tables_ref[entry], 0, num_blocks - 1), 0, 0, 0

  return block_spec((None, block_size, kv_heads, head_dim), index_map)


def _kernel(tables_ref, base_ref, first_page_ref, pages_ref, position_ref, tokens_ref, window_ref, q_ref, *refs,
            pages_per_step, group, scale, windowed, softcap):
  """One (tile, kv step): q_ref [K, R, H], pps k and then pps v pages [bs, K, H], o_ref [K, R, H];
  scratch m, l [K, R, 1] and acc [K, R, H] in float32."""
  del tables_ref, base_ref
  k_refs, v_refs = refs[:pages_per_step], refs[pages_per_step:2 * pages_per_step]
  o_ref, m_scr, l_scr, acc_scr = refs[2 * pages_per_step:]
  u, j = pl.program_id(0), pl.program_id(1)
  pages = pages_ref[u]
  last_step = jnp.maximum(jax.lax.div(pages + pages_per_step - 1, jnp.int32(pages_per_step)), 1) - 1

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(j * pages_per_step < pages)
  def _step():
    block_size = k_refs[0].shape[0]
    first_key = (first_page_ref[u] + j * pages_per_step) * block_size  # the step's keys: first_key + column
    visible = _step_mask(first_key - position_ref[u], tokens_ref[u], window_ref[0],
                         (q_ref.shape[1], block_size * pages_per_step), group=group, windowed=windowed)
    for h in range(q_ref.shape[0]):  # static: each kv head against its G query heads
      _attend(q_ref[h], _head(k_refs, h), _head(v_refs, h), visible, m_scr.at[h], l_scr.at[h], acc_scr.at[h],
              scale=scale, softcap=softcap)

  @pl.when(j == last_step)
  def _finish():
    l = l_scr[...]
    seen = l > 0  # rows of no token see nothing: 0
    o_ref[...] = jnp.where(seen, acc_scr[...] / jnp.where(seen, l, np.float32(1)), np.float32(0)).astype(o_ref.dtype)


def _attend(q, k, v, visible, m_ref, l_ref, acc_ref, *, scale, softcap):
  """One online-softmax step (Milakov & Gimelshein 2018) of q [R, H] over k, v [C, H] where
  visible [R, C]; m, l [R, 1] and acc [R, H] float32 refs carry the state across steps."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * np.float32(scale)
  if softcap:
    s = np.float32(softcap) * jnp.tanh(s / np.float32(softcap))
  s = jnp.where(visible, s, MASKED)  # [R, C]
  m = m_ref[...]
  m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
  p = jnp.where(visible, jnp.exp(s - m_new), np.float32(0))  # a row that sees nothing adds nothing
  alpha = jnp.exp(m - m_new)
  l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
  acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  m_ref[...] = m_new


def _head(page_refs, h):
  """[pps * bs, H]: kv head h of the step's pages, in position order (they are consecutive)."""
  heads = [ref[:, h, :] for ref in page_refs]
  return heads[0] if len(heads) == 1 else jnp.concatenate(heads, axis=0)


def _step_mask(offset, tokens, window, shape, *, group, windowed):
  """[R, C] bool: whether row r (token r // G of the tile, at the tile's first position + r // G)
  sees column c (the key at that position + offset + c). With d = offset + c, integer: causal
  d <= r // G iff d * G <= r; the window r // G - w < d iff r < (d + w) * G; and the row must be a
  token's (r < tokens * G). No division, which Mosaic would have to lower per TPU generation.
  windowed: whether the window (0: none) can be > 0. Columns past the tile's last page (repeated
  pages) lie after its last query, so causality hides them."""
  r = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  d = offset + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  visible = (d * group <= r) & (r < tokens * group)
  if windowed:
    visible &= (window == 0) | (r < (d + window) * group)
  return visible


def _call_kernel(tables, sched, q_tiles, k_pages, v_pages, *, pages_per_step, group, scale, windowed, softcap,
                 interpret):
  """q_tiles [U, K, R, H] -> [U, K, R, H] (tiles from num_tiles on are left unwritten)."""
  _, kv_heads, rows, head_dim = q_tiles.shape
  num_blocks, block_size = k_pages.shape[:2]
  page = functools.partial(_page_spec, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim,
                           pages_per_step=pages_per_step, num_blocks=num_blocks, table_size=tables.shape[0])
  tile = block_spec((None, kv_heads, rows, head_dim), lambda u, j, *_: (u, 0, 0, 0))
  kernel = functools.partial(_kernel, pages_per_step=pages_per_step, group=group, scale=scale, windowed=windowed,
                             softcap=softcap)
  prefetch = (tables, sched.tile_base, sched.tile_first_page, sched.tile_pages, sched.tile_position,
              sched.tile_tokens, sched.window)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(sched.num_tiles, sched.num_steps),
          in_specs=[tile, *[page(c) for c in range(pages_per_step)], *[page(c) for c in range(pages_per_step)]],
          out_specs=tile,
          scratch_shapes=[pltpu.VMEM((kv_heads, rows, 1), jnp.float32), pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                          pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q_tiles.shape, q_tiles.dtype),
      # Tiles are independent ("parallel": split between a megacore's two cores). TPU interpret mode
      # shuffles a parallel dimension, which needs its size at trace time: there it is "arbitrary".
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary" if interpret or _tpu_interpret_forced() else "parallel", "arbitrary")),
      interpret=interpret,
      name="paged_attention_tpu",
  )(*prefetch, q_tiles, *[k_pages] * pages_per_step, *[v_pages] * pages_per_step)


def _tpu_interpret_forced() -> bool:
  """Inside `pltpu.force_tpu_interpret_mode()`, where every pallas_call runs in TPU interpret mode."""
  flag = getattr(jax_config, "pallas_tpu_interpret_mode_context_manager", None)
  return flag is not None and bool(flag.value)


def _validate(q, k_pages, v_pages, block_tables, seq_ids, positions, *, alibi_slopes, max_q_len, block_q,
              pages_per_step, sliding_window, logit_softcap):
  if alibi_slopes is not None:
    raise ValueError("paged_attention does not support ALiBi: use paged_attention_reference for alibi_slopes")
  if q.ndim != 3:
    raise ValueError(f"q must be [T, N, H]; got {q.shape=}")
  tokens, heads, head_dim = q.shape
  if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[3] != head_dim:
    raise ValueError(f"k_pages and v_pages must be [P, block_size, K, H] with q's H; got {q.shape=}, "
                     f"{k_pages.shape=}, {v_pages.shape=}")
  if heads % k_pages.shape[2]:
    raise ValueError(f"query heads {heads=} must be a multiple of kv heads K={k_pages.shape[2]}")
  if block_tables.ndim != 2:
    raise ValueError(f"block_tables must be [B, M]; got {block_tables.shape=}")
  if seq_ids.shape != (tokens,) or positions.shape != (tokens,):
    raise ValueError(f"seq_ids and positions must be [T] with T={tokens}; got {seq_ids.shape=}, {positions.shape=}")
  for name, x in (("block_tables", block_tables), ("seq_ids", seq_ids), ("positions", positions)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers (int32); got {name}.dtype={x.dtype}")
  if max_q_len is not None and not 1 <= max_q_len <= tokens:
    raise ValueError(f"max_q_len={max_q_len} must be in [1, T={tokens}]")
  for name, value in (("block_q", block_q), ("pages_per_step", pages_per_step)):
    if value is not None and value < 1:
      raise ValueError(f"{name}={value} must be positive")
  if sliding_window is None or isinstance(sliding_window, (int, np.integer)):
    if (sliding_window or 0) < 0:
      raise ValueError(f"sliding_window={sliding_window} must be >= 0 (0: none)")
  elif jnp.shape(sliding_window) != () or not jnp.issubdtype(jnp.result_type(sliding_window), jnp.integer):
    raise ValueError(f"sliding_window must be an int or an integer scalar array; got {sliding_window!r}")
  if (logit_softcap or 0.0) < 0:
    raise ValueError(f"logit_softcap={logit_softcap} must be >= 0 (0: none)")


def _to_tiles(q, sched: _Schedule, tiling: _Tiling, kv_heads):
  """[T, N, H] -> [U, K, R, H], R = block_q * G rows, row = token * G + query head in the group."""
  _, heads, head_dim = q.shape
  group = heads // kv_heads
  tiles = q[sched.token_index].reshape(tiling.max_tiles, tiling.block_q, kv_heads, group, head_dim)
  return tiles.transpose(0, 2, 1, 3, 4).reshape(tiling.max_tiles, kv_heads, tiling.block_q * group, head_dim)


def _from_tiles(out, sched: _Schedule, tiling: _Tiling, positions):
  """[U, K, R, H] -> [T, N, H], padding tokens 0 (tiles past the real ones are never read)."""
  kv_heads, head_dim = out.shape[1], out.shape[3]
  group = out.shape[2] // tiling.block_q
  out = out.reshape(tiling.max_tiles, kv_heads, tiling.block_q, group, head_dim).transpose(0, 2, 1, 3, 4)
  out = out.reshape(tiling.max_tiles * tiling.block_q, kv_heads * group, head_dim)[sched.out_row]
  return jnp.where((positions >= 0)[:, None, None], out, jnp.zeros((), out.dtype))


def paged_attention(
    q: jax.Array,  # [T, N, H]: the step's tokens, flattened across sequences
    k_pages: jax.Array,  # [P, block_size, K, H]: one layer's pool of blocks
    v_pages: jax.Array,  # [P, block_size, K, H]
    block_tables: jax.Array,  # [B, M] int32: each sequence's blocks, in order
    seq_ids: jax.Array,  # [T] int32: the row of block_tables each token belongs to
    positions: jax.Array,  # [T] int32: each token's position in its sequence; < 0 for padding
    *,
    scale: float | None = None,
    sliding_window: int | jax.Array = 0,
    logit_softcap: float = 0.0,
    alibi_slopes=None,  # not supported: must be None
    max_q_len: int | None = None,
    block_q: int | None = None,
    pages_per_step: int | None = None,
    interpret: "bool | pltpu.InterpretParams | None" = None,
) -> jax.Array:
  """[T, N, H] in q's dtype, equal to `paged_attention_reference` under the module's guarantees.

  sliding_window: an int, or an int32 scalar array (a window traced per layer, as in a scan over
  layers with local and global ones; 0: none); an int also bounds the pages a kv step reads.
  max_q_len: the most tokens any one sequence has in the step (static; default T): 1 for a decode
  step. block_q: tokens per query tile (default max_q_len, at most DEFAULT_Q_ROWS // G).
  pages_per_step: pages per kv grid step (default DEFAULT_KV_POSITIONS // block_size, at least 1,
  at most the pages that the table or an int window lets one tile see).
  interpret: None picks per platform when the computation is lowered (`jax.lax.platform_dependent`,
  as flash_attention does): Mosaic on TPU, TPU interpret mode on CPU, nothing elsewhere (a GPU
  default backend raises: use the reference). False: Mosaic. True or a `pltpu.InterpretParams`:
  TPU interpret mode."""
  _validate(q, k_pages, v_pages, block_tables, seq_ids, positions, alibi_slopes=alibi_slopes, max_q_len=max_q_len,
            block_q=block_q, pages_per_step=pages_per_step, sliding_window=sliding_window, logit_softcap=logit_softcap)
  if interpret is None and jax.default_backend() not in ("cpu", "tpu"):
    raise ValueError(f"paged_attention runs on TPU (interpreted on CPU), not {jax.default_backend()}: "
                     "use paged_attention_reference there")
  sliding_window = 0 if sliding_window is None else sliding_window
  static_window = int(sliding_window) if isinstance(sliding_window, (int, np.integer)) else None
  return _paged_attention(
      q, k_pages, v_pages, block_tables, seq_ids, positions, _i32(sliding_window), static_window=static_window,
      scale=float(q.shape[-1]**-0.5 if scale is None else scale), softcap=float(logit_softcap or 0.0),
      max_q_len=max_q_len or q.shape[0], block_q=block_q, pages_per_step=pages_per_step,
      interpret=pltpu.InterpretParams() if interpret is True else interpret)


@functools.partial(jax.jit, static_argnames=("static_window", "scale", "softcap", "max_q_len", "block_q",
                                             "pages_per_step", "interpret"))
def _paged_attention(q, k_pages, v_pages, block_tables, seq_ids, positions, window, *, static_window, scale, softcap,
                     max_q_len, block_q, pages_per_step, interpret):
  """paged_attention past validation; window: [] int32, static_window: it as an int, or None if traced."""
  tokens, heads, _ = q.shape
  num_seqs, table_width = block_tables.shape
  block_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
  tiling = _Tiling.choose(tokens=tokens, num_seqs=num_seqs, table_width=table_width, block_size=block_size,
                          group=heads // kv_heads, static_window=static_window, max_q_len=max_q_len, block_q=block_q,
                          pages_per_step=pages_per_step)
  tpu_vmem.check_paged(block_q=tiling.block_q, group=heads // kv_heads, pages_per_step=tiling.pages_per_step,
                       block_size=block_size, kv_heads=kv_heads, head_dim=q.shape[2], dtype=q.dtype,
                       interpret=interpret)
  sched = _schedule(_i32(seq_ids), _i32(positions), window, tiling, num_seqs=num_seqs, table_width=table_width,
                    block_size=block_size, windowed=static_window != 0)
  run = functools.partial(
      _call_kernel, _i32(block_tables).reshape(-1), sched, _to_tiles(q, sched, tiling, kv_heads), k_pages, v_pages,
      pages_per_step=tiling.pages_per_step, group=heads // kv_heads, scale=scale, windowed=static_window != 0,
      softcap=softcap)
  if interpret is None:
    out = jax.lax.platform_dependent(tpu=functools.partial(run, interpret=False),
                                     cpu=functools.partial(run, interpret=pltpu.InterpretParams()))
  else:
    out = run(interpret=interpret)
  return _from_tiles(out, sched, tiling, positions)
