"""The scaling sweep: its plan against closed forms, and a killed sweep that resumes where it was."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from configs import validation
from configs.scaling import default
from model import config as model_config_lib
from tests import synthetic_corpus, xla_env
from train import sweep_plan

ROOT = Path(__file__).resolve().parents[1]
SIZES = "d64l1,d32l1,d96l1"  # the second point trains longest: the one killed half-way


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return synthetic_corpus.write_corpus(tmp_path_factory.mktemp("corpus"))


def _overrides(corpus, budget: float) -> dict:
  return {
      "base.data.source": "text", "base.data.paths": str(corpus / "*.txt"), "base.tokenizer.vocab_size": 300,
      "base.batch_size": 8, "base.seq_len": 32, "base.eval_steps": 2, "base.optimizer.learning_rate": 1e-2,
      "sizes": SIZES, "budgets": f"{budget:g}", "min_steps": 5, "max_steps": 1000,
  }


def _config(corpus, budget: float = 1e10) -> ml_collections.ConfigDict:
  config = default.get_config("quick=True")
  config.update_from_flattened_dict(_overrides(corpus, budget))
  return config


def test_the_plan_spends_each_budget(corpus):
  """Every point's FLOPs are its budget to within one step, counted as configured, and its schedule
  and warmup are as long as its own run."""
  for flop_count, counting in (("model", "non_embedding"), ("6nd", "total"), ("6nd", "non_embedding")):
    config = _config(corpus, budget=3e10)
    config.flop_count, config.counting, config.max_steps = flop_count, counting, 10_000
    for point in sweep_plan.plan(config):
      run = sweep_plan.point_config(config, point)
      model = validation.build_model_config(run.model)
      assert model.embed_dim == int(point.size[1:point.size.index("l")])
      n = model_config_lib.param_count(model) if counting == "total" else model_config_lib.non_embedding_param_count(model)
      per_token = model_config_lib.flops_per_token(model, 32) if flop_count == "model" else 6 * n
      assert point.flops_per_token == pytest.approx(per_token)
      assert abs(point.tokens * per_token - 3e10) <= 0.5 * 8 * 32 * per_token
      assert run.total_steps == point.steps and point.tokens == point.steps * 8 * 32
      assert run.optimizer.warmup_steps == int(0.1 * point.steps) and run.eval_every == point.steps


@pytest.mark.parametrize(
    "key, value, message",
    [("sizes", "d64l1,x3", "d<embed_dim>l<num_layers>"), ("sizes", "d40l1,d64l1,d96l1", "head_dim"),
     ("budgets", "1e10,abc", "config.budgets"), ("budgets", "1e20", "at least 3"),
     ("counting", "all", "config.counting"), ("extrapolate", 0.5, "config.extrapolate")],
)
def test_bad_sweep_configs_name_the_key(corpus, key, value, message):
  config = _config(corpus)
  config[key] = value
  with pytest.raises(validation.ConfigError, match=message):
    sweep_plan.plan(config)


def _sweep_command(corpus, workdir, budget):
  flags = [f"--config.{k}={v}" for k, v in _overrides(corpus, budget).items()]
  return [sys.executable, "-m", "train.sweep", "--config=configs/scaling/default.py:quick=True",
          f"--workdir={workdir}", *flags]


def _wait_for(condition, proc, timeout=600.0):
  start = time.time()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the sweep ended early: {proc.stdout.read()[-3000:]}")
    if time.time() - start > timeout:
      raise AssertionError("timed out")
    time.sleep(0.05)


def test_a_killed_sweep_resumes_and_never_reruns_a_finished_point(corpus, tmp_path):
  config = _config(corpus)
  budget = 400 * 8 * 32 * sweep_plan.make_point(config, "d32l1", 1.0).flops_per_token  # d32l1: 400 steps
  points = sweep_plan.plan(_config(corpus, budget))
  first, second = (tmp_path / "points" / p.name for p in points[:2])
  assert points[1].steps == 400 and points[0].steps < 400
  env = xla_env.subprocess_env(2)
  proc = subprocess.Popen(_sweep_command(corpus, tmp_path, budget), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  # Stop it (as a preemption would) once the first point is done and the second has a checkpoint.
  _wait_for(lambda: (first / "summary.json").exists() and any((second / "checkpoints").glob("[0-9]*")), proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1 and "rerun the same command" in out, out[-3000:]
  summary = json.loads((second / "summary.json").read_text())
  assert not summary["completed"] and 100 <= summary["step"] < 400, summary
  finished = (first / "summary.json").read_text(), (first / "summary.json").stat().st_mtime_ns

  # The rest, two points at once, each on its share of the cores (its checkpoint resharded to them).
  done = subprocess.run(_sweep_command(corpus, tmp_path, budget) + ["--config.parallel=2"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
  assert "1 already done" in done.stdout
  pinned = re.findall(r"training on cores (\[[0-9, ]*\])", done.stdout)
  assert len(pinned) == 2 and (len(os.sched_getaffinity(0)) < 2 or pinned[0] != pinned[1]), done.stdout
  assert ((first / "summary.json").read_text(), (first / "summary.json").stat().st_mtime_ns) == finished
  assert f"resumed from step {summary['step']}" in (second / "log.txt").read_text()
  for point in points:
    result = json.loads((tmp_path / "points" / point.name / "summary.json").read_text())
    assert result["completed"] and result["step"] == point.steps and result["eval_loss"] > 0
  steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
  assert steps[-1] == 400 and len(steps) >= 400 // 25  # one curve, logged through the stop
  plan = json.loads((tmp_path / "sweep.json").read_text())
  assert [p["name"] for p in plan["points"]] == [p.name for p in points]

  # The same workdir with another grid is refused, naming the file.
  other = _sweep_command(corpus, tmp_path, budget * 2)
  refused = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and "sweep.json" in refused.stderr


def _law(n, d):
  """A Chinchilla-form law the grid below is written from (N non-embedding, D tokens)."""
  return 1.8 + 60.0 / n**0.3 + 90.0 / d**0.3


def test_the_sweep_predicts_then_trains_its_extrapolation_run(corpus, tmp_path):
  """With extrapolate=2 the sweep fits its finished grid (written here from a known law, not trained),
  records the loss the fit predicts for a run at 2x the largest budget in sweep.json before that run
  starts, trains it at the candidate size nearest the fitted optimum, and a rerun neither re-plans nor
  retrains it."""
  from train import scaling

  sizes = "d32l1,d64l1,d96l1"
  budget = 40 * 8 * 32 * sweep_plan.make_point(_config(corpus), "d96l1", 1.0).flops_per_token
  budgets = f"{budget:.6g},{2 * budget:.6g},{4 * budget:.6g}"
  overrides = {**_overrides(corpus, budget), "budgets": budgets, "extrapolate": 2.0, "extrapolation_sizes": sizes}
  config = _config(corpus)
  config.update_from_flattened_dict(overrides)
  for point in sweep_plan.plan(config):  # a finished grid, its losses the law's
    point_dir = tmp_path / "points" / point.name
    point_dir.mkdir(parents=True)
    loss = _law(point.n_params_non_embedding, point.tokens)
    (point_dir / "summary.json").write_text(json.dumps({
        "step": point.steps, "total_steps": point.steps, "completed": True, "tokens": point.tokens,
        "flops_per_token": point.flops_per_token, "eval_loss": loss, "train_loss": loss}))
  command = [sys.executable, "-m", "train.sweep", "--config=configs/scaling/default.py:quick=True",
             f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  env = xla_env.subprocess_env(2)
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
  out = done.stdout
  assert "9 already done" in out
  [planned] = [p for p in json.loads((tmp_path / "sweep.json").read_text())["points"] if p["kind"] == "extrapolation"]
  assert out.index(f"predicted loss {planned['predicted_loss']:.4f}") < out.index(f"point {planned['name']}: training")
  assert planned["budget"] == pytest.approx(8 * budget, rel=1e-5)
  assert abs(planned["tokens"] * planned["flops_per_token"] - 8 * budget) <= 0.5 * 8 * 32 * planned["flops_per_token"]
  # The size nearest the fit's optimum, and the law's own loss there (the fit recovers a noiseless law).
  optimum = scaling.plan_extrapolation(tmp_path, factor=2.0)
  candidates = [sweep_plan.make_point(config, size, 8 * budget, kind="extrapolation") for size in sizes.split(",")]
  nearest = min(candidates, key=lambda p: abs(math.log(p.n_params_non_embedding / optimum["n_params"])))
  assert planned["size"] == nearest.size
  truth = _law(planned["n_params_non_embedding"], planned["tokens"])
  assert planned["predicted_loss"] == pytest.approx(truth, rel=0.01)
  point_dir = tmp_path / "points" / planned["name"]
  summary = json.loads((point_dir / "summary.json").read_text())
  assert summary["completed"] and summary["step"] == planned["steps"] and summary["eval_loss"] > 0
  before = (tmp_path / "sweep.json").read_text(), (point_dir / "summary.json").stat().st_mtime_ns

  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "training" not in again.stdout, (again.stdout + again.stderr)[-3000:]
  assert ((tmp_path / "sweep.json").read_text(), (point_dir / "summary.json").stat().st_mtime_ns) == before


@pytest.mark.parametrize("arg", ["", "quick=True"])
def test_the_default_sweep_plans_valid_runs(arg):
  """configs/scaling/default.py: IsoFLOP profiles of at least 3 sizes, each point a valid training run."""
  from train import trainer

  config = default.get_config(arg)
  points = sweep_plan.plan(config)
  for budget in sweep_plan.parse_list(config.budgets, "budgets"):
    assert sum(p.budget == budget for p in points) >= 3
  for point in points:
    trainer.validate(sweep_plan.point_config(config, point))
