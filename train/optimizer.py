"""Optimizers and learning-rate schedules from `config.optimizer`, built with optax.

Keys of `config.optimizer` (defaults in configs/common.py, `optimizer_config()`):
  name                  adamw | adafactor | lion
  learning_rate         peak learning rate
  schedule              warmup_cosine | warmup_linear | wsd (warmup-stable-decay) | constant
  warmup_steps          linear warmup from 0 to the peak
  decay_steps           wsd only: length of the final linear decay (0: 20% of the run)
  min_learning_rate_ratio  floor of the decay, as a fraction of the peak
  b1, b2, eps           Adam/Lion moments (Lion uses b1, b2)
  weight_decay          decoupled weight decay (AdamW, Lion, Adafactor)
  decay_norms, decay_biases, decay_embeddings   whether those parameters are decayed
  grad_clip_norm        global-norm clipping; 0 turns it off
"""

from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("warmup_cosine", "warmup_linear", "wsd", "constant")


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  c = config
  if c.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={c.schedule!r} is not one of {SCHEDULES}")
  if not 0 <= c.warmup_steps <= total_steps:
    raise ValueError(f"config.optimizer.warmup_steps={c.warmup_steps} must be in [0, total_steps={total_steps}]")
  peak, floor = c.learning_rate, c.learning_rate * c.min_learning_rate_ratio
  warmup = max(c.warmup_steps, 1)
  if c.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [c.warmup_steps]
    ) if c.warmup_steps else optax.constant_schedule(peak)
  if c.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, c.warmup_steps, max(total_steps, c.warmup_steps + 1), floor)
  if c.schedule == "warmup_linear":
    decay = optax.linear_schedule(peak, floor, max(total_steps - c.warmup_steps, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [c.warmup_steps])
  # Warmup-stable-decay (Hu et al. 2024, MiniCPM): flat at the peak, then a linear cool-down.
  decay_steps = c.decay_steps or max(total_steps // 5, 1)
  stable_steps = max(total_steps - c.warmup_steps - decay_steps, 0)
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, peak, warmup),
          optax.constant_schedule(peak),
          optax.linear_schedule(peak, floor, decay_steps),
      ],
      [c.warmup_steps, c.warmup_steps + stable_steps],
  )


def weight_decay_mask(config: ml_collections.ConfigDict) -> Callable[[nnx.State], nnx.State]:
  """True for parameters that are decayed; norms, biases and embeddings are configurable."""

  def decide(path, _):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    names = [n for n in names if n != "value"]  # nnx.Variable's own attribute, not a parameter name
    leaf = names[-1]
    if any("norm" in n for n in names):
      return config.decay_norms
    if leaf in ("bq", "bk", "bv", "bias"):
      return config.decay_biases
    if leaf == "embedding":
      return config.decay_embeddings
    return True

  return lambda params: jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) for `config.optimizer`; the schedule is also logged as learning_rate."""
  c = config
  if c.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={c.name!r} is not one of {OPTIMIZERS}")
  schedule = make_schedule(c, total_steps)
  mask = weight_decay_mask(c)
  if c.name == "adamw":
    base = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)
  elif c.name == "lion":
    base = optax.lion(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=mask)
  else:
    base = optax.adafactor(schedule, weight_decay_rate=c.weight_decay or None, weight_decay_mask=mask)
  if c.grad_clip_norm:
    base = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), base)
  return base, schedule
