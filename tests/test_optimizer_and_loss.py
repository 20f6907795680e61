"""Schedules against their closed forms, the weight-decay mask, and the loss against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
from configs import common
from train import losses, optimizer


def _config(**overrides):
  config = common.optimizer_config()
  config.update({**dict(learning_rate=1.0, warmup_steps=10, min_learning_rate_ratio=0.1), **overrides})
  return config


def test_warmup_cosine_schedule():
  schedule = optimizer.make_schedule(_config(schedule="warmup_cosine"), total_steps=110)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  for step in (10, 35, 60, 110):
    progress = (step - 10) / 100
    assert float(schedule(step)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-6)


def test_warmup_linear_schedule():
  schedule = optimizer.make_schedule(_config(schedule="warmup_linear"), total_steps=110)
  assert float(schedule(60)) == pytest.approx(1.0 - 0.9 * 0.5, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.1, abs=1e-6)


def test_warmup_stable_decay_schedule():
  schedule = optimizer.make_schedule(_config(schedule="wsd", decay_steps=20), total_steps=110)
  assert float(schedule(10)) == float(schedule(89)) == 1.0  # flat until the last 20 steps
  assert float(schedule(100)) == pytest.approx(1.0 - 0.9 * 0.5, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("key,value,message", [
    ("schedule", "cosine", "config.optimizer.schedule='cosine'"),
    ("name", "sgd", "config.optimizer.name='sgd'"),
])
def test_bad_optimizer_config_names_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    optimizer.make_optimizer(_config(**{key: value}), total_steps=100)


def test_weight_decay_skips_norms_biases_and_embeddings_by_default():
  params = nnx.state(model.Transformer(model.get_preset("tiny", qkv_bias=True), rngs=nnx.Rngs(0)), nnx.Param)
  mask = optimizer.weight_decay_mask(_config())(params)
  decayed = {jax.tree_util.keystr(p): bool(v) for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert not any(v for k, v in decayed.items() if "norm" in k or "'b" in k or "embedding" in k)
  assert all(v for k, v in decayed.items() if "'w" in k or "lm_head" in k)


@pytest.mark.parametrize("name", optimizer.OPTIMIZERS)
def test_every_optimizer_decreases_a_quadratic(name):
  tx, _ = optimizer.make_optimizer(_config(name=name, learning_rate=0.05, warmup_steps=0, weight_decay=0.0), 100)
  params = {"w": jnp.full((4, 4), 3.0)}
  state = tx.init(params)
  for _ in range(20):
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  assert float(jnp.sum(params["w"] ** 2)) < 0.8 * 16 * 9


class _FixedLogits(nnx.Module):
  def __init__(self, logits):
    self.logits = nnx.Param(logits)

  def __call__(self, tokens, *, positions, segment_ids):
    del tokens, positions, segment_ids
    return self.logits[...]


def test_next_token_loss_and_z_loss_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  batch = {"tokens": jnp.zeros((2, 5), jnp.int32), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
           "positions": jnp.zeros((2, 5), jnp.int32), "segment_ids": jnp.ones((2, 5), jnp.int32)}
  loss, metrics = losses.next_token_loss(_FixedLogits(jnp.asarray(logits)), batch, None, z_loss=1e-2)
  x = logits.astype(np.float64)
  log_z = np.log(np.exp(x).sum(-1))
  nll = log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]
  ce = (nll * mask).sum() / mask.sum()
  z = (log_z**2 * mask).sum() / mask.sum()
  assert float(metrics["weight"]) == 8
  np.testing.assert_allclose(float(metrics["cross_entropy"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ce + 1e-2 * z, rtol=1e-5)
