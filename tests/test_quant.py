"""Array quantization (model/quant.py) against closed forms and brute-force numpy references.

The scales are recomputed here in numpy from their definitions (absmax / 127, (max - min) / 15,
block absmax) and the NF4 codes by an argmin over all 16 values, independent of the module's
midpoint search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import quant

RNG = np.random.default_rng(0)
D, F = 128, 24  # a DF weight: axis 0 is contracted

BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


def _weight(shape=(D, F)):
  return RNG.normal(size=shape).astype(np.float32) * 0.02


def test_nf4_codebook():
  book = np.asarray(quant.NF4_CODEBOOK)
  assert book.dtype == np.float32 and book.shape == (16,)
  np.testing.assert_array_equal(book, np.asarray(BITSANDBYTES_NF4, np.float32))
  assert np.all(np.diff(book) > 0)
  assert {-1.0, 0.0, 1.0} <= set(book.tolist())


def test_int8_closed_form():
  x = _weight()
  q = quant.quantize_array(x, "int8")
  scale = np.abs(x).max(axis=0, keepdims=True) / 127  # one per output channel f
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  codes = np.asarray(q.codes)
  assert codes.dtype == np.int8 and codes.min() >= -127 and codes.max() <= 127
  assert np.all(np.abs(codes).max(axis=0) == 127)  # the absmax element of each channel
  err = np.abs(np.asarray(quant.dequantize(q)) - x)
  assert np.all(err <= scale / 2 * (1 + 1e-5))


def test_int8_exact_on_multiples_of_scale():
  scale = np.array([0.5, 0.25, 2.0 ** -6], np.float32)  # powers of two: products are exact
  ints = RNG.integers(-127, 128, size=(16, 3))
  ints[0] = 127  # pins absmax / 127 to `scale`
  x = (ints * scale).astype(np.float32)
  q = quant.quantize_array(x, "int8")
  np.testing.assert_array_equal(np.asarray(q.codes), ints)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), x)


def test_int4_groups():
  bs = 32
  x = _weight()
  x[:bs, 0] = 0.3  # a constant group: min == max
  x[bs:2 * bs, 1] = 0.0  # an all-zero group
  q = quant.quantize_array(x, "int4", block_size=bs)
  groups = x.reshape(D // bs, bs, F)
  lo, hi = groups.min(axis=1, keepdims=True), groups.max(axis=1, keepdims=True)
  scale = (hi - lo) / 15
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.zero), lo)
  codes = np.asarray(quant.unpacked_codes(q))
  assert codes.dtype == np.uint8 and codes.shape == x.shape and codes.max() <= 15
  packed = np.asarray(q.codes)  # two codes per byte: even rows low, odd rows high
  assert packed.shape == (D // 2, F)
  np.testing.assert_array_equal(packed, codes[0::2] | (codes[1::2] << 4))
  out = np.asarray(quant.dequantize(q))
  assert np.all(np.isfinite(out))
  err = np.abs(out - x).reshape(D // bs, bs, F)
  assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-8)
  np.testing.assert_array_equal(out[:bs, 0], 0.3 * np.ones(bs, np.float32))
  np.testing.assert_array_equal(out[bs:2 * bs, 1], np.zeros(bs, np.float32))


def _nf4_reference(x, bs):
  """Absmax of each block of bs rows along axis 0 per channel, and the nearest NF4 value by brute
  force over all 16 (float64); arrays shaped (A / bs, bs, *C)."""
  blocks = x.reshape(x.shape[0] // bs, bs, *x.shape[1:]).astype(np.float64)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  normed = blocks / np.where(absmax == 0, 1, absmax)
  book = np.asarray(BITSANDBYTES_NF4)
  codes = np.argmin(np.abs(normed[..., None] - book), axis=-1)
  return codes, absmax, book[codes] * absmax


@pytest.mark.parametrize("shape,bs", [((D, F), 64), ((64, 4, 16), 32)])
def test_nf4_nearest_value(shape, bs):
  x = RNG.normal(size=shape).astype(np.float32)
  x[:bs, 0] = 0.0  # an all-zero block
  q = quant.quantize_array(x, "nf4", block_size=bs)
  codes, absmax, decoded = _nf4_reference(x, bs)
  np.testing.assert_array_equal(np.asarray(quant.unpacked_codes(q)), codes.reshape(shape))
  assert q.codes.shape == (shape[0] // 2, *shape[1:]) and q.codes.dtype == np.uint8
  np.testing.assert_allclose(np.asarray(q.scale), absmax, rtol=1e-6)
  out = np.asarray(quant.dequantize(q))
  assert out.shape == shape
  np.testing.assert_allclose(out, decoded.reshape(shape), rtol=1e-6, atol=0)
  np.testing.assert_array_equal(out[:bs, 0], 0.0)
  # Largest NF4 gap is 1 - 0.7229..., so the error is at most half of it times the block absmax.
  max_gap = np.diff(np.asarray(BITSANDBYTES_NF4)).max()
  err = np.abs(out - x).reshape(decoded.shape)
  assert np.all(err <= absmax * max_gap / 2 * (1 + 1e-5))


def test_nf4_double_quant():
  bs = 16
  x = RNG.normal(size=(300 * bs,)).astype(np.float32)  # 300 blocks: two 256-blocks, one padded
  plain = quant.quantize_array(x, "nf4", block_size=bs)
  q = quant.quantize_array(x, "nf4", block_size=bs, double_quant=True)
  assert q.scale is None and np.asarray(q.scale_codes).dtype == np.int8
  absmax = np.abs(x.reshape(-1, bs)).max(axis=1)
  centered = absmax - absmax.mean()
  padded = np.concatenate([centered, np.zeros(512 - 300)]).reshape(2, 256)
  t = np.abs(padded).max(axis=1).repeat(256)[:300] / 127  # the 8-bit step of each constant
  got = np.asarray(quant.dequantized_scale(q))[:, 0]
  assert got.shape == (300,)
  assert np.all(np.abs(got - absmax) <= t / 2 * (1 + 1e-4) + 1e-6)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
  out, out_plain = np.asarray(quant.dequantize(q)), np.asarray(quant.dequantize(plain))
  assert np.all(np.abs(out - out_plain).reshape(-1, bs) <= t[:, None] / 2 * (1 + 1e-4) + 1e-6)
  assert np.abs(out - x).mean() < 1.1 * np.abs(out_plain - x).mean()


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_jit_pytree_and_bfloat16(scheme):
  x = jnp.asarray(_weight(), jnp.bfloat16)
  f = jax.jit(quant.quantize_array, static_argnames=("scheme", "block_size", "double_quant"))
  q = f(x, scheme, block_size=32)
  eager = quant.quantize_array(x, scheme, block_size=32)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(eager), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = jax.jit(quant.dequantize)(q)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(quant.dequantize(eager), np.float32))
  rel = np.abs(np.asarray(out, np.float32) - np.asarray(x, np.float32)).max() / 0.02
  assert rel < 1.0  # a gross sanity bound; the closed-form bounds are tested in float32 above


def test_double_quant_under_jit():
  x = jnp.asarray(RNG.normal(size=(64, 64)), jnp.float32)
  f = jax.jit(quant.quantize_array, static_argnames=("scheme", "block_size", "double_quant"))
  q = f(x, "nf4", block_size=64, double_quant=True)
  eager = quant.quantize_array(x, "nf4", block_size=64, double_quant=True)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(eager.codes))
  np.testing.assert_array_equal(np.asarray(q.scale_codes), np.asarray(eager.scale_codes))
  # XLA may fuse the decode's multiply-add differently under jit: equal to float32 rounding.
  np.testing.assert_allclose(np.asarray(jax.jit(quant.dequantize)(q)),
                             np.asarray(quant.dequantize(eager)), rtol=1e-6, atol=1e-7)


def test_errors_name_the_value():
  x = _weight()
  with pytest.raises(ValueError, match="scheme='fp3'"):
    quant.quantize_array(x, "fp3")
  with pytest.raises(ValueError, match="block_size=48"):
    quant.quantize_array(x, "int4", block_size=48)  # 48 does not divide D = 128
  with pytest.raises(ValueError, match="block_size=5"):
    quant.quantize_array(x, "nf4", block_size=5)  # 5 does not divide D
  with pytest.raises(ValueError, match="block_size=7 must be even"):
    quant.quantize_array(x, "nf4", block_size=7)
  with pytest.raises(ValueError, match="block_size=0"):
    quant.quantize_array(x, "nf4", block_size=0)
  with pytest.raises(ValueError, match="int32"):
    quant.quantize_array(np.ones((4, 4), np.int32), "int8")
  with pytest.raises(ValueError, match="double_quant"):
    quant.quantize_array(x, "int8", double_quant=True)
