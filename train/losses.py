"""Loss functions for the trainer: `loss_fn(model, batch, rng, *, whole_batch=None) -> (loss, metrics)`.

The contract is train/step.py's `LossFn`. When `batch` is a micro-batch of `whole_batch`, a loss
divides its numerators, summed over `batch`, by its normalizers counted on `whole_batch` (for the
next-token loss: the whole batch's loss-mask tokens), so the micro-batches' losses sum to the loss
over their union exactly, whatever normalizers its terms have; the step sums them. Metrics are
means over `batch` alone, metrics['weight'] their normalizer, metrics['tokens'] the tokens that
count (throughput).
"""

import jax
import jax.numpy as jnp


def whole(batch: dict[str, jax.Array], whole_batch: dict[str, jax.Array] | None) -> dict[str, jax.Array]:
  """The batch a loss counts its normalizers on: `whole_batch`, or `batch` when it is the whole batch."""
  return batch if whole_batch is None else whole_batch


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token -log p(target) and log Z, both [B, T] float32, from logits [B, T, V]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logits, log_z


def next_token_loss(model, batch: dict[str, jax.Array], rng: jax.Array, *, z_loss: float = 0.0,
                    whole_batch: dict[str, jax.Array] | None = None):
  """Mean next-token cross-entropy over tokens with loss_mask = 1, plus z_loss * mean(log Z ** 2),
  both means over the tokens of the whole batch (this micro-batch's share of them, `LossFn`).

  The z-loss (PaLM, Chowdhery et al. 2022, sec. 5) keeps the softmax normalizer near 1.
  """
  del rng  # no dropout in pre-training
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  nll, log_z = token_cross_entropy(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.sum(mask)
  whole_tokens = jnp.maximum(jnp.sum(whole(batch, whole_batch)["loss_mask"].astype(jnp.float32)), 1.0)
  nll_sum = jnp.sum(nll * mask)
  loss = nll_sum / whole_tokens
  metrics = {"cross_entropy": nll_sum / jnp.maximum(tokens, 1.0), "weight": tokens, "tokens": tokens}
  if z_loss:
    z_sum = jnp.sum(jnp.square(log_z) * mask)
    loss = loss + z_loss * z_sum / whole_tokens
    metrics["z_loss"] = z_sum / jnp.maximum(tokens, 1.0)
  return loss, metrics
