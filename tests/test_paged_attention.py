"""Paged attention: the Pallas kernel (on CPU in TPU interpret mode, its default there) against
paged_attention_reference on ragged steps; the reference against dense attention in float64; and
the kernel compiled for a TPU by libtpu on this CPU (Mosaic's whole pipeline, no chip)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention, paged_attention_reference, reference_attention

BLOCK_SIZE, NUM_BLOCKS, HEADS, KV_HEADS, HEAD_DIM = 8, 24, 4, 2, 16  # GQA: G = 2
TABLE_WIDTH = 4  # M: up to 32 positions a sequence
# Per sequence (row of the block table): (kv length after the step, its tokens in the step).
# Row 0 spans four blocks, row 1 is shorter than one, row 2 brings a chunk of 7 (positions 14-20,
# mid-sequence, across a block boundary), row 3 has no token in this step.
RAGGED = [(30, 1), (5, 1), (21, 7), (12, 0), (9, 1)]
DECODE = [(30, 1), (5, 1), (21, 1), (12, 0), (9, 1)]
# Jitted: op-by-op dispatch would compile every op. The window may be traced (the reference takes both).
_paged_reference = jax.jit(paged_attention_reference, static_argnames="logit_softcap")


def _step(sequences, padding, seed=0):
  """(q [T, N, H], k_pages, v_pages [P, bs, K, H], block_tables [B, M], seq_ids [T], positions [T]):
  each sequence's tokens are its last ones, in row order, then `padding` padding tokens (position
  -1, seq_id 0). Blocks are handed out shuffled; a row's entries past its length name any blocks,
  other rows' too, which no token may see."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(NUM_BLOCKS)
  tables = rng.permutation(np.resize(order, (len(sequences), TABLE_WIDTH)).ravel()).reshape(-1, TABLE_WIDTH)
  used = 0
  for row, (length, _) in enumerate(sequences):
    blocks = -(-length // BLOCK_SIZE)
    tables[row, :blocks] = order[used:used + blocks]
    used += blocks
  seq_ids = [row for row, (_, count) in enumerate(sequences) for _ in range(count)] + [0] * padding
  positions = [p for length, count in sequences for p in range(length - count, length)] + [-1] * padding
  q = rng.standard_normal((len(seq_ids), HEADS, HEAD_DIM))
  pages = rng.standard_normal((2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM))
  return (*(jnp.asarray(x, jnp.float32) for x in (q, pages[0], pages[1])),
          *(jnp.asarray(x, jnp.int32) for x in (tables, seq_ids, positions)))


@pytest.mark.parametrize("sequences,kwargs", [
    (RAGGED, dict(max_q_len=7, block_q=4, pages_per_step=2)),  # the chunk in two tiles; two pages a step
    (RAGGED, dict(max_q_len=7, sliding_window=6, logit_softcap=3.0)),  # default tiles
    (DECODE, dict(max_q_len=1, sliding_window=jnp.int32(20))),  # one tile a sequence; a traced window
], ids=["chunked_gqa", "chunked_window_softcap", "decode_traced_window"])
def test_kernel_matches_reference(sequences, kwargs):
  args = _step(sequences, padding=3)
  out = paged_attention(*args, **kwargs)
  expected = _paged_reference(
      *args, **{name: kwargs[name] for name in ("sliding_window", "logit_softcap") if name in kwargs})
  assert out.shape == args[0].shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)
  np.testing.assert_array_equal(out[-3:], 0.0)  # padding


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 3.0)])
def test_reference_matches_dense_attention_in_float64(window, softcap):
  """Each sequence's keys gathered from its blocks into a dense [1, S, K, H] row (S its kv length,
  its tokens the last of S), against reference_attention in float64."""
  with jax.enable_x64(True):
    q, k_pages, v_pages, tables, seq_ids, positions = _step(RAGGED, padding=2, seed=1)
    q, k_pages, v_pages = (x.astype(jnp.float64) for x in (q, k_pages, v_pages))
    paged, dense = _paged_and_dense(q, k_pages, v_pages, tables, seq_ids, positions, window=window, softcap=softcap)
    assert paged.dtype == jnp.float64
    np.testing.assert_allclose(paged[:len(dense)], dense, atol=1e-12)
    np.testing.assert_array_equal(paged[len(dense):], 0.0)  # padding


@functools.partial(jax.jit, static_argnames=("window", "softcap"))
def _paged_and_dense(q, k_pages, v_pages, tables, seq_ids, positions, *, window, softcap):
  """(the paged reference [T, N, H], reference_attention on each sequence's dense row [T_real, N, H]),
  one program: one compile."""
  paged = paged_attention_reference(q, k_pages, v_pages, tables, seq_ids, positions, sliding_window=window,
                                    logit_softcap=softcap)
  rows, start = [], 0
  for row, (length, count) in enumerate(RAGGED):
    def dense(pages, row=row, length=length):
      return pages[tables[row]].reshape(1, -1, KV_HEADS, HEAD_DIM)[:, :length]  # [1, S, K, H]

    rows.append(reference_attention(q[None, start:start + count], dense(k_pages), dense(v_pages),
                                    sliding_window=window or None, logit_softcap=softcap or None)[0])
    start += count
  return paged, jnp.concatenate(rows)


@functools.cache
def _tpu_device():
  """One chip of a v5e topology described by libtpu on this host (no TPU attached). libtpu takes a
  lock file that lets one process load it at a time, for the chips' sake; compiling touches no
  chip, so this process does not wait for (or block) another one compiling for TPU."""
  from jax.experimental import topologies  # noqa: PLC0415 (loads libtpu: only where a test needs it)

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
  except Exception as error:  # the test dependency is missing or broken: say which
    raise RuntimeError(f"compiling for TPU needs libtpu (`pip install libtpu`, a test dependency): {error}") from error


@pytest.mark.parametrize("tokens,max_q_len,kwargs", [
    (16, 1, {}),  # decode: 16 sequences of one token
    (256, 128, dict(sliding_window=100, logit_softcap=30.0)),  # chunked prefill
], ids=["decode", "chunked_window_softcap"])
def test_compiles_for_tpu(tokens, max_q_len, kwargs):
  """Mosaic compiles the kernel at serving sizes: bfloat16, head dim 128, blocks of 16, K = 8, N = 32."""
  sharding = jax.sharding.SingleDeviceSharding(_tpu_device())

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  pages = spec((512, 16, 8, 128), jnp.bfloat16)
  run = jax.jit(functools.partial(paged_attention, interpret=False, max_q_len=max_q_len, **kwargs))
  compiled = run.lower(spec((tokens, 32, 128), jnp.bfloat16), pages, pages, spec((16, 64), jnp.int32),
                       spec((tokens,), jnp.int32), spec((tokens,), jnp.int32)).compile()
  assert "tpu_custom_call" in compiled.as_text()


def test_bad_arguments_name_the_values():
  q, k_pages, v_pages, tables, seq_ids, positions = _step(DECODE, padding=1)
  with pytest.raises(ValueError, match="heads=3"):
    paged_attention(q[:, :3], k_pages, v_pages, tables, seq_ids, positions)
  with pytest.raises(ValueError, match="ALiBi"):
    paged_attention(q, k_pages, v_pages, tables, seq_ids, positions, alibi_slopes=jnp.ones(HEADS))
  with pytest.raises(ValueError, match="seq_ids must be integers"):
    paged_attention(q, k_pages, v_pages, tables, seq_ids.astype(jnp.float32), positions)
  with pytest.raises(ValueError, match="k_pages and v_pages"):
    paged_attention(q, k_pages, v_pages[..., :8], tables, seq_ids, positions)
  with pytest.raises(ValueError, match="max_q_len=9"):
    paged_attention(q, k_pages, v_pages, tables, seq_ids, positions, max_q_len=9)
