"""Reward models: the score is read at the last real token whatever the padding, and Bradley-Terry
training through the shared trainer starts at ln 2 (zero head) and separates chosen from rejected."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model as model_lib
from align import reward_model, run as align_run
from align.tasks import arithmetic
from configs import common
from configs.align.common import align_config
from model import Transformer, get_preset
from rundir import tokenizer as tokenizer_lib
from tests import test_align_dpo
from train import trainer

VOCAB = 320


def test_scores_the_last_real_token_whatever_the_padding():
  decoder = Transformer(get_preset("tiny").replace(dtype="float32", param_dtype="float32"), rngs=nnx.Rngs(0))
  head = jax.random.normal(jax.random.key(1), (decoder.config.embed_dim,))
  model = reward_model.RewardModel(decoder, head)
  rng = np.random.default_rng(0)
  lengths = [5, 9, 3]
  sequences = [rng.integers(1, 200, n) for n in lengths]
  expected = [float(np.asarray(decoder.features(jnp.asarray(s)[None])[0])[0, -1] @ np.asarray(head)) for s in sequences]
  for fill in (0, 7, None):  # zeros, a constant, random garbage after the last token
    tokens = np.zeros((3, 12), np.int32)
    mask = np.zeros((3, 12), np.int32)
    for b, s in enumerate(sequences):
      tokens[b, : len(s)] = s
      tokens[b, len(s):] = rng.integers(1, 200, 12 - len(s)) if fill is None else fill
      mask[b, 1: len(s)] = 1  # the last real target (eos) belongs to the sequence's last input
    rewards = model(jnp.asarray(tokens), reward_model.last_index(jnp.asarray(mask)))
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in arithmetic.preference_pairs(300, difficulty=2, seed=9)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  tokenizer_lib.train_tokenizer(texts, path, vocab_size=VOCAB)
  return path


def test_reward_model_trains_through_the_shared_trainer(tokenizer_path, tmp_path):
  config = align_config("reward")
  config.total_steps = 2
  config.batch_size = 8
  config.seq_len = 96
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 0
  config.model = common.model_config("tiny", num_layers=2, vocab_size=VOCAB)
  config.tokenizer.path = str(tokenizer_path)
  config.task.name = "arithmetic"
  config.task.train_size = 32
  config.reward.center_coef = 0.01
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.mesh.data = 8
  result = align_run.run(config, tmp_path)
  assert result["step"] == 2 and "accuracy" in result
  run = result["run"]
  # FLOPs: a row is a pair, chosen and rejected trained over 96 tokens (the head's 2 D per token aside).
  test_align_dpo.assert_flops_per_step(tmp_path, 8 * 2 * 96 * model_lib.flops_per_token(run.model_config, 96))
  assert isinstance(run.model(), reward_model.RewardModel)
  # Fresh head: rewards 0, loss ln 2; on a fixed batch the loss falls and chosen pulls ahead.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if "head" in jax.tree_util.keystr(path) else x, run.state["params"])
  state = {**run.state, "params": params}
  batch = trainer.global_batch(run, next(run.train_iter))
  losses = []
  for _ in range(6):
    state, metrics = run.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
  assert losses[-1] < losses[0] - 0.05 and float(metrics["rewards/margins"]) > 0
