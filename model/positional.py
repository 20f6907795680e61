"""Positional schemes: rotary embeddings (with linear and Llama 3 scaling) and ALiBi slopes."""

import math

import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """[H/2] float64 inverse frequencies theta^(-2i/H), after the configured scaling."""
  c = config
  inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
  if c.rope_scaling == "linear":  # position interpolation (Chen et al. 2023)
    return inv_freq / c.rope_scaling_factor
  if c.rope_scaling == "llama3":
    # Llama 3.1: long wavelengths are divided by the factor, short ones kept, and the band in
    # between interpolated smoothly in 1/wavelength.
    low_freq_wavelen = c.rope_original_max_len / c.rope_low_freq_factor
    high_freq_wavelen = c.rope_original_max_len / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / c.rope_scaling_factor, inv_freq)
    smooth = (c.rope_original_max_len / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / c.rope_scaling_factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, N, H] by positions [B, T], in the half-split layout of Hugging Face
  checkpoints (dimension i pairs with i + H/2). Angles in float32, result in x's dtype."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """[N] ALiBi slopes (Press et al. 2022): a geometric sequence from 2^(-8/n); for a head count
  that is not a power of two, the closest power's slopes plus every other slope of twice it."""

  def power_of_two_slopes(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = power_of_two_slopes(closest)
  if closest < num_heads:
    slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, np.float64)
