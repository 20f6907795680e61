"""Weight quantization at the array level: int8, int4 and NF4 codes with their scales.

Layout. Our weights are stored input-axis first (`DF`, `DNH`, `FD`, `NHD`; see model/layers.py), so
axis 0 is contracted in every einsum that uses them. The per-channel and group-wise schemes
therefore reduce along axis 0 and keep one scale per entry of the remaining axes ("channels"). For
`DF`/`DNH`/`FD` that is exactly one scale per output channel; for `NHD` (whose contraction is over N
and H) it is one scale per (H, D), which is finer than per output channel and never worse.

Schemes (x is the float input, c the stored codes, s the scales):
  'int8'  symmetric per channel: s = absmax(x[:, j]) / 127, c = round(x / s) in [-127, 127] (int8),
          x ~ c * s. Error <= s / 2 per element.
  'int4'  asymmetric, groups of `block_size` rows along axis 0 per channel: with lo, hi the group's
          min and max, s = (hi - lo) / 15 and the zero point z = lo is kept in value space (a float,
          not an integer code), c = round((x - lo) / s) in 0..15, x ~ lo + c * s. Error <= s / 2.
          Codes are stored one per uint8, unpacked, in x's shape; packing two per byte is left to
          the matmul kernels that consume them.
  'nf4'   QLoRA (Dettmers et al. 2023, sec. 3 and appendix E): x is flattened into blocks of
          `block_size`; a = absmax(block), c = index of the NF4 value nearest x / a (uint8, 0..15),
          x ~ NF4[c] * a.
          double_quant: QLoRA quantizes the float32 absmax constants a second time, to 8-bit floats
          in blocks of 256 after subtracting their mean. We keep the mean-subtraction and blocks of
          256 but use symmetric int8 instead of FP8: m = mean(a), and for each block of 256
          constants, t = absmax(a - m) / 127, a ~ m + round((a - m) / t) * t. The scale vector is
          zero-padded to a multiple of 256 (the padding is dropped on decode). Error in a <= t / 2.
All arithmetic is in float32; `dequantize` returns the input's dtype and shape. Both functions jit
with `scheme`, `block_size` and `double_quant` static.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4", "nf4")
DOUBLE_QUANT_BLOCK = 256  # QLoRA's block size for quantizing the absmax constants

# The 16 NF4 values exactly as bitsandbytes defines them (QLoRA, appendix E): quantiles of N(0, 1)
# rescaled to [-1, 1], with an exact zero.
NF4_CODEBOOK = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32)
# Nearest value as a sorted search over the 15 midpoints; an exact tie goes to the lower code.
_NF4_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("codes", "scale", "zero", "scale_codes", "scale_scale", "scale_mean"),
    meta_fields=("scheme", "shape", "dtype", "block_size", "double_quant"))
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """Codes and scales of one quantized array; fields a scheme does not use are None.

  Shapes, with x of shape (A, *C) (A the contracted axis 0, C the channel axes), n = x.size:
    int8: codes (A, *C) int8, scale (1, *C).
    int4: codes (A, *C) uint8, scale and zero (A // block_size, 1, *C).
    nf4:  codes (n // block_size, block_size) uint8, scale (n // block_size, 1); with double_quant
          scale is None and scale_codes (P // 256, 256) int8, scale_scale (P // 256, 1),
          scale_mean () hold it, P the number of blocks padded up to a multiple of 256.
  """
  codes: jax.Array
  scale: jax.Array | None
  zero: jax.Array | None
  scale_codes: jax.Array | None
  scale_scale: jax.Array | None
  scale_mean: jax.Array | None
  scheme: str
  shape: tuple[int, ...]
  dtype: np.dtype
  block_size: int
  double_quant: bool


def _safe(s):
  """Divisor for s: an all-zero channel/group/block has scale 0 and codes 0, so divide by 1."""
  return jnp.where(s == 0, 1.0, s)


def _validate(x, scheme, block_size, double_quant):
  if scheme not in SCHEMES:
    raise ValueError(f"unknown scheme={scheme!r}; expected one of {SCHEMES}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x.dtype={x.dtype} is not a float dtype; only float weights are quantized")
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size={block_size!r} must be a positive int")
  if double_quant and scheme != "nf4":
    raise ValueError(f"double_quant=True is only defined for scheme='nf4', not scheme={scheme!r}")
  if scheme in ("int8", "int4") and x.ndim == 0:
    raise ValueError(f"scheme={scheme!r} needs x.ndim >= 1, got x.shape={x.shape}")
  if scheme == "int4" and x.shape[0] % block_size:
    raise ValueError(f"block_size={block_size} does not divide axis 0 of x.shape={x.shape}")
  if scheme == "nf4" and x.size % block_size:
    raise ValueError(f"block_size={block_size} does not divide x.size={x.size} (x.shape={x.shape})")


def _quantize_scales(a):
  """Double quantization of the NF4 absmax constants a (P,): int8 blocks of 256 around the mean."""
  mean = jnp.mean(a)
  pad = -a.shape[0] % DOUBLE_QUANT_BLOCK
  centered = jnp.pad(a - mean, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)  # (P' / 256, 256)
  t = jnp.max(jnp.abs(centered), axis=1, keepdims=True) / 127
  codes = jnp.clip(jnp.round(centered / _safe(t)), -127, 127).astype(jnp.int8)
  return codes, t, mean


def _dequantize_scales(q):
  num_blocks = math.prod(q.shape) // q.block_size
  a = q.scale_codes.astype(jnp.float32) * q.scale_scale + q.scale_mean
  return a.reshape(-1)[:num_blocks, None]  # (P, 1)


def quantize_array(x, scheme: str, *, block_size: int = 64,
                   double_quant: bool = False) -> QuantizedArray:
  """Quantizes float x with `scheme` ('int8', 'int4' or 'nf4'; see the module docstring)."""
  x = jnp.asarray(x)
  _validate(x, scheme, block_size, double_quant)
  meta = dict(scheme=scheme, shape=tuple(x.shape), dtype=np.dtype(x.dtype), block_size=block_size,
              double_quant=double_quant)
  none = dict(zero=None, scale_codes=None, scale_scale=None, scale_mean=None)
  xf = x.astype(jnp.float32)
  if scheme == "int8":
    scale = jnp.max(jnp.abs(xf), axis=0, keepdims=True) / 127  # (1, *C)
    codes = jnp.clip(jnp.round(xf / _safe(scale)), -127, 127).astype(jnp.int8)
    return QuantizedArray(codes=codes, scale=scale, **none, **meta)
  if scheme == "int4":
    groups = xf.reshape(x.shape[0] // block_size, block_size, *x.shape[1:])  # (A / bs, bs, *C)
    lo = jnp.min(groups, axis=1, keepdims=True)
    scale = (jnp.max(groups, axis=1, keepdims=True) - lo) / 15  # (A / bs, 1, *C)
    codes = jnp.clip(jnp.round((groups - lo) / _safe(scale)), 0, 15).astype(jnp.uint8)
    codes = codes.reshape(x.shape)  # (A, *C)
    return QuantizedArray(codes=codes, scale=scale, **(none | dict(zero=lo)), **meta)
  blocks = xf.reshape(-1, block_size)  # (n / bs, bs)
  absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)  # (n / bs, 1)
  codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), blocks / _safe(absmax), side="left")
  codes = codes.astype(jnp.uint8)
  if not double_quant:
    return QuantizedArray(codes=codes, scale=absmax, **none, **meta)
  scale_codes, scale_scale, scale_mean = _quantize_scales(absmax[:, 0])
  return QuantizedArray(codes=codes, scale=None, zero=None, scale_codes=scale_codes,
                        scale_scale=scale_scale, scale_mean=scale_mean, **meta)


def dequantized_scale(q: QuantizedArray) -> jax.Array:
  """The scales q decodes with (for nf4 with double_quant, the decoded absmax constants)."""
  return _dequantize_scales(q) if q.double_quant else q.scale


def dequantize(q: QuantizedArray) -> jax.Array:
  """Decodes q to an array of its original shape and dtype."""
  scale = dequantized_scale(q)
  if q.scheme == "int8":
    out = q.codes.astype(jnp.float32) * scale
  elif q.scheme == "int4":
    groups = q.codes.reshape(q.shape[0] // q.block_size, q.block_size, *q.shape[1:])
    out = q.zero + groups.astype(jnp.float32) * scale
  elif q.scheme == "nf4":
    out = jnp.asarray(NF4_CODEBOOK)[q.codes] * scale
  else:
    raise ValueError(f"unknown scheme={q.scheme!r}; expected one of {SCHEMES}")
  return out.reshape(q.shape).astype(q.dtype)
