"""Flash attention (Dao et al. 2022) in Pallas: tiled online softmax, the T x S matrix never stored.

This module is the public entry point: `flash_attention` validates its arguments, pads the
sequences to the blocks, and runs one of two kernel layouts under a `custom_vjp` (a forward
kernel, a dQ kernel and a dK/dV kernel each):
- flash_attention_gpu.py: one program per query block walking its visible key blocks
  (FlashAttention-2's structure), in Pallas interpret mode on CPU and compiled on GPU;
- flash_attention_tpu.py: key blocks as a grid dimension and the softmax state in VMEM scratch,
  on TPU and in TPU interpret mode (`interpret=pltpu.InterpretParams()` or inside
  `pltpu.force_tpu_interpret_mode()`), since the first would keep a head's whole K/V rows in VMEM.
The choice is made per platform when the computation is lowered (`jax.lax.platform_dependent`),
not from the default backend at trace time, so lowering or exporting for another platform gets
its kernels. What both layouts share (block ranges, masks) is in flash_geometry.py; an
independent plain-jnp `reference_attention` is in reference.py.

`flash_attention_block` and `flash_attention_block_backward` run the same kernels on one block of
a longer sequence, its queries at a given offset from its keys, with no custom_vjp: the forward
returns the block's log-sum-exp beside its output, and the backward takes the whole row's merged
output and log-sum-exp. Ring attention (model/ring_attention.py) composes them.

GPU lowering: Pallas's Triton backend, named by passing `pltriton.CompilerParams`, because since
jax 0.10 a GPU pallas_call without compiler params lowers with Mosaic GPU, which rejects these
kernels (Mosaic GPU cannot lay out their iotas). Triton is chosen because (1) it is present and
working in both jax 0.10.2 (our registry's newest) and 0.11.x (the GPU machines'), deprecated
there but not removed; (2) it compiles the very kernel bodies that the interpret-mode tests check
against the float64 reference, where a Mosaic GPU kernel is a separate program (warpgroup
matmuls, SMEM buffers and barriers written out by hand, Hopper-first) whose only checks without
a GPU would be Mosaic GPU's experimental interpret mode and its lowering, with no compiler here to
read its resources the way benchmarks/triton_resources.py reads Triton's; (3) Triton pipelines the
key loop itself (`num_stages`). The port to Mosaic GPU is due when Triton is removed from Pallas,
or sooner if the benchmark shows Triton far from cuDNN. What has been checked where, and what has
not yet run, is in pallas_kernels/README.md.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # the TPU interpret-mode flag has no public reader
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_attention_gpu, flash_attention_tpu
from pallas_kernels.flash_geometry import FlashStatic


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


def _layout(st: FlashStatic):
  """The module (forward, backward) of the layout st asks for."""
  return flash_attention_tpu if st.kv_grid else flash_attention_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, st):
  return _layout(st).forward(q, k, v, q_seg, kv_seg, st)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, st):
  o, lse = _layout(st).forward(q, k, v, q_seg, kv_seg, st)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(st, residuals, do):
  q, k, v, q_seg, kv_seg, o, lse = residuals
  backward_st = dataclasses.replace(st, block_q=st.block_q_bwd, block_kv=st.block_kv_bwd)
  dq, dk, dv = _layout(st).backward(q, k, v, q_seg, kv_seg, o, lse, do, backward_st)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tpu_interpret_forced() -> bool:
  """Inside `pltpu.force_tpu_interpret_mode()`, where every pallas_call runs in TPU interpret mode."""
  flag = getattr(jax_config, "pallas_tpu_interpret_mode_context_manager", None)
  return flag is not None and bool(flag.value)


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


_STATIC = ("causal", "sliding_window", "logit_softcap", "scale", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
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
  q_seg, kv_seg = _segments(q, k, v, segment_ids)
  q_len, kv_len = q.shape[1], k.shape[1]
  if causal and q_len > kv_len:
    raise ValueError(f"causal attention needs T <= S; got {q_len=} > {kv_len=}")
  run = functools.partial(_attend, **_settings(q, k, segment_ids, causal=causal, offset=kv_len - q_len,
                                               sliding_window=sliding_window, logit_softcap=logit_softcap,
                                               scale=scale, block_sizes=block_sizes))
  return _on_platform(run, (q, k, v, q_seg, kv_seg), interpret)


def _segments(q, k, v, segment_ids):
  """Validated (q_seg [B, T], kv_seg [B, S]) int32 of q [B, T, N, H], k and v [B, S, K, H]."""
  batch, q_len, heads, head_dim = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k and v must be [B, S, K, H] matching q [B, T, N, H]; got {q.shape=}, {k.shape=}, {v.shape=}")
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"query heads {heads=} must be a multiple of kv heads {kv_heads=}")
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
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _on_platform(run, args, interpret):
  """run(*args, mode=..., interpret=...) on the kernels `interpret` asks for (see flash_attention)."""
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


def _settings(q, k, segment_ids, *, causal, offset, sliding_window, logit_softcap, scale, block_sizes):
  """The keyword arguments of _static shared by every call (all but the platform's mode and interpret)."""
  return dict(causal=causal, offset=offset, window=int(sliding_window or 0), softcap=float(logit_softcap or 0.0),
              scale=float(q.shape[3]**-0.5 if scale is None else scale), block_sizes=block_sizes,
              segments=segment_ids is not None, q_len=q.shape[1], kv_len=k.shape[1], head_dim=q.shape[3])


def _static(*, mode, interpret, causal, offset, window, softcap, scale, block_sizes, segments, q_len, kv_len,
            head_dim) -> tuple[FlashStatic, int]:
  """(the kernels' static arguments, the padded head dimension) on one platform.

  mode: "interpret" (flash_attention_gpu.py's layout in Pallas interpret mode), "triton" (that layout
  compiled for GPU) or "tpu" (flash_attention_tpu.py's layout, compiled or in TPU interpret mode)."""
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
  st = FlashStatic(
      causal=causal, window=window, softcap=softcap, scale=scale, block_q=fit_q(blocks.block_q),
      block_kv=fit_kv(blocks.block_kv), block_q_bwd=fit_q(blocks.backward[0]), block_kv_bwd=fit_kv(blocks.backward[1]),
      offset=offset, q_len=q_len, kv_len=kv_len, segments=segments, interpret=interpret, kv_grid=mode == "tpu",
      gpu_params=_triton_params(blocks) if triton else None,
  )
  return st, padded_head_dim


def _padded(st: FlashStatic, head_dim: int, q, k, v, q_seg, kv_seg):
  """[B, T, N, H] q and [B, S, K, H] k, v -> [B, N, Tp, Hp] and [B, K, Sp, Hp] with segment ids [B, Tp], [B, Sp].

  Padded keys get segment -1 (seen by no query); padded queries (-2) are sliced away. Lengths are
  padded to the larger of the forward and backward blocks (powers of two: a multiple of both)."""
  q_multiple, kv_multiple = max(st.block_q, st.block_q_bwd), max(st.block_kv, st.block_kv_bwd)
  qt = _pad(_pad(jnp.swapaxes(q, 1, 2), 2, q_multiple), 3, head_dim)  # [B, N, Tp, Hp]
  kt = _pad(_pad(jnp.swapaxes(k, 1, 2), 2, kv_multiple), 3, head_dim)  # [B, K, Sp, Hp]
  vt = _pad(_pad(jnp.swapaxes(v, 1, 2), 2, kv_multiple), 3, head_dim)
  return qt, kt, vt, _pad(q_seg, 1, q_multiple, value=-2), _pad(kv_seg, 1, kv_multiple, value=-1)


def _attend(q, k, v, q_seg, kv_seg, *, mode, interpret, **settings):
  """One platform's attention: pad to its blocks, run its kernels under the custom_vjp, slice back."""
  st, head_dim = _static(mode=mode, interpret=interpret, **settings)
  out = _flash(*_padded(st, head_dim, q, k, v, q_seg, kv_seg), st)
  return jnp.swapaxes(out[:, :, :q.shape[1], :q.shape[3]], 1, 2)


# One block of a longer sequence: what ring attention composes. The forward returns the block's
# log-sum-exp beside its output so that blocks merge; the backward takes the whole row's merged o
# and lse, from which each block's dq, dk and dv follow alone (FlashAttention-2, alg. 2: P = exp(S -
# L) and D = rowsum(dO * O) need the row's L and O, nothing else of its other blocks).


def _block_call(body, q, k, v, segment_ids, *, causal, offset, **settings):
  """(body with its settings bound, to run on a platform; the validated segment ids) of one block."""
  q_len, kv_len = q.shape[1], k.shape[1]
  segments = _segments(q, k, v, segment_ids)
  offset = kv_len - q_len if offset is None else offset
  if causal and offset > kv_len - q_len:
    # Padded keys sit past kv_len: a causal query past the last key would see them. Every key
    # precedes such a block's queries, so it is causal=False (with the window, if any).
    raise ValueError(f"a causal block needs offset <= S - T, its queries within its keys' span; got {offset=}, "
                     f"{q_len=}, {kv_len=} (a block whose queries all follow its keys is causal=False)")
  return functools.partial(body, **_settings(q, k, segment_ids, causal=causal, offset=offset, **settings)), segments


@functools.partial(jax.jit, static_argnames=("offset", *_STATIC))
def flash_attention_block(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    *,
    segment_ids=None,  # (q_segment_ids [B, T], kv_segment_ids [B, S]) or, when T == S, [B, T]
    offset: int | None = None,  # the position of query 0 less that of key 0; None: S - T
    causal: bool = True,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: "bool | pltpu.InterpretParams | None" = None,
) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32) of one block: query t at position t + offset,
  key s at s; lse is the log-sum-exp of each row's visible logits, +inf for a row that sees no key
  (its o is 0). Not differentiable itself: `flash_attention_block_backward` is its backward. The
  other arguments are flash_attention's."""
  run, segments = _block_call(_block_forward, q, k, v, segment_ids, causal=causal, offset=offset,
                              sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale,
                              block_sizes=block_sizes)
  return _on_platform(run, (q, k, v, *segments), interpret)


@functools.partial(jax.jit, static_argnames=("offset", *_STATIC))
def flash_attention_block_backward(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    o: jax.Array,  # [B, T, N, H]: the rows' output over all their blocks
    lse: jax.Array,  # [B, N, T] float32: the rows' log-sum-exp over all their blocks (+inf: saw no key)
    do: jax.Array,  # [B, T, N, H]: the cotangent of o
    *,
    segment_ids=None,
    offset: int | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: "bool | pltpu.InterpretParams | None" = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) of this block's share of the rows' attention, each in its input's dtype: summed
  over a row's blocks (and, for dk and dv, over the blocks of queries that see these keys), they are
  the gradients of the whole attention. Block sizes are the backward's (BlockSizes.backward)."""
  if o.shape != q.shape or do.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
    raise ValueError(f"o and do must be [B, T, N, H] and lse [B, N, T] for {q.shape=}; got {o.shape=}, {do.shape=}, "
                     f"{lse.shape=}")
  run, segments = _block_call(_block_backward, q, k, v, segment_ids, causal=causal, offset=offset,
                              sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale,
                              block_sizes=block_sizes)
  return _on_platform(run, (q, k, v, *segments, o, lse.astype(jnp.float32), do), interpret)


def _block_forward(q, k, v, q_seg, kv_seg, *, mode, interpret, **settings):
  st, head_dim = _static(mode=mode, interpret=interpret, **settings)
  o, lse = _layout(st).forward(*_padded(st, head_dim, q, k, v, q_seg, kv_seg), st)
  q_len = q.shape[1]
  lse = lse.reshape(lse.shape[:3])[:, :, :q_len]  # the TPU layout's [B, N, Tp, 1] too
  return jnp.swapaxes(o[:, :, :q_len, :q.shape[3]], 1, 2), lse


def _block_backward(q, k, v, q_seg, kv_seg, o, lse, do, *, mode, interpret, **settings):
  st, head_dim = _static(mode=mode, interpret=interpret, **settings)
  qt, kt, vt, q_seg, kv_seg = _padded(st, head_dim, q, k, v, q_seg, kv_seg)
  rows = qt.shape[2]
  ot, dot = (_pad(_pad(jnp.swapaxes(x, 1, 2), 2, rows), 3, head_dim) for x in (o, do))  # [B, N, Tp, Hp]
  lse = _pad(lse, 2, rows, value=jnp.inf)  # padded rows see no key: P = exp(S - inf) = 0
  if st.kv_grid:
    lse = lse[..., None]  # the TPU layout's [B, N, Tp, 1]
  backward_st = dataclasses.replace(st, block_q=st.block_q_bwd, block_kv=st.block_kv_bwd)
  dq, dk, dv = _layout(st).backward(qt, kt, vt, q_seg, kv_seg, ot, lse, dot, backward_st)
  q_len, kv_len, dim = q.shape[1], k.shape[1], q.shape[3]
  return tuple(jnp.swapaxes(x[:, :, :length, :dim], 1, 2) for x, length in ((dq, q_len), (dk, kv_len), (dv, kv_len)))
