"""SFT through the shared trainer on 8 fake devices: the run works end to end (with accuracy
measured by generation), the loss falls on a fixed batch, and masked targets and padding carry
no gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rundir
from align import data, evaluation, run as align_run, tasks
from align.tasks import arithmetic
from configs import common
from configs.align.common import align_config
from rundir import tokenizer as tokenizer_lib
from train import losses, plot, trainer

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  texts = [r["prompt"] + r["completion"] for r in arithmetic.sft_examples(400, difficulty=2, seed=9)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  tokenizer_lib.train_tokenizer(texts, path, vocab_size=VOCAB)
  return path


def _config(tokenizer_path, **overrides):
  config = align_config("sft")
  config.total_steps = 4
  config.batch_size = 8
  config.seq_len = 96
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 0
  config.model = common.model_config("tiny", num_layers=2, vocab_size=VOCAB)
  config.tokenizer.path = str(tokenizer_path)
  config.task.name = "arithmetic"
  config.task.train_size = 64
  config.task.eval_size = 16
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 1
  config.optimizer.schedule = "constant"  # the fixed-batch test steps on past total_steps
  config.mesh.data = 8
  config.update_from_flattened_dict(overrides)  # dotted keys: {"optimizer.learning_rate": 1e-3}
  return config


@pytest.fixture(scope="module")
def sft_run(tokenizer_path, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft")
  overrides = {"task.accuracy_problems": 4, "task.accuracy_tokens": 8, "task.score_every": 3}
  return align_run.run(_config(tokenizer_path, **overrides), workdir), workdir


def test_sft_runs_through_the_shared_trainer(sft_run):
  result, workdir = sft_run
  assert result["step"] == 4 and np.isfinite(result["loss"])
  assert 0.0 <= result["accuracy_before"] <= 1.0 and 0.0 <= result["accuracy_after"] <= 1.0
  assert (workdir / "checkpoints" / "4").is_dir()


def test_held_out_scores_are_recorded_along_the_run(sft_run):
  """task.score_every: the scores at step 0, every N steps and at the last, as eval_ records that train.plot reads."""
  result, workdir = sft_run
  config = result["run"].config
  records = plot.load_run(workdir).eval
  assert [r["step"] for r in records] == [0, 3, 4]
  assert records[0]["eval_accuracy"] == result["accuracy_before"]
  assert records[-1]["eval_accuracy"] == result["accuracy_after"]
  task = tasks.get_task(config.task)
  problems = task.split("eval", 4, config.task.seed)
  final, tokenizer = rundir.load(workdir)  # the step-4 checkpoint, as a user would load it
  greedy = evaluation.task_scores(final, tokenizer, problems, task, max_new_tokens=8)
  assert records[-1]["eval_digits"] == pytest.approx(greedy["digits"])
  assert records[-1]["eval_accuracy"] == pytest.approx(greedy["exact"])
  assert plot.x_axis(plot.load_run(workdir), "wall").eval[0] == 0.0


def test_sft_loss_falls_on_a_fixed_batch(sft_run):
  result, _ = sft_run
  run = result["run"]
  batch = trainer.global_batch(run, next(iter(run.make_dataset(run.config, run.tokenizer, split="train",
                                                                       context=None))))
  state = run.state
  first = None
  for _ in range(8):
    state, metrics = run.train_step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < first - 0.3
  run.state = state


def test_masked_targets_and_padding_carry_no_gradient(sft_run):
  result, _ = sft_run
  run = result["run"]
  local = next(iter(data.make_sft_dataset(
      arithmetic.sft_examples(6, difficulty=2, seed=5), run.tokenizer, template="plain", seq_len=96,
      global_batch_size=2, seed=0, split="eval")))
  assert (local["segment_ids"] == 0).any() and (local["loss_mask"] == 0).any()
  batch = {k: jnp.asarray(v) for k, v in local.items()}

  @jax.jit
  def grads(batch):
    def loss_of(params):
      return losses.next_token_loss(nnx.merge(run.graphdef, params, run.rest), batch, None)[0]
    return jax.grad(loss_of)(run.state["params"])

  reference = grads(batch)
  rng = np.random.default_rng(0)
  noise = rng.integers(0, VOCAB, local["tokens"].shape)
  changed = dict(batch)
  changed["targets"] = jnp.where(batch["loss_mask"] == 0, noise, batch["targets"])  # prompt / padding targets
  padding = batch["segment_ids"] == 0
  changed["tokens"] = jnp.where(padding, noise, batch["tokens"])  # padding inputs
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads(changed))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # ... while a trained target does matter.
  trained = dict(batch)
  trained["targets"] = jnp.where(batch["loss_mask"] == 1, noise, batch["targets"])
  assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(reference),
                                                                 jax.tree.leaves(grads(trained))))


def test_bad_align_config_keys_are_named(tokenizer_path, tmp_path):
  with pytest.raises(Exception, match="config.method"):
    align_run.run(_config(tokenizer_path, method="kto"), tmp_path)
  with pytest.raises(Exception, match="config.task.name"):
    align_run.run(_config(tokenizer_path, **{"task.name": "chess"}), tmp_path)
  dpo = align_config("dpo")
  for key, value in _config(tokenizer_path).items():
    if key not in ("method", "sft"):
      dpo[key] = value
  dpo.dpo.loss_type = "kto"
  with pytest.raises(Exception, match="config.dpo.loss_type='kto'"):
    align_run.run(dpo, tmp_path)
  with pytest.raises(Exception, match="sft"):  # a block the method does not read is an unknown key
    align_run.run(_config(tokenizer_path, method="dpo"), tmp_path)


def test_a_wall_time_budget_stops_the_run_at_the_step_that_spends_it(tokenizer_path, tmp_path):
  """config.max_train_seconds: the first step past the budget is the last (logged, checkpoint, final scores)."""
  config = _config(tokenizer_path, total_steps=6, log_every=3, max_train_seconds=1e-6,
                   **{"task.accuracy_problems": 2, "task.accuracy_tokens": 4, "task.score_every": 100,
                      "task.score_at_start": False})
  result = align_run.run(config, tmp_path)
  # Any step spends more than a microsecond: the first is the last, though step 3 is the first logged one.
  assert result["step"] == 1 and result["stopped_at_budget"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1]
  assert "accuracy_after" in result and "accuracy_before" not in result
  metrics = plot.load_run(tmp_path)
  assert [r["step"] for r in metrics.train] == [1] and metrics.train[0]["wall_seconds"] >= 1e-6
  assert [r["step"] for r in metrics.eval] == [1]  # scored at the last step only
  with pytest.raises(Exception, match="config.max_train_seconds=-1"):
    align_run.run(_config(tokenizer_path, max_train_seconds=-1.0), tmp_path / "bad")
