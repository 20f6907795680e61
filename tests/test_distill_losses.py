"""Distillation losses against an independent float64 numpy reference and closed forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import distill_losses as dl

B, T, V = 3, 5, 11
RNG = np.random.default_rng(0)
STUDENT = RNG.normal(0, 2, (B, T, V)).astype(np.float32)
TEACHER = RNG.normal(0, 2, (B, T, V)).astype(np.float32)
# Ragged: a prompt at the start of rows 0 and 1, padding at the end of rows 1 and 2.
MASK = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.int32)
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]


# --- the reference: plain probabilities, no log-space tricks, no jax -----------------------------

def _softmax_ref(logits, temperature=1.0):
  z = np.asarray(logits, np.float64) / temperature
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl_ref(p, q):
  """sum_V p log(p / q), [B, T], over the support of p (0 log 0 = 0)."""
  ratio = np.where(p > 0, p / np.where(p > 0, q, 1.0), 1.0)
  return np.sum(np.where(p > 0, p * np.log(ratio), 0.0), -1)


def _divergence_ref(student, teacher, kind, beta, temperature=1.0):
  p, q = _softmax_ref(teacher, temperature), _softmax_ref(student, temperature)  # teacher, student
  if kind == "forward_kl" or (kind == "jsd" and beta == 0):
    return _kl_ref(p, q)
  if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
    return _kl_ref(q, p)
  m = beta * p + (1 - beta) * q
  return beta * _kl_ref(p, m) + (1 - beta) * _kl_ref(q, m)


def _loss_ref(student, teacher, mask, kind, beta, temperature=1.0):
  per_token = _divergence_ref(student, teacher, kind, beta, temperature)
  return temperature**2 * per_token[mask.astype(bool)].mean()


def _loss(student, teacher, mask, kind, beta, temperature=1.0):
  return dl.distillation_loss(student, teacher, mask, kind=kind, beta=beta, temperature=temperature)


def _name(kind):
  return f"distill/{kind}"


# --- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, beta", KINDS)
def test_matches_reference(kind, beta):
  loss, metrics = _loss(STUDENT, TEACHER, MASK, kind, beta)
  expected = _loss_ref(STUDENT, TEACHER, MASK, kind, beta)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics[_name(kind)], expected, rtol=1e-5)
  assert float(metrics["weight"]) == MASK.sum()
  keep = MASK.astype(bool)
  agree = (STUDENT.argmax(-1) == TEACHER.argmax(-1))[keep].mean()
  np.testing.assert_allclose(metrics["distill/teacher_student_agreement"], agree, rtol=1e-6)


def test_public_functions_agree_with_the_dispatcher():
  fwd, _ = dl.forward_kl_loss(STUDENT, TEACHER, MASK, temperature=1.5)
  rev, _ = dl.reverse_kl_loss(STUDENT, TEACHER, MASK, temperature=1.5)
  jsd, _ = dl.generalized_jsd_loss(STUDENT, TEACHER, MASK, beta=0.3, temperature=1.5)
  for got, (kind, beta) in zip((fwd, rev, jsd), (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3))):
    np.testing.assert_allclose(got, _loss_ref(STUDENT, TEACHER, MASK, kind, beta, 1.5), rtol=1e-5)


@pytest.mark.parametrize("kind, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_temperature_softens_both_and_scales_by_t_squared(kind, beta):
  loss2, metrics2 = _loss(STUDENT, TEACHER, MASK, kind, beta, temperature=2.0)
  divergence2 = _divergence_ref(STUDENT, TEACHER, kind, beta, 2.0)[MASK.astype(bool)].mean()
  np.testing.assert_allclose(loss2, 4.0 * divergence2, rtol=1e-5)
  np.testing.assert_allclose(metrics2[_name(kind)], divergence2, rtol=1e-5)  # the metric is unscaled
  # Softening shrinks the divergence itself, so the T^2 is what keeps the two losses comparable.
  loss1, _ = _loss(STUDENT, TEACHER, MASK, kind, beta, temperature=1.0)
  assert float(metrics2[_name(kind)]) < float(loss1)


@pytest.mark.parametrize("kind, beta", KINDS)
def test_zero_when_the_student_is_the_teacher(kind, beta):
  loss, metrics = _loss(TEACHER, TEACHER, MASK, kind, beta, temperature=1.7)
  assert abs(float(loss)) < 1e-6
  assert float(metrics["distill/teacher_student_agreement"]) == 1.0


def test_jsd_is_symmetric_at_beta_one_half():
  a, _ = _loss(STUDENT, TEACHER, MASK, "jsd", 0.5)
  b, _ = _loss(TEACHER, STUDENT, MASK, "jsd", 0.5)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # ... and not at other betas, where swapping the roles is the same as beta -> 1 - beta.
  c, _ = _loss(TEACHER, STUDENT, MASK, "jsd", 0.7)
  np.testing.assert_allclose(c, _loss_ref(STUDENT, TEACHER, MASK, "jsd", 0.3), rtol=1e-5)


def test_empty_mask_gives_zero():
  loss, metrics = _loss(STUDENT, TEACHER, np.zeros_like(MASK), "jsd", 0.5)
  assert float(loss) == 0.0 and float(metrics["weight"]) == 0.0


def test_bfloat16_logits_are_computed_in_float32():
  s, t = jnp.asarray(STUDENT, jnp.bfloat16), jnp.asarray(TEACHER, jnp.bfloat16)
  loss, _ = _loss(s, t, MASK, "forward_kl", 0.5)
  assert loss.dtype == jnp.float32
  expected = _loss_ref(np.asarray(s, np.float32), np.asarray(t, np.float32), MASK, "forward_kl", 0.5)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


# --- gradients and masking -----------------------------------------------------------------------

def _grad_fn(kind, beta, temperature=1.0):
  fn = functools.partial(dl.distillation_loss, kind=kind, beta=beta, temperature=temperature)
  return jax.jit(jax.value_and_grad(lambda s, t, m: fn(s, t, m)[0]))


def test_forward_kl_gradient_is_the_closed_form():
  _, grad = _grad_fn("forward_kl", 0.5)(STUDENT, TEACHER, MASK)
  keep = MASK.astype(bool)[..., None]
  expected = np.where(keep, (_softmax_ref(STUDENT) - _softmax_ref(TEACHER)) / MASK.sum(), 0.0)
  np.testing.assert_allclose(grad, expected, atol=1e-7)
  assert np.all(np.asarray(grad)[~MASK.astype(bool)] == 0.0)


def test_the_teacher_is_a_fixed_target():
  grad = jax.grad(lambda t: dl.generalized_jsd_loss(STUDENT, t, MASK, beta=0.3)[0])(jnp.asarray(TEACHER))
  assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("kind, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_masked_positions_with_garbage_change_nothing(kind, beta):
  off = ~MASK.astype(bool)
  garbage = np.resize(np.array([np.inf, -np.inf, np.nan, 1e30, -1e30], np.float32), (int(off.sum()), V))
  dirty_s, dirty_t = STUDENT.copy(), TEACHER.copy()
  dirty_s[off], dirty_t[off] = garbage, garbage[::-1]
  grad_fn = _grad_fn(kind, beta)
  clean_loss, clean_grad = grad_fn(STUDENT, TEACHER, MASK)
  dirty_loss, dirty_grad = grad_fn(dirty_s, dirty_t, MASK)
  assert np.isfinite(dirty_loss) and np.all(np.isfinite(dirty_grad))
  np.testing.assert_array_equal(dirty_loss, clean_loss)
  np.testing.assert_array_equal(dirty_grad, clean_grad)
  assert np.all(np.asarray(dirty_grad)[off] == 0.0)


@pytest.mark.parametrize("kind, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_filtered_vocabulary_of_both_gives_no_nan(kind, beta):
  # Entries 0-2 are filtered out (-inf) for both models on every token: zero probability on both
  # sides, so the divergences are those over the remaining 8 entries.
  student, teacher = STUDENT.copy(), TEACHER.copy()
  student[..., :3] = teacher[..., :3] = -np.inf
  loss, grad = _grad_fn(kind, beta)(student, teacher, MASK)
  expected = _loss_ref(STUDENT[..., 3:], TEACHER[..., 3:], MASK, kind, beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., :3] == 0.0)


def test_forward_kl_with_a_top_k_teacher_ignores_its_zeros():
  # The teacher alone gives zero probability to entries 0-2: forward KL only sums over its support.
  teacher = TEACHER.copy()
  teacher[..., :3] = -np.inf
  loss, grad = _grad_fn("forward_kl", 0.5)(STUDENT, teacher, MASK)
  np.testing.assert_allclose(loss, _loss_ref(STUDENT, teacher, MASK, "forward_kl", 0.5), rtol=1e-5)
  assert np.all(np.isfinite(grad))
  # Reverse KL is truly infinite there: the student puts mass where the teacher has none.
  reverse, _ = _loss(STUDENT, teacher, MASK, "reverse_kl", 0.5)
  assert float(reverse) == np.inf


# --- validation ----------------------------------------------------------------------------------

def test_bad_arguments_name_the_value():
  with pytest.raises(ValueError, match="kind='kl'"):
    dl.distillation_loss(STUDENT, TEACHER, MASK, kind="kl")
  with pytest.raises(ValueError, match="temperature=0"):
    dl.distillation_loss(STUDENT, TEACHER, MASK, kind="forward_kl", temperature=0.0)
  with pytest.raises(ValueError, match="temperature=-1"):
    dl.reverse_kl_loss(STUDENT, TEACHER, MASK, temperature=-1.0)
  with pytest.raises(ValueError, match="beta=1.5"):
    dl.distillation_loss(STUDENT, TEACHER, MASK, kind="jsd", beta=1.5)
  with pytest.raises(ValueError, match="beta=-0.1"):
    dl.generalized_jsd_loss(STUDENT, TEACHER, MASK, beta=-0.1)
  with pytest.raises(ValueError, match=r"\(3, 5, 11\).*\(3, 5, 12\)"):
    dl.forward_kl_loss(STUDENT, np.zeros((B, T, V + 1), np.float32), MASK)
  with pytest.raises(ValueError, match=r"\(3, 5, 11\).*\(3, 4, 11\)"):
    dl.forward_kl_loss(STUDENT, TEACHER[:, :4], MASK)
  with pytest.raises(ValueError, match=r"mask.shape=\(3, 4\)"):
    dl.forward_kl_loss(STUDENT, TEACHER, MASK[:, :4])
