"""The real trainer on a tiny model over 8 fake CPU devices: meshes, accumulation, resume, errors."""

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest

from configs import common, validation
from tests import synthetic_corpus, xla_env
from train import trainer

STEPS = 10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A few hundred small synthetic documents in text files, and a tokenizer trained once on them."""
  root = synthetic_corpus.write_corpus(tmp_path_factory.mktemp("corpus"))
  tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
  config = _config(root, "")
  from rundir import tokenizer as tokenizer_lib
  from train import data as data_lib

  tokenizer_lib.get_tokenizer(config.tokenizer, tokenizer_dir, lambda: data_lib.training_texts(config.data, seed=0))
  return root, tokenizer_dir / "tokenizer.model"


def _config(root, tokenizer_path, **overrides):
  config = common.train_config()
  config.total_steps = STEPS
  config.batch_size = 8
  config.seq_len = 32
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 0
  config.model = common.model_config("tiny", num_layers=2)
  config.tokenizer.vocab_size = 300
  config.tokenizer.path = str(tokenizer_path)
  config.data.source = "text"
  config.data.paths = str(root / "*.txt")
  config.optimizer.warmup_steps = 2
  config.optimizer.learning_rate = 1e-2
  config.update_from_flattened_dict(overrides)  # dotted keys: {"optimizer.learning_rate": 1e-3}
  return config


def _losses(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
  root, tokenizer = corpus
  workdir = tmp_path_factory.mktemp("baseline")
  result = trainer.train(_config(root, tokenizer, **{"mesh.data": 8}), workdir)
  return _losses(workdir), result


def test_loss_falls_and_metrics_are_logged(baseline):
  losses, result = baseline
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1] - 0.5
  assert result["tokens_per_second"] > 0 and result["grad_norm"] > 0 and "learning_rate" in result


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cost_is_logged_and_summarised(baseline):
  """Cumulative tokens, FLOPs, wall time and the energy estimate in every record, and summary.json,
  against their closed forms (tokens = steps x batch x seq_len; FLOPs = tokens x flops_per_token;
  energy = W x devices x seconds)."""
  import model as model_lib
  from train import metrics as metrics_lib
  run = baseline[1]["run"]
  per_token = model_lib.flops_per_token(run.model_config, 32)
  train_records = [r for r in _records(run.workdir) if "loss" in r]
  walls = [r["wall_seconds"] for r in train_records]
  assert all(b > a for a, b in zip(walls, walls[1:]))
  for r in train_records:
    assert r["tokens_seen"] == r["step"] * 8 * 32
    assert r["flops_seen"] == pytest.approx(r["tokens_seen"] * per_token, rel=1e-12)
    assert r["energy_kwh"] == pytest.approx(metrics_lib.CPU_WATTS_PER_CORE * 8 * r["wall_seconds"] / 3.6e6)
  summary = json.loads((run.workdir / trainer.SUMMARY_FILE).read_text())
  assert summary["completed"] and summary["step"] == STEPS and summary["tokens"] == STEPS * 8 * 32
  assert summary["flops"] == pytest.approx(STEPS * 8 * 32 * per_token)
  assert summary["flops_per_step"] == pytest.approx(8 * 32 * per_token, rel=1e-12)
  assert summary["flops_note"] == trainer.FLOPS_NOTE  # pre-training: the steps alone
  assert summary["params"] == model_lib.param_count(run.model_config)
  assert summary["wall_seconds"] == walls[-1] and summary["energy_kwh"] == train_records[-1]["energy_kwh"]
  assert "estimate" in summary["energy_note"] and summary["train_loss"] == train_records[-1]["loss"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"mesh.data": 1, "mesh.fsdp": 8},
        {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
        {"mesh.data": 8, "grad_accum_steps": 4},
        {"mesh.data": 2, "mesh.sequence": 4},  # ring attention: the 32-token rows over 4 devices
    ],
    ids=["fsdp8", "data2-fsdp2-tensor2", "accumulate4", "sequence4-ring"],
)
def test_losses_equal_across_meshes_and_accumulation(overrides, corpus, baseline, tmp_path):
  root, tokenizer = corpus
  trainer.train(_config(root, tokenizer, **overrides), tmp_path)
  losses = _losses(tmp_path)
  expected = baseline[0]
  np.testing.assert_allclose([losses[s] for s in sorted(expected)], [expected[s] for s in sorted(expected)], rtol=1e-5)


def _made_flops(batch) -> float:
  """What a batch of _reporting_data says making it cost: its first token id x 1e9 (any number that varies)."""
  return 1e9 * float(batch["tokens"][0, 0])


def _reporting_data(config, tokenizer, *, split, context):
  """The pre-training data, each batch reporting FLOPs computed to make it (as an online method's
  rollout does, train.trainer.FLOPS)."""
  dataset = trainer.pretraining_dataset(config, tokenizer, split=split, context=context)
  return dataset.map(lambda batch: {**batch, trainer.FLOPS: np.asarray(_made_flops(batch))})


def test_resume_is_exact(corpus, tmp_path):
  """Losses bitwise, and flops_seen (the steps' and what each batch reported, carried in the checkpoint)
  exactly, against a straight run and the closed form steps x batch x seq_len x flops_per_token + the
  reports of the batches trained on."""
  import model as model_lib
  root, tokenizer = corpus
  straight, split = tmp_path / "straight", tmp_path / "split"
  train = functools.partial(trainer.train, make_dataset=_reporting_data)
  run = train(_config(root, tokenizer, total_steps=20, checkpoint_every=10), straight)["run"]
  stopped = trainer.train_loop(trainer.setup(_config(root, tokenizer, total_steps=20), split,
                                             make_dataset=_reporting_data), stop_at=10)
  assert stopped["stopped_early"] and stopped["step"] == 10
  result = train(_config(root, tokenizer, total_steps=20, checkpoint_every=10), split)
  assert result["step"] == 20
  a, b = _losses(straight), _losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]  # bitwise on CPU
  flops = [{r["step"]: r["flops_seen"] for r in _records(w) if "loss" in r} for w in (straight, split)]
  assert flops[0] == flops[1]
  batches = iter(trainer.pretraining_dataset(run.config, run.tokenizer, split="train", context=None))
  made = np.cumsum([_made_flops(next(batches)) for _ in range(20)])
  per_step = 8 * 32 * model_lib.flops_per_token(run.model_config, 32)
  for step in range(1, 21):
    assert flops[1][step] == pytest.approx(step * per_step + made[step - 1], rel=1e-12)
  assert trainer.flops_at(split, 10) == flops[0][10] and trainer.flops_at(split, 20) == flops[0][20]
  # Wall time carries on from the checkpoint's step, and a configured power replaces the default.
  walls = {r["step"]: r["wall_seconds"] for r in _records(split) if "loss" in r}
  assert walls[11] > walls[10] and json.loads((split / trainer.SUMMARY_FILE).read_text())["completed"]
  # A finished run with a larger total_steps carries on from its last checkpoint.
  assert train(_config(root, tokenizer, total_steps=22, device_power_watts=100.0), straight)["step"] == 22
  last = _records(straight)[-1]
  assert last["energy_kwh"] == pytest.approx(100.0 * 8 * last["wall_seconds"] / 3.6e6)
  assert sorted(_losses(straight))[-1] == 22


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
  root, tokenizer = corpus
  script = (
      "import pathlib, sys; from tests.test_train import _config; from train import trainer; "
      f"trainer.train(_config(pathlib.Path({str(root)!r}), {str(tokenizer)!r}, total_steps=100000), {str(tmp_path)!r})"
  )
  env = xla_env.subprocess_env(8)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:  # wait until it trains
    if line.startswith("step=3 "):
      proc.send_signal(signal.SIGTERM)
      break
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 100000


def test_bad_inputs_name_the_problem(corpus, tmp_path):
  root, tokenizer = corpus
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    trainer.train(_config(root, tokenizer, **{"data.paths": str(tmp_path / "no_such_dir" / "*.txt")}), tmp_path / "a")
  bad_jsonl = tmp_path / "bad.jsonl"
  bad_jsonl.write_text(json.dumps({"body": "hello"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl.*line 1.*'text'"):
    trainer.train(
        _config(root, tokenizer, **{"data.source": "jsonl", "data.paths": str(bad_jsonl)}), tmp_path / "b"
    )
  with pytest.raises(validation.ConfigError, match=r"config.mesh sizes .* multiply to 6, but there are 8 devices"):
    trainer.train(_config(root, tokenizer, **{"mesh.data": 3, "mesh.tensor": 2}), tmp_path / "c")
  config = _config(root, tokenizer)
  config.totl_steps = 5
  with pytest.raises(validation.ConfigError, match="config.totl_steps is not a known key"):
    trainer.train(config, tmp_path / "d")


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(corpus, tmp_path):
  root, tokenizer = corpus
  trainer.train(_config(root, tokenizer, total_steps=4), tmp_path)
  with pytest.raises(trainer.NonFiniteError, match="3 non-finite losses or gradients in a row"):
    # An absurd learning rate overflows float32 within a step or two.
    trainer.train(
        _config(root, tokenizer, total_steps=40, max_nonfinite_in_row=3,
                **{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0}),
        tmp_path,
    )
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [4]  # the stop saved nothing: the last good checkpoint is the latest
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("skipped") == 1.0 for r in records)


def test_init_from_another_run_starts_from_its_weights(corpus, baseline, tmp_path):
  root, tokenizer = corpus
  source = tmp_path / "source"
  trainer.train(_config(root, tokenizer, total_steps=STEPS), source)
  tuned = tmp_path / "tuned"
  trainer.train(_config(root, tokenizer, total_steps=2, init_from=str(source)), tuned)
  first_fresh, first_tuned = baseline[0][1], _losses(tuned)[1]
  assert first_tuned < first_fresh - 0.5  # already trained: far below a random start
  with pytest.raises(FileNotFoundError, match="config.init_from=.* is neither a training run.s workdir .* nor a Hugging Face"):
    trainer.train(_config(root, tokenizer, init_from=str(tmp_path / "nothing")), tmp_path / "x")
