"""What every attention path shares: the logical axes of its activations and which keys a query sees.

model/attention_ops.py (the backends, and the one dispatch between them and the ring) and
model/ring_attention.py both build on this module and it on neither, so the dispatch can call the
ring without the ring importing it back.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Logical axes of the attention activations (model/sharding.py maps them to the mesh).
BTNH = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")

# The logit of a masked (query, key) pair. Finite, so a fully masked row gives a uniform softmax
# (then zeroed) rather than NaN, and the ring's running max over masked keys alone stays finite.
MASKED = -0.7 * float(np.finfo(np.float32).max)


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
