"""DPO through the shared trainer on 8 fake devices: reference log-probs computed once and kept,
loss ln 2 at the start (policy = reference), the loss falls on a fixed batch, resume reads the
reference back."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model as model_lib
from align import dpo, preferences, tasks, run as align_run
from align.tasks import arithmetic
from configs import common
from configs.align.common import align_config
from rundir import tokenizer as tokenizer_lib
from train import trainer

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in arithmetic.preference_pairs(300, difficulty=2, seed=9)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  tokenizer_lib.train_tokenizer(texts, path, vocab_size=VOCAB)
  return path


def _config(tokenizer_path, method="dpo", **overrides):
  """The tiny run of these tests; tests/test_align_rrhf.py and tests/test_align_tpo.py run their methods on it."""
  config = align_config(method)
  config.total_steps = 3
  config.batch_size = 8
  config.seq_len = 96
  config.log_every = 1
  config.eval_every = 3
  config.eval_steps = 1
  config.checkpoint_every = 0
  config.model = common.model_config("tiny", num_layers=2, vocab_size=VOCAB)
  config.tokenizer.path = str(tokenizer_path)
  config.task.name = "arithmetic"
  config.task.train_size = 32
  config.task.eval_size = 8
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.mesh.data = 8
  config.update_from_flattened_dict(overrides)  # dotted keys: {"optimizer.learning_rate": 1e-3}
  return config


def assert_flops_per_step(workdir, per_step: float) -> None:
  """Every logged flops_seen is its step x per_step (no rollout: nothing made between steps)."""
  records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if "flops_seen" in r]
  assert logged
  for r in logged:
    assert r["flops_seen"] == pytest.approx(r["step"] * per_step, rel=1e-12), r["step"]


def _context(run):
  return trainer.DataContext(workdir=run.workdir, mesh=run.mesh, rules=run.rules)


@pytest.fixture(scope="module")
def dpo_run(tokenizer_path, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dpo")
  config = _config(tokenizer_path)
  run, _, _ = align_run.setup(config, workdir)
  return run, workdir


def test_reference_logps_are_the_starting_model_s(dpo_run):
  run, workdir = dpo_run
  reference = np.load(workdir / "reference_logps_train.npz")
  assert reference["chosen"].shape == (32,) and np.all(reference["chosen"] < 0)
  # Independently: the starting model's summed completion log-probs of the first pair.
  task = tasks.get_task(run.config.task)
  pair = preferences.pair_features(preferences.records(run.config, "train", task)[0], run.tokenizer, seq_len=96)
  logits = np.asarray(run.model()(pair["chosen_tokens"][None]), np.float64)[0]
  logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  picked = logprobs[np.arange(96), pair["chosen_targets"]]
  np.testing.assert_allclose(reference["chosen"][0], (picked * pair["chosen_mask"]).sum(), rtol=1e-4)
  assert (workdir / "reference_logps_eval.npz").exists()


def test_loss_starts_at_ln2_and_falls_on_a_fixed_batch(dpo_run):
  run, _ = dpo_run
  batch = trainer.global_batch(run, next(run.train_iter))
  state, losses = jax.tree.map(jnp.copy, run.state), []  # the step donates its state; run.state stays usable
  for _ in range(6):
    state, metrics = run.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference at step 0
  assert float(metrics["rewards/margins"]) > 0 and losses[-1] < losses[0] - 0.05


def test_dpo_through_align_run_and_resume(tokenizer_path, tmp_path):
  result = align_run.run(_config(tokenizer_path), tmp_path)
  assert result["step"] == 3 and np.isfinite(result["loss"]) and "rewards/accuracies" in result
  written = (tmp_path / "reference_logps_train.npz").stat().st_mtime_ns
  resumed = align_run.run(_config(tokenizer_path, total_steps=4), tmp_path)  # resumes; must not recompute
  assert resumed["step"] == 4
  assert (tmp_path / "reference_logps_train.npz").stat().st_mtime_ns == written
  # FLOPs: per pair, chosen and rejected trained (forward + backward) and read once by the reference (forward:
  # a third), over 96-token rows; the resumed steps counted on.
  per_token = model_lib.flops_per_token(result["run"].model_config, 96)
  assert_flops_per_step(tmp_path, 8 * (2 * 96 * per_token + 2 * 96 * per_token / 3))
  assert "reference" in json.loads((tmp_path / trainer.SUMMARY_FILE).read_text())["flops_note"]


def test_ai_feedback_pairs_come_from_the_starting_policy(tokenizer_path, tmp_path):
  # A random policy never solves a problem, so the exact-match judge scores all its samples alike:
  # the run must say so instead of training on nothing.
  config = _config(tokenizer_path, **{"dpo.pairs": "ai_feedback", "task.train_size": 4, "task.accuracy_tokens": 6})
  with pytest.raises(ValueError, match="AI feedback found no prompt"):
    align_run.run(config, tmp_path)


def test_rpo_adds_the_chosen_nll(dpo_run):
  run, _ = dpo_run
  batch = {k: np.asarray(v) for k, v in next(iter(run.make_dataset(run.config, run.tokenizer, split="eval",
                                                                    context=_context(run)))).items()}
  model = run.model()
  plain, _ = dpo.dpo_loss_fn(model, batch, None, beta=0.1, label_smoothing=0.0, loss_type="sigmoid", gamma=0.0)
  rpo, metrics = dpo.dpo_loss_fn(model, batch, None, beta=0.1, label_smoothing=0.0, loss_type="sigmoid", gamma=0.0,
                                 sft_coef=0.5)
  logits = np.asarray(model(batch["chosen_tokens"]), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, batch["chosen_targets"][..., None], -1)[..., 0]
  per_token = (nll * batch["chosen_mask"]).sum(-1) / batch["chosen_mask"].sum(-1)
  np.testing.assert_allclose(float(rpo) - float(plain), 0.5 * per_token.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["nll/chosen"], per_token.mean(), rtol=1e-4)


def test_orpo_on_the_trainer_batch_matches_its_closed_form(dpo_run):
  """ORPO through the trainer's loss (reference-free): mean chosen NLL - beta * log sigmoid of the
  log odds ratio, odds = p / (1 - p) with p the per-token mean probability, computed here in float64."""
  run, _ = dpo_run
  batch = {k: np.asarray(v) for k, v in next(iter(run.make_dataset(run.config, run.tokenizer, split="eval",
                                                                    context=_context(run)))).items()}
  model = run.model()
  loss, metrics = dpo.dpo_loss_fn(model, batch, None, beta=0.25, label_smoothing=0.0, loss_type="orpo", gamma=0.0)

  def mean_logps(side):
    logits = np.asarray(model(batch[f"{side}_tokens"]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch[f"{side}_targets"][..., None], -1)[..., 0] - logz
    return (picked * batch[f"{side}_mask"]).sum(-1) / batch[f"{side}_mask"].sum(-1)

  chosen, rejected = mean_logps("chosen"), mean_logps("rejected")
  log_odds = lambda m: m - np.log1p(-np.exp(m))  # noqa: E731
  ratio = log_odds(chosen) - log_odds(rejected)
  expected = np.mean(-chosen + 0.25 * np.log1p(np.exp(-ratio)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["log_odds_ratio"]), ratio.mean(), rtol=1e-4, atol=1e-6)
