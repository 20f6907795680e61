"""Reward models: the decoder with a scalar head, scored at each sequence's last real token, trained
with the Bradley-Terry loss of align.losses.reward_loss (margin, reward centering) on pairs.

The pairs and their batches are DPO's (align/dpo.py): chosen_/rejected_ tokens and masks [B, T];
a sequence's last real token is the last input position whose target is real (the mask covers the
completion, which ends the sequence), so right padding, whatever it holds, never changes a score.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import model as model_lib
import rundir
from align import data, losses, preferences
from align.method import Method, check_choice
from align.tasks import Task
from model import sharding


class RewardModel(nnx.Module):
  """`model(tokens [B, T], last [B]) -> rewards [B]` float32: the head on the final-normed features."""

  def __init__(self, decoder: nnx.Module, head: jax.Array):
    self.decoder = decoder
    self.config = decoder.config
    self.head = nnx.Param(head, out_sharding=("embed",), eager_sharding=False)  # [D]

  def __call__(self, tokens: jax.Array, last: jax.Array) -> jax.Array:
    features, _ = self.decoder.features(tokens)  # [B, T, D]
    at_last = jnp.take_along_axis(features, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return jnp.einsum("BD,D->B", at_last.astype(jnp.float32), self.head[...].astype(jnp.float32))


def wrap(decoder: nnx.Module, *, mesh, rules, **unused) -> RewardModel:
  """A zero head (every reward starts at 0: the loss starts at ln 2 and gradients reach the head first)."""
  del unused
  d = decoder.config.embed_dim
  spec = sharding.logical_to_spec(("embed",), (d,), mesh, rules)
  return RewardModel(decoder, jax.device_put(jnp.zeros((d,), jnp.float32), NamedSharding(mesh, spec)))


def last_index(mask: jax.Array) -> jax.Array:
  """[B, T] target mask -> [B] index of the last input whose target is real."""
  positions = jnp.arange(mask.shape[1])
  return jnp.max(jnp.where(mask > 0, positions, 0), axis=1)


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  """DPO's pairs without reference log-probs (a reward model needs none)."""
  del context
  rows = [preferences.pair_features(r, tokenizer, seq_len=config.seq_len)
          for r in preferences.records(config, split, task)]
  return preferences.batched(rows, config, split)


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  del task
  check_choice(config, "dpo.on_error", data.ON_ERROR)


def reward_loss_fn(model, batch, rng, *, center_coef: float, use_margin: bool, whole_batch=None):
  """Bradley-Terry over the pairs that count, their number counted on the whole batch (train.step.LossFn)."""
  del rng
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  rewards = model(tokens, last_index(mask))
  pairs = batch["chosen_tokens"].shape[0]
  pair_mask = losses.pairs_that_count(batch["chosen_mask"], batch["rejected_mask"])
  whole = batch if whole_batch is None else whole_batch
  loss, metrics = losses.reward_loss(
      rewards[:pairs], rewards[pairs:], margin=batch["margin"] if use_margin else None, center_coef=center_coef,
      pair_mask=pair_mask, whole_pair_mask=losses.pairs_that_count(whole["chosen_mask"], whole["rejected_mask"]))
  metrics["weight"] = jnp.sum(pair_mask).astype(jnp.float32)
  metrics["tokens"] = jnp.sum(mask > 0).astype(jnp.float32)
  return loss, metrics


def loss_fn(config: ml_collections.ConfigDict):
  c = config.reward
  return functools.partial(reward_loss_fn, center_coef=c.center_coef, use_margin=c.use_margin)


@functools.partial(jax.jit, static_argnames="graphdef")
def _rewards(graphdef, state, tokens, last):
  return nnx.merge(graphdef, state)(tokens, last)


def score(model: RewardModel, tokenizer, prompts: list[str], completions: list[str], *, seq_len: int,
          batch_size: int = 64) -> np.ndarray:
  """[R] rewards of (prompt, completion) texts, batch_size rows per jitted call (the last one padded)."""
  rows = [preferences.pair_features({"prompt": p, "chosen": c, "rejected": c}, tokenizer, seq_len=seq_len)
          for p, c in zip(prompts, completions)]
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start: start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    tokens = jnp.asarray(np.stack([r["chosen_tokens"] for r in chunk]))
    last = last_index(jnp.asarray(np.stack([r["chosen_mask"] for r in chunk])))
    out.append(sharding.to_host(_rewards(graphdef, state, tokens, last))[: len(rows) - start])
  return np.concatenate(out)


def load(path, *, mesh, rules) -> RewardModel:
  """The reward model (decoder and head) of a reward-model run's latest checkpoint, sharded on `mesh`."""
  def build(config):
    return RewardModel(model_lib.Transformer(config, rngs=nnx.Rngs(0)), jnp.zeros((config.embed_dim,), jnp.float32))

  module, _ = rundir.restore_module(path, build, mesh=mesh, rules=rules, decoder_only=False)
  return module


METHOD = Method(name="reward", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, wrap=wrap, generates=False,
                row_flops=preferences.row_flops)
