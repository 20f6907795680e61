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
  'nf4'   QLoRA (Dettmers et al. 2023, sec. 3 and appendix E): blocks of `block_size` rows along
          axis 0 per channel (bitsandbytes' blocks of a flattened torch [out, in] weight: runs of
          consecutive input features of one output); a = absmax(block), c = index of the NF4
          value nearest x / a (uint8, 0..15), x ~ NF4[c] * a.
          double_quant: QLoRA quantizes the float32 absmax constants a second time, to 8-bit floats
          in blocks of 256 after subtracting their mean. We keep the mean-subtraction and blocks of
          256 but use symmetric int8 instead of FP8: m = mean(a), and for each block of 256
          constants (a flattened), t = absmax(a - m) / 127, a ~ m + round((a - m) / t) * t. The
          flattened constants are zero-padded to a multiple of 256 (the padding is dropped on
          decode). Error in a <= t / 2.
The 4-bit codes (int4, nf4) are packed two per byte along axis 0: byte (i, *c) holds the code of
row 2i in its low nibble and of row 2i + 1 in its high one (`unpacked_codes` undoes it), so a block
size must be even. Codes and group/block scales keep the weight's axes (codes (A, *C), or (A / 2,
*C) packed; scales (A / bs, 1, *C)), so they shard like the weight it came from.
All arithmetic is in float32; `dequantize` returns the input's dtype and shape. Both functions jit
with `scheme`, `block_size` and `double_quant` static.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import projections, sharding

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
    int4: codes (A // 2, *C) uint8 (two per byte), scale and zero (A // block_size, 1, *C).
    nf4:  codes (A // 2, *C) uint8 (two per byte), scale (A // block_size, 1, *C); with double_quant scale is None and
          scale_codes (P // 256, 256) int8, scale_scale (P // 256, 1), scale_mean (1,) hold it, P the
          number of blocks (A // block_size * prod(C)) padded up to a multiple of 256.
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
  if x.ndim == 0:
    raise ValueError(f"scheme={scheme!r} needs x.ndim >= 1, got x.shape={x.shape}")
  if scheme in ("int4", "nf4") and block_size % 2:
    raise ValueError(f"block_size={block_size} must be even for scheme={scheme!r} (two 4-bit codes per byte)")
  if scheme in ("int4", "nf4") and x.shape[0] % block_size:
    raise ValueError(f"block_size={block_size} does not divide axis 0 of x.shape={x.shape} (the contracted "
                     "axis, blocked per output channel)")


def _pack(codes):
  """(A, *C) codes in 0..15 -> (A / 2, *C) bytes: row 2i in the low nibble, row 2i + 1 in the high."""
  return codes[0::2] | (codes[1::2] << 4)


def unpacked_codes(q: "QuantizedArray") -> jax.Array:
  """The codes of q one per element, (A, *C): int8 for 'int8', uint8 in 0..15 for the 4-bit schemes."""
  if q.scheme == "int8":
    return q.codes
  low, high = q.codes & 0xF, q.codes >> 4
  return jnp.stack([low, high], axis=1).reshape(q.shape)


def _quantize_scales(a):
  """Double quantization of the NF4 absmax constants a (P,): int8 blocks of 256 around the mean."""
  mean = jnp.mean(a, keepdims=True)  # (1,): a scalar per layer would lose its layer axis in nnx.scan
  pad = -a.shape[0] % DOUBLE_QUANT_BLOCK
  centered = jnp.pad(a - mean, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)  # (P' / 256, 256)
  t = jnp.max(jnp.abs(centered), axis=1, keepdims=True) / 127
  codes = jnp.clip(jnp.round(centered / _safe(t)), -127, 127).astype(jnp.int8)
  return codes, t, mean


def _scale_shape(q) -> tuple[int, ...]:
  return (q.shape[0] // q.block_size, 1, *q.shape[1:])


def _dequantize_scales(q):
  shape = _scale_shape(q)
  a = q.scale_codes.astype(jnp.float32) * q.scale_scale + q.scale_mean
  return a.reshape(-1)[:math.prod(shape)].reshape(shape)  # (A / bs, 1, *C)


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
    codes = _pack(codes.reshape(x.shape))  # (A / 2, *C)
    return QuantizedArray(codes=codes, scale=scale, **(none | dict(zero=lo)), **meta)
  blocks = xf.reshape(x.shape[0] // block_size, block_size, *x.shape[1:])  # (A / bs, bs, *C)
  absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)  # (A / bs, 1, *C)
  codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), blocks / _safe(absmax), side="left")
  codes = _pack(codes.astype(jnp.uint8).reshape(x.shape))  # (A / 2, *C)
  if not double_quant:
    return QuantizedArray(codes=codes, scale=absmax, **none, **meta)
  scale_codes, scale_scale, scale_mean = _quantize_scales(absmax.reshape(-1))
  return QuantizedArray(codes=codes, scale=None, zero=None, scale_codes=scale_codes,
                        scale_scale=scale_scale, scale_mean=scale_mean, **meta)


def dequantized_scale(q: QuantizedArray) -> jax.Array:
  """The scales q decodes with (for nf4 with double_quant, the decoded absmax constants)."""
  return _dequantize_scales(q) if q.double_quant else q.scale


def dequantize(q: QuantizedArray) -> jax.Array:
  """Decodes q to an array of its original shape and dtype."""
  scale = dequantized_scale(q)
  if q.scheme == "int8":
    return (q.codes.astype(jnp.float32) * scale).astype(q.dtype)
  groups = unpacked_codes(q).reshape(q.shape[0] // q.block_size, q.block_size, *q.shape[1:])  # (A / bs, bs, *C)
  if q.scheme == "int4":
    out = q.zero + groups.astype(jnp.float32) * scale
  elif q.scheme == "nf4":
    out = jnp.asarray(NF4_CODEBOOK)[groups] * scale
  else:
    raise ValueError(f"unknown scheme={q.scheme!r}; expected one of {SCHEMES}")
  return out.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Whole modules: the decoder's projection weights, quantized in place of their parameters.
# ----------------------------------------------------------------------------------------------
class Quantized(nnx.Variable):
  """Codes and scales of a quantized weight: frozen state, never a trained parameter."""


_DATA_FIELDS = ("codes", "scale", "zero", "scale_codes", "scale_scale", "scale_mean")


def _with_dtype(q: QuantizedArray, dtype) -> QuantizedArray:
  """q decoding to `dtype` (q itself when dtype is None)."""
  return q if dtype is None else dataclasses.replace(q, dtype=np.dtype(dtype))


class QuantizedWeight(nnx.Module):
  """A projection weight as codes and scales, dequantized to the compute dtype where it is used.

  The weight's input axes are flattened first (`NHD` is quantized as `(N*H)D`), so blocks and
  groups are runs of consecutive input features of one output, whatever the layout; codes and
  block scales keep the logical axes of the weight (the first input axis names the flattened one).
  With `stacked` (scanned layers) every array has a leading L axis, sliced off by the layer scan.
  """

  def __init__(self, weight: jax.Array, logical_axes, *, in_rank: int, stacked: bool, scheme: str,
               block_size: int, double_quant: bool = False):
    lead = 1 if stacked else 0
    self.shape = tuple(weight.shape[lead:])  # one layer's weight
    self.in_rank = in_rank
    self.stacked = stacked
    flat = (math.prod(self.shape[:in_rank]), *self.shape[in_rank:])
    quantize = functools.partial(quantize_array, scheme=scheme, block_size=block_size, double_quant=double_quant)
    # One compiled function per weight shape (eagerly, every primitive would compile on its own).
    if stacked:
      q = jax.jit(jax.vmap(lambda w: quantize(w.reshape(flat))))(weight)
    else:
      q = jax.jit(lambda w: quantize(w.reshape(flat)))(weight)
    axes = tuple(logical_axes) if logical_axes is not None else (None,) * weight.ndim
    self.logical_axes = axes  # the float weight's
    layer_axes, weight_axes = axes[:lead], axes[lead:]
    flat_axes = (weight_axes[0], *weight_axes[in_rank:])  # (A, *C)
    field_axes = {
        "codes": flat_axes,
        "scale": (None, *flat_axes[1:]) if scheme == "int8" else (flat_axes[0], None, *flat_axes[1:]),
        "zero": (flat_axes[0], None, *flat_axes[1:]),
        "scale_codes": (None, None), "scale_scale": (None, None), "scale_mean": (None,),
    }
    # QuantizedArray's static fields, as a tuple: a module's static attributes must hash.
    self.meta = (("scheme", q.scheme), ("shape", q.shape), ("dtype", q.dtype), ("block_size", q.block_size),
                 ("double_quant", q.double_quant))
    self.fields = tuple(f for f in _DATA_FIELDS if getattr(q, f) is not None)
    for field in self.fields:
      setattr(self, field, Quantized(getattr(q, field), out_sharding=layer_axes + field_axes[field],
                                     eager_sharding=False))

  @property
  def scheme(self) -> str:
    return dict(self.meta)["scheme"]

  @property
  def block_size(self) -> int:
    return dict(self.meta)["block_size"]

  @property
  def float_dtype(self) -> np.dtype:
    """The dtype of the float weight it was quantized from."""
    return dict(self.meta)["dtype"]

  def quantized(self) -> QuantizedArray:
    """The codes and scales as a QuantizedArray of the flattened weight (one layer's, inside the
    layer scan; with a leading L axis outside it when stacked)."""
    values = {f: (getattr(self, f)[...] if f in self.fields else None) for f in _DATA_FIELDS}
    return QuantizedArray(**values, **dict(self.meta))

  def dequantized(self, dtype=None) -> jax.Array:
    """The weight in its own shape (one layer's: call inside the layer scan, or vmap when stacked)."""
    return dequantize(_with_dtype(self.quantized(), dtype)).reshape(self.shape)

  def dense(self, dtype=None) -> jax.Array:
    """The whole weight (every layer's when stacked), outside the layer scan."""
    if not self.stacked:
      return self.dequantized(dtype)
    out = jax.vmap(dequantize)(_with_dtype(self.quantized(), dtype))
    return out.reshape(out.shape[0], *self.shape)

  def __call__(self, eq: str, x: jax.Array, dtype, preferred_element_type=None) -> jax.Array:
    out_dtype = None if preferred_element_type is None else np.dtype(preferred_element_type)
    return _dequantized_einsum(eq, x, self.quantized(), self.shape, np.dtype(dtype), out_dtype)


# Rematerialized: the backward pass decodes the weight again from its codes instead of keeping the
# float weight of every layer alive from the forward pass (as bitsandbytes' 4-bit matmul does);
# without it a QLoRA step holds a float copy of the whole base.
@functools.partial(jax.checkpoint, static_argnums=(0, 3, 4, 5), policy=jax.checkpoint_policies.nothing_saveable)
def _dequantized_einsum(eq: str, x: jax.Array, q: QuantizedArray, shape, dtype, out_dtype) -> jax.Array:
  weight = dequantize(_with_dtype(q, dtype)).reshape(shape)
  return jnp.einsum(eq, x, weight, preferred_element_type=out_dtype)


def is_quantized(module: nnx.Module) -> bool:
  """Whether any weight of `module` is a QuantizedWeight (a quantized base, a merged QA-LoRA model)."""
  return any(isinstance(m, QuantizedWeight) for _, m in nnx.iter_modules(module))


def quantize_slot(slot: projections.Slot, scheme: str, *, block_size: int, double_quant: bool = False) -> None:
  """Replaces the parameter at `slot` by its QuantizedWeight; a block size that does not divide the
  weight's input features is an error naming the weight."""
  param = slot.get()
  if not isinstance(param, nnx.Param):
    raise ValueError(f"{slot.name} is already a {type(param).__name__}, not a float parameter")
  lead = 1 if slot.stacked else 0
  fan_in = math.prod(param.shape[lead:lead + slot.in_rank])
  if scheme != "int8" and fan_in % block_size:
    raise ValueError(f"block_size={block_size} does not divide the {fan_in} input features of {slot.name} "
                     f"(weight shape {tuple(param.shape)})")
  slot.set(QuantizedWeight(param[...], sharding.variable_logical_axes(param), in_rank=slot.in_rank,
                           stacked=slot.stacked, scheme=scheme, block_size=block_size, double_quant=double_quant))


def head_slot(decoder) -> projections.Slot:
  """The untied output head `lm_head` (DV: D is contracted) as a slot quantize_slot can replace."""
  if decoder.config.tie_embeddings:
    raise ValueError("the output head is the embedding table (tie_embeddings=True): it is not quantized; "
                     "only an untied lm_head is")
  return projections.Slot(decoder, "lm_head", "lm_head", None, 1, False)


def quantize_projections(module: nnx.Module, scheme: str, *, block_size: int, double_quant: bool = False,
                         head: bool = False) -> None:
  """Replaces the seven projection weights of the decoder `module` (and with `head`, its untied
  output head) by QuantizedWeights, in place."""
  slots = list(projections.slots(module)) + ([head_slot(module)] if head else [])
  for slot in slots:
    quantize_slot(slot, scheme, block_size=block_size, double_quant=double_quant)


def quantize(module: nnx.Module, scheme: str, *, block_size: int = 64, double_quant: bool = False,
             head: bool = False) -> nnx.Module:
  """A copy of the decoder `module` whose seven projection weights (q/k/v/o, gate/up/down) are
  weight-only `scheme` ('int8' per output channel, 'int4' group-wise or 'nf4' blockwise; see the
  module docstring); embeddings, norms and (unless `head`, for an untied one) the output head stay
  as they are, as QLoRA keeps them. The copy shares the arrays it does not replace; with a mesh in
  `model.sharding.axis_rules`, the codes and scales are placed by their logical axes."""
  if scheme not in SCHEMES:
    raise ValueError(f"unknown scheme={scheme!r}; expected one of {SCHEMES}")
  if is_quantized(module):
    raise ValueError("the module is already quantized; quantize its float original instead")
  module = projections.shallow_copy(module)
  quantize_projections(module, scheme, block_size=block_size, double_quant=double_quant, head=head)
  sharding.place_in_context(module)
  return module


def dequantize_all(module: nnx.Module) -> None:
  """Replaces every QuantizedWeight in `module` by a float parameter of the dtype it was quantized
  from (its logical axes kept), in place."""
  for _, parent in list(nnx.iter_modules(module)):
    for attr, child in list(vars(parent).items()):
      if isinstance(child, QuantizedWeight):
        weight = nnx.jit(lambda w: w.dense(w.float_dtype))(child)
        setattr(parent, attr, nnx.Param(weight, out_sharding=child.logical_axes, eager_sharding=False))
