"""Attention as a function of q, k, v: the plain-jnp reference (`xla`) and cuDNN (`cudnn`) backends.

All backends honour causal masks, sliding windows, segment ids and GQA, and none of them
repeats K/V heads: queries are viewed as [B, T, K, G, H] so each kv head serves its G queries.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so a fully masked row gives a uniform softmax (then zeroed) rather than NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def attention_mask(
    q_positions: jax.Array,  # [B, T] absolute index of each query
    kv_positions: jax.Array,  # [B, S] absolute index of each key
    *,
    q_segment_ids: jax.Array | None = None,  # [B, T]
    kv_segment_ids: jax.Array | None = None,  # [B, S]
    causal: bool = True,
    sliding_window: int | jax.Array = 0,
) -> jax.Array:
  """[B, T, S] bool: may query t see key s."""
  q = q_positions[:, :, None]
  kv = kv_positions[:, None, :]
  mask = jnp.ones(jnp.broadcast_shapes(q.shape, kv.shape), bool)
  if causal:
    mask &= kv <= q
  if not (isinstance(sliding_window, int) and sliding_window == 0):
    # Query i sees key j only when i - w < j (Hugging Face Mistral convention); w == 0 is off.
    window = jnp.asarray(sliding_window)
    mask &= (window == 0) | (q - kv < window)
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask


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
) -> jax.Array:
  """Reference attention in plain jnp; logits and softmax in float32. Returns [B, T, N, H]."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  if logit_softcap:
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
  if alibi_bias is not None:
    logits += alibi_bias.reshape(batch, num_kv_heads, group, q_len, -1)
  mask = mask[:, None, None, :, :]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # a fully masked row attends to nothing
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
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
  """Attention through the backend `impl` ('xla', 'cudnn', 'pallas'). Returns [B, T, N, H]."""
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
    try:
      from pallas_kernels import flash_attention  # noqa: PLC0415 (optional backend)
    except ImportError as e:
      raise ValueError("attention_impl='pallas' needs pallas_kernels.flash_attention, which is not available") from e
    if custom_positions or alibi_slopes is not None or not isinstance(sliding_window, int):
      _warn_once("attention_impl='pallas' falls back to 'xla' for custom positions, ALiBi or traced windows.")
    else:
      segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
      return flash_attention(
          q, k, v, segment_ids=segment_ids, causal=causal, sliding_window=sliding_window or None,
          logit_softcap=logit_softcap or None, scale=scale,
      )
  elif impl != "xla":
    raise ValueError(f"attention impl {impl!r} is not one of ('xla', 'cudnn', 'pallas')")

  if q_positions is None or kv_positions is None:
    default_q, default_kv = default_positions(batch, q_len, kv_len)
    q_positions = default_q if q_positions is None else q_positions
    kv_positions = default_kv if kv_positions is None else kv_positions
  mask = attention_mask(
      q_positions, kv_positions, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
      sliding_window=sliding_window,
  )
  alibi_bias = None
  if alibi_slopes is not None:
    distance = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)  # [B, T, S]
    alibi_bias = -jnp.asarray(alibi_slopes, jnp.float32)[None, :, None, None] * distance[:, None]
  return xla_attention(q, k, v, mask=mask, scale=scale, logit_softcap=logit_softcap, alibi_bias=alibi_bias)
