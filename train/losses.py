"""Loss functions for the trainer: `loss_fn(model, batch, rng) -> (loss, metrics)`.

The trainer averages micro-batch losses weighted by `metrics['weight']` (the number of tokens
that count), so a loss computed over 4 micro-batches equals the loss over their union.
"""

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token -log p(target) and log Z, both [B, T] float32, from logits [B, T, V]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logits, log_z


def next_token_loss(model, batch: dict[str, jax.Array], rng: jax.Array, *, z_loss: float = 0.0):
  """Mean next-token cross-entropy over tokens with loss_mask = 1, plus z_loss * mean(log Z ** 2).

  The z-loss (PaLM, Chowdhery et al. 2022, sec. 5) keeps the softmax normalizer near 1.
  """
  del rng  # no dropout in pre-training
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  nll, log_z = token_cross_entropy(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  weight = jnp.sum(mask)
  denom = jnp.maximum(weight, 1.0)
  cross_entropy = jnp.sum(nll * mask) / denom
  loss = cross_entropy
  metrics = {"cross_entropy": cross_entropy, "weight": weight}
  if z_loss:
    z = jnp.sum(jnp.square(log_z) * mask) / denom
    loss = loss + z_loss * z
    metrics["z_loss"] = z
  return loss, metrics
