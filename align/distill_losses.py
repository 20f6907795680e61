"""Token-level knowledge distillation from a teacher's logits (pure, jit-able functions).

Student and teacher logits are [B, T, V] over the same tokenizer (any float dtype; the math is
float32); mask [B, T] is nonzero on the tokens that count (completions), zero on prompt and
padding. Per-token divergences are summed over V and averaged over the masked tokens of the whole
batch (a token mean, as in train/losses.py): whole_mask, the whole batch's mask when these rows are
a micro-batch of it, is where the tokens are counted (train.step.LossFn), so the micro-batches'
losses add up to the whole batch's. Every loss returns (loss, metrics), the metrics over this batch
alone; metrics['weight'] is its number of masked tokens.

Conventions:
- Both distributions are softened by the temperature, softmax(logits / T), and every loss is
  multiplied by T^2 (Hinton et al. 2015, sec. 2: the gradients of the softened targets scale as
  1/T^2, so this keeps their magnitude comparable across temperatures). The 'distill/<name>'
  metric is the divergence itself, before the T^2.
- The teacher is a fixed target: its log-probs pass through stop_gradient.
- Masked positions are removed with jnp.where (a select, not a product), so inf or nan logits
  there reach neither the loss nor any gradient.
- A -inf logit (a filtered vocabulary) is a zero probability, and 0 * log(0 / q) counts as 0
  even where q = 0 too; a divergence that is truly infinite (p > 0 where q = 0) stays inf.
- temperature and beta are static Python floats (validated eagerly, and beta in {0, 1} picks a
  different formula).
"""

import math

import jax
import jax.numpy as jnp

DISTILLATION_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _validate(student_logits, teacher_logits, mask, temperature, beta):
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(f"student_logits.shape={tuple(student_logits.shape)} and teacher_logits.shape="
                     f"{tuple(teacher_logits.shape)} differ in vocabulary size V; distillation here needs "
                     "one tokenizer for both")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student_logits.shape={tuple(student_logits.shape)} != teacher_logits.shape="
                     f"{tuple(teacher_logits.shape)}")
  if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
    raise ValueError(f"mask.shape={tuple(mask.shape)} is not the logits' [B, T]={tuple(student_logits.shape[:-1])}")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  if not 0 <= beta <= 1:
    raise ValueError(f"beta={beta} must be in [0, 1]")


def _soften(student_logits, teacher_logits, mask, temperature):
  """Softened log-probs of student and teacher, [B, T, V] float32, and the bool mask [B, T]."""
  keep = mask != 0

  def log_probs(logits):
    # A select: the masked positions' values, inf and nan included, get a zero cotangent.
    x = jnp.where(keep[..., None], logits.astype(jnp.float32), 0.0)
    return jax.nn.log_softmax(x / temperature, axis=-1)

  return log_probs(student_logits), jax.lax.stop_gradient(log_probs(teacher_logits)), keep


def _kl(logp, logq):
  """Per-token KL(p || q) = sum_V p (log p - log q), [B, T], with 0 log(0 / q) = 0."""
  # Where log p = log q = -inf the difference is nan; masking the difference itself (not only the
  # product) keeps that nan out of the gradient too.
  diff = jnp.where(logp > -jnp.inf, logp - logq, 0.0)
  return jnp.sum(jnp.exp(logp) * diff, axis=-1)


def _log_mixture(logp, logq, beta):
  """log(beta p + (1 - beta) q), [B, T, V], for 0 < beta < 1, computed in log space."""
  a, b = logp + math.log(beta), logq + math.log1p(-beta)
  # logaddexp(-inf, -inf) has a nan gradient even under a zero cotangent: feed it zeros there.
  empty = (a == -jnp.inf) & (b == -jnp.inf)
  mixed = jnp.logaddexp(jnp.where(empty, 0.0, a), jnp.where(empty, 0.0, b))
  return jnp.where(empty, -jnp.inf, mixed)


def _finish(name, per_token, logp_student, logp_teacher, keep, temperature, whole_mask):
  """Token mean of a [B, T] divergence (over whole_mask's tokens if given), scaled by T^2, and the metrics."""
  weight = jnp.sum(keep.astype(jnp.float32))
  denom = jnp.maximum(weight, 1.0)
  total = jnp.sum(jnp.where(keep, per_token, 0.0))
  whole_denom = denom if whole_mask is None else jnp.maximum(jnp.sum(jnp.asarray(whole_mask) != 0), 1)
  agree = jnp.argmax(logp_student, axis=-1) == jnp.argmax(logp_teacher, axis=-1)  # [B, T]
  metrics = {
      f"distill/{name}": total / denom,
      "distill/teacher_student_agreement": jnp.sum(agree & keep) / denom,
      "weight": weight,
  }
  return temperature**2 * total / whole_denom, metrics


def forward_kl_loss(
    student_logits: jax.Array,  # [B, T, V]
    teacher_logits: jax.Array,  # [B, T, V]
    mask: jax.Array,  # [B, T]
    *,
    temperature: float = 1.0,
    whole_mask: jax.Array | None = None,  # [B', T]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """T^2 * KL(p_teacher^T || p_student^T), mean-seeking: Hinton et al. 2015's cross-entropy to the
  teacher's soft targets (sec. 2) less the teacher's entropy, which has no student gradient."""
  _validate(student_logits, teacher_logits, mask, temperature, 0.5)
  logp_s, logp_t, keep = _soften(student_logits, teacher_logits, mask, temperature)
  return _finish("forward_kl", _kl(logp_t, logp_s), logp_s, logp_t, keep, temperature, whole_mask)


def reverse_kl_loss(
    student_logits: jax.Array,  # [B, T, V]
    teacher_logits: jax.Array,  # [B, T, V]
    mask: jax.Array,  # [B, T]
    *,
    temperature: float = 1.0,
    whole_mask: jax.Array | None = None,  # [B', T]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """T^2 * KL(p_student^T || p_teacher^T), mode-seeking: the objective of MiniLLM (Gu et al. 2024),
  here token by token on given sequences rather than by policy gradient over sampled ones)."""
  _validate(student_logits, teacher_logits, mask, temperature, 0.5)
  logp_s, logp_t, keep = _soften(student_logits, teacher_logits, mask, temperature)
  return _finish("reverse_kl", _kl(logp_s, logp_t), logp_s, logp_t, keep, temperature, whole_mask)


def generalized_jsd_loss(
    student_logits: jax.Array,  # [B, T, V]
    teacher_logits: jax.Array,  # [B, T, V]
    mask: jax.Array,  # [B, T]
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    whole_mask: jax.Array | None = None,  # [B', T]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """T^2 * the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), in TRL's
  GKDTrainer convention (beta weighs the teacher, p = teacher, q = student):

    M = beta p + (1 - beta) q,   JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M).

  The mixture formula tends to 0 at both ends, so there the limits' normalized forms are used, as
  TRL does: beta = 0 is exactly the forward KL(p || q), beta = 1 exactly the reverse KL(q || p).
  The T^2 factor is not in the GKD paper; it is applied here so all kinds share one scale.
  """
  _validate(student_logits, teacher_logits, mask, temperature, beta)
  logp_s, logp_t, keep = _soften(student_logits, teacher_logits, mask, temperature)
  if beta == 0:
    per_token = _kl(logp_t, logp_s)
  elif beta == 1:
    per_token = _kl(logp_s, logp_t)
  else:
    log_m = _log_mixture(logp_t, logp_s, beta)
    per_token = beta * _kl(logp_t, log_m) + (1 - beta) * _kl(logp_s, log_m)
  return _finish("jsd", per_token, logp_s, logp_t, keep, temperature, whole_mask)


def distillation_loss(
    student_logits: jax.Array,  # [B, T, V]
    teacher_logits: jax.Array,  # [B, T, V]
    mask: jax.Array,  # [B, T]
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    whole_mask: jax.Array | None = None,  # [B', T]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One entry point for configs: kind is one of DISTILLATION_KINDS; beta is used by 'jsd' only."""
  if kind not in DISTILLATION_KINDS:
    raise ValueError(f"kind={kind!r} is not one of {DISTILLATION_KINDS}")
  _validate(student_logits, teacher_logits, mask, temperature, beta)
  if kind == "forward_kl":
    return forward_kl_loss(student_logits, teacher_logits, mask, temperature=temperature, whole_mask=whole_mask)
  if kind == "reverse_kl":
    return reverse_kl_loss(student_logits, teacher_logits, mask, temperature=temperature, whole_mask=whole_mask)
  return generalized_jsd_loss(student_logits, teacher_logits, mask, beta=beta, temperature=temperature,
                              whole_mask=whole_mask)
