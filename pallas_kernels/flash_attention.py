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

  mode: "interpret" (flash_attention_gpu.py's layout in Pallas interpret mode), "triton" (that layout
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
  st = FlashStatic(
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
