"""Gradient accumulation is exact for every method's loss: one train step with grad_accum_steps=4
updates the parameters, and reports the loss, as one step over the whole batch does.

SGD with learning rate 1 (Adam's first step would normalize the gradient's scale away and hide a
wrong weighting of the micro-batches); float32; a ragged batch whose rows hold different numbers of
tokens, with one row (one pair) that is all padding, so that combining micro-batches by anything
but each loss's own normalizer shows. One jit per loss computes both updates.
"""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from align import distill, dpo, grpo, ppo, rest, reward_model, sft
from configs.align.common import align_config
from model import Transformer, get_preset
from train import losses as train_losses
from train import step as step_lib
from train import trainer

B, T, V, ACCUM = 8, 12, 64, 4
MODEL = get_preset("tiny", vocab_size=V, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                   mlp_dim=64, dtype="float32", param_dtype="float32", scan_layers=False)
# Prompt and completion lengths per row; row 3 is all padding. Micro-batch i holds rows i and i + 4.
PROMPTS = (2, 1, 3, 0, 1, 4, 2, 1)
COMPLETIONS = (1, 9, 3, 0, 8, 2, 10, 5)
OTHER_COMPLETIONS = (6, 2, 7, 0, 1, 5, 3, 9)  # the rejected side, step_by_step's rationales
TOLERANCE = 1e-6
# XLA's quickest CPU compilation (the file compiles a program per loss, which dominates its time):
# the two updates compared come from one program, so they are compiled alike.
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mask(completions):
  mask = np.zeros((B, T), np.int32)
  for b, (p, c) in enumerate(zip(PROMPTS, completions)):
    mask[b, p:p + c] = 1
  return mask


def _batches() -> dict[str, dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)

  def tokens():
    return rng.integers(1, V, (B, T)).astype(np.int32)

  def normal(*shape, scale=1.0):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  def logprobs():  # near a fresh model's, so the ratios are mostly inside the clip range
    return normal(B, T, scale=0.1) - np.log(V)

  def next_token(completions, prefix=""):
    fields = {"tokens": tokens(), "targets": tokens(), "loss_mask": _mask(completions),
              "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
              "segment_ids": np.ones((B, T), np.int32)}
    return {prefix + k: v for k, v in fields.items()}

  def pair_side(side, completions):
    return {f"{side}_tokens": tokens(), f"{side}_targets": tokens(), f"{side}_mask": _mask(completions)}

  counts = np.asarray(COMPLETIONS, np.float32), np.asarray(OTHER_COMPLETIONS, np.float32)
  sampled = {"tokens": tokens(), "targets": tokens(), "mask": _mask(COMPLETIONS), "old_logprobs": logprobs(),
             "score": normal(B)}
  return {
      "next_token": next_token(COMPLETIONS),
      "step_by_step": {**next_token(COMPLETIONS, "answer_"), **next_token(OTHER_COMPLETIONS, "rationale_")},
      "pairs": {**pair_side("chosen", COMPLETIONS), **pair_side("rejected", OTHER_COMPLETIONS),
                "reference_chosen_logps": -np.log(V) * counts[0] + normal(B),
                "reference_rejected_logps": -np.log(V) * counts[1] + normal(B), "margin": normal(B)},
      "grpo": {**sampled, "ref_logprobs": logprobs(), "advantages": normal(B)},
      "ppo": {**sampled, "old_values": normal(B, T, scale=0.5), "advantages": normal(B, T),
              "returns": normal(B, T), "kl": normal(B), "kl_coef": np.full(B, 0.05, np.float32)},
      "distill": {"tokens": tokens(), "mask": _mask(COMPLETIONS)},
  }


BATCHES = _batches()


def _decoder(seed: int) -> Transformer:
  return Transformer(MODEL, rngs=nnx.Rngs(seed))


def _head(seed: int) -> jax.Array:
  return 0.1 * jax.random.normal(jax.random.key(seed), (MODEL.embed_dim,))


MODULES = {  # how each method's trainer wraps the decoder (a frozen reference or teacher rides along)
    "decoder": lambda: _decoder(0),
    "reward": lambda: reward_model.RewardModel(_decoder(0), _head(1)),
    "policy_value": lambda: ppo.PolicyValue(_decoder(0), _head(1), _decoder(2)),
    "policy_reference": lambda: grpo.PolicyWithReference(_decoder(0), _decoder(2)),
    "distiller": lambda: distill.Distiller(_decoder(0), _decoder(2)),
}


def _config(method: str, **overrides):
  config = align_config(method)
  config.update_from_flattened_dict(overrides)  # dotted keys: {"grpo.aggregation": "token_mean"}
  return config


def _cases():
  """{id: (module, loss_fn, batch)}, each loss built as its method builds it."""
  cases = {
      "pretrain_z_loss": ("decoder", functools.partial(train_losses.next_token_loss, z_loss=1e-2), "next_token"),
      # SFT and ReST train on pre-training's loss: the same program, compiled once (the compilation cache).
      "sft": ("decoder", sft.loss_fn(_config("sft", z_loss=1e-2)), "next_token"),
      "rest": ("decoder", rest.loss_fn(_config("rest", z_loss=1e-2)), "next_token"),
      "reward": ("reward", reward_model.loss_fn(_config("reward", **{"reward.center_coef": 0.1,
                                                                     "reward.use_margin": True})), "pairs"),
      "ppo": ("policy_value", ppo.loss_fn(_config("ppo")), "ppo"),
  }
  for loss_type in dpo.LOSS_TYPES:
    cases[f"dpo_{loss_type}"] = ("decoder", dpo.loss_fn(_config("dpo", **{"dpo.loss_type": loss_type,
                                                                         "dpo.label_smoothing": 0.1})), "pairs")
  cases["dpo_rpo"] = ("decoder", dpo.loss_fn(_config("dpo", **{"dpo.sft_coef": 0.5})), "pairs")
  # The KL term goes through the same aggregation as the surrogate: with it once, for its frozen reference.
  for aggregation, kl_coef in [(a, 0.0) for a in grpo.AGGREGATIONS] + [("sequence_mean", 0.1)]:
    config = _config("grpo", **{"grpo.aggregation": aggregation, "grpo.kl_coef": kl_coef, "rl.max_new_tokens": T})
    module = "policy_reference" if kl_coef else "decoder"
    cases[f"grpo_{aggregation}_kl{kl_coef}"] = (module, grpo.loss_fn(config), "grpo")
  for kind in distill.KINDS:
    config = _config("distill", **{"distill.kind": kind, "distill.temperature": 2.0, "distill.beta": 0.3,
                                   "distill.rationale_weight": 0.5})
    batch = {"sequence": "next_token", "step_by_step": "step_by_step"}.get(kind, "distill")
    cases[f"distill_{kind}"] = ("distiller", distill.loss_fn(config), batch)
  return cases


CASES = _cases()


def _split(module_name):
  return nnx.split(MODULES[module_name](), trainer.TRAINABLE, ...)


@pytest.mark.parametrize("name", CASES)
def test_accumulated_step_equals_the_whole_batch_step(name):
  module_name, loss_fn, batch_name = CASES[name]
  graphdef, params, untrained = _split(module_name)
  batch = BATCHES[batch_name]
  optimizer = optax.sgd(1.0)
  steps = [step_lib.make_train_step(graphdef, loss_fn, optimizer, optax.constant_schedule(1.0), grad_accum_steps=a)
           for a in (1, ACCUM)]
  state = step_lib.init_state(params, optimizer, seed=0)
  both = jax.jit(lambda state, untrained, batch: [step(state, untrained, batch) for step in steps])
  both = both.lower(state, untrained, batch).compile(QUICK_COMPILE)
  (whole, whole_metrics), (accumulated, accumulated_metrics) = both(state, untrained, batch)

  assert float(whole_metrics["grad_norm"]) > 1e-3  # the comparison below is not of two zeros
  assert float(whole_metrics["skipped"]) == 0.0
  updates = [jax.tree.map(lambda new, old: np.asarray(new - old), s["params"], state["params"])
             for s in (whole, accumulated)]
  for path, got in jax.tree_util.tree_leaves_with_path(updates[1]):
    expected = dict(jax.tree_util.tree_leaves_with_path(updates[0]))[path]
    scale = max(1.0, float(np.abs(expected).max()))  # float32 sums in another order: relative to the update's size
    np.testing.assert_allclose(got, expected, atol=TOLERANCE * scale, rtol=0, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(accumulated_metrics["loss"], whole_metrics["loss"], atol=TOLERANCE, rtol=TOLERANCE)
  # Throughput counts the tokens that count, whatever the loss's normalizer is.
  tokens = sum(int(v.sum()) for k, v in batch.items() if k.endswith("mask"))
  assert float(whole_metrics["tokens"]) == float(accumulated_metrics["tokens"]) == tokens


def test_token_weighted_micro_batches_would_fail_the_check():
  """Why the check above is sharp: averaging the micro-batches' own losses weighted by their token
  counts (the old rule) moves GRPO's sequence-mean gradient by far more than TOLERANCE here."""
  loss_fn = grpo.loss_fn(_config("grpo", **{"grpo.aggregation": "sequence_mean"}))
  graphdef, params, untrained = _split("decoder")

  @jax.jit
  def grad(batch):  # the gradient of the batch's own loss, as if it were the whole batch
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, untrained), batch, None)[0])(params)

  batch = BATCHES["grpo"]
  micro = [jax.tree.map(lambda x, i=i: x[i::ACCUM], batch) for i in range(ACCUM)]
  tokens = [float(m["mask"].sum()) for m in micro]
  token_weighted = jax.tree.map(lambda *g: sum(t * x for t, x in zip(tokens, g)) / sum(tokens),
                                *[grad(m) for m in micro])
  error = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(token_weighted), jax.tree.leaves(grad(batch))))
  assert error > 1000 * TOLERANCE
