"""Positional schemes: rotary embeddings with their context-extension scalings, and ALiBi slopes.

Rotary scalings (`ModelConfig.rope_scaling`), each as Hugging Face transformers computes it so that
imported and exported checkpoints agree:
  linear       position interpolation (Chen et al. 2023): every frequency divided by the factor.
  llama3       Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth band between.
  ntk          NTK-aware scaling (bloc97 2023): the base times factor^(H / (H - 2)), so the lowest
               frequency is interpolated by the factor and the highest barely moves.
  dynamic_ntk  the NTK base change by the current length L = max position + 1 beyond
               max_position_embeddings: base * (factor * L / max_len - (factor - 1))^(H / (H - 2)).
  yarn         YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the
               original context interpolated, more than beta_fast times kept, a linear ramp between
               (in dimension index); q and k scaled by the attention factor 0.1 ln(factor) + 1.
"""

import math

import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig, positions=None):
  """[H/2] inverse frequencies theta^(-2i/H) after the configured scaling: float64 numpy, or for
  dynamic_ntk a float32 jax array of the current length (positions [B, T] are then needed)."""
  c = config
  exponents = np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim  # [H/2]: 2i / H
  inv_freq = 1.0 / (c.rope_theta**exponents)
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
  power = c.head_dim / (c.head_dim - 2)
  if c.rope_scaling == "ntk":
    return 1.0 / ((c.rope_theta * c.rope_scaling_factor**power) ** exponents)
  if c.rope_scaling == "dynamic_ntk":
    if positions is None:
      raise ValueError("rope_scaling='dynamic_ntk' needs the positions: its base depends on the current length")
    length = jnp.maximum(jnp.max(positions) + 1, c.max_position_embeddings).astype(jnp.float32)
    factor = c.rope_scaling_factor
    base = c.rope_theta * (factor * length / c.max_position_embeddings - (factor - 1)) ** power
    return 1.0 / base ** jnp.asarray(exponents, jnp.float32)
  if c.rope_scaling == "yarn":
    return _yarn_inverse_frequencies(c, inv_freq)
  return inv_freq


def _yarn_inverse_frequencies(c: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
  def dimension(rotations):  # the dimension index whose frequency turns `rotations` times over the original context
    return c.head_dim * math.log(c.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(c.rope_theta))

  low, high = dimension(c.rope_yarn_beta_fast), dimension(c.rope_yarn_beta_slow)
  if c.rope_yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, c.head_dim - 1)
  high = high + 0.001 if low == high else high
  ramp = np.clip((np.arange(c.head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # 0: kept, 1: interpolated
  return inv_freq * (1 - ramp) + inv_freq / c.rope_scaling_factor * ramp


def rope_attention_factor(config: ModelConfig) -> float:
  """What q and k are multiplied by after rotation: YaRN's attention temperature, 1 otherwise."""
  c = config
  if c.rope_scaling != "yarn":
    return 1.0
  if c.rope_attention_factor:
    return c.rope_attention_factor
  return 0.1 * math.log(c.rope_scaling_factor) + 1.0 if c.rope_scaling_factor > 1 else 1.0


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq, scale: float = 1.0) -> jnp.ndarray:
  """Rotates x [B, T, N, H] by positions [B, T], in the half-split layout of Hugging Face
  checkpoints (dimension i pairs with i + H/2), and multiplies by `scale` (YaRN's attention
  factor, folded into sin and cos as transformers does). Angles in float32, result in x's dtype."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
  sin = (jnp.sin(angles) * scale)[:, :, None, :]  # [B, T, 1, H/2]
  cos = (jnp.cos(angles) * scale)[:, :, None, :]
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
