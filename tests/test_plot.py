"""train/plot.py on fake run directories: the plotted values against the records written, the figure
file, and the command line (exit status 0, or 2 with one line)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from train import plot

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ_LEN = 4, 8


def _train(step, loss, sps=2.0, **more):
  return {"step": step, "loss": loss, "grad_norm": 1.0, "learning_rate": 1e-3, "tokens_per_second": 100.0,
          "steps_per_second": sps, **more}


def _write_run(path: Path, records: list[dict], config: dict | None = None) -> Path:
  path.mkdir(parents=True)
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (path / "config.json").write_text(json.dumps(config or {"batch_size": BATCH, "seq_len": SEQ_LEN}))
  return path


@pytest.fixture
def old_run(tmp_path):
  """A run from before the trainer recorded tokens_seen and wall_seconds, resumed once (steps 20-30 again)."""
  return _write_run(tmp_path / "old", [
      _train(10, 5.0, sps=2.0),
      _train(20, 4.0, sps=5.0),
      _train(30, 9.9),  # the first try of step 30, lost to a crash: replaced below
      {"step": 20, "eval_loss": 4.5, "eval_perplexity": 90.0},
      _train(30, "nan", sps=4.0),  # after the resume (MetricsWriter writes non-finite values as strings)
      _train(40, 3.0, sps=1.0),
      {"step": 40, "eval_loss": 3.5, "eval_perplexity": 33.0},
  ])


def test_a_run_is_read_in_step_order_with_the_last_record_of_a_step_kept(old_run):
  run = plot.load_run(old_run)
  assert [r["step"] for r in run.train] == [10, 20, 30, 40]
  assert math.isnan(run.train[2]["loss"]) and run.train[2]["steps_per_second"] == 4.0
  assert [(r["step"], r["eval_loss"]) for r in run.eval] == [(20, 4.5), (40, 3.5)]
  assert run.config == {"batch_size": BATCH, "seq_len": SEQ_LEN}


def test_the_curves_skip_non_finite_values(old_run):
  curves = plot.curves(plot.load_run(old_run), ["loss", "eval_loss"])
  np.testing.assert_array_equal(curves["loss"].x, [10, 20, 40])
  np.testing.assert_array_equal(curves["loss"].y, [5.0, 4.0, 3.0])
  np.testing.assert_array_equal(curves["eval_loss"].x, [20, 40])
  np.testing.assert_array_equal(curves["eval_loss"].y, [4.5, 3.5])


def test_an_old_run_is_placed_on_tokens_and_wall_time_by_estimate(old_run):
  run = plot.load_run(old_run)
  tokens = plot.curves(run, ["loss", "eval_loss"], x="tokens")
  np.testing.assert_array_equal(tokens["loss"].x, np.array([10, 20, 40]) * BATCH * SEQ_LEN)
  np.testing.assert_array_equal(tokens["eval_loss"].x, np.array([20, 40]) * BATCH * SEQ_LEN)
  assert plot.x_axis(run, "tokens").estimated

  wall = plot.x_axis(run, "wall")
  seconds = np.cumsum([10 / 2.0, 10 / 5.0, 10 / 4.0, 10 / 1.0])  # (step - previous step) / steps_per_second
  np.testing.assert_allclose(wall.train, seconds)
  np.testing.assert_allclose(wall.eval, seconds[[1, 3]])
  assert wall.estimated
  with pytest.raises(plot.PlotError, match="does not record flops_seen"):
    plot.x_axis(run, "flops")


def test_recorded_counts_are_used_and_eval_records_lie_between_their_neighbours(tmp_path):
  records = [_train(s, 1.0, tokens_seen=100 * s + 7, wall_seconds=3.0 * s, flops_seen=1e9 * s) for s in (10, 20)]
  run = plot.load_run(_write_run(tmp_path / "new", [*records, {"step": 15, "eval_loss": 2.0}]))
  for x, expected in [("tokens", [1007, 2007]), ("wall", [30.0, 60.0]), ("flops", [1e10, 2e10])]:
    axis = plot.x_axis(run, x)
    assert not axis.estimated
    np.testing.assert_allclose(axis.train, expected)
    np.testing.assert_allclose(axis.eval, [(expected[0] + expected[1]) / 2])


def test_runs_from_a_common_start_begin_at_its_last_scores(tmp_path):
  start = _write_run(tmp_path / "start", [_train(100, 1.0, wall_seconds=50.0), {"step": 50, "eval_pass": 0.1},
                                          {"step": 100, "eval_pass": 0.3, "eval_kl": 0.0}])
  arm = plot.load_run(_write_run(tmp_path / "arm", [_train(10, 1.0, wall_seconds=20.0),
                                                    {"step": 10, "eval_pass": 0.5}]))
  origin = plot.start_point(plot.load_run(start))
  assert origin == {"eval_pass": 0.3, "eval_kl": 0.0}
  curve = plot.curves(arm, ["eval_pass"], x="wall", start=origin)["eval_pass"]
  np.testing.assert_allclose(curve.x, [0.0, 20.0])
  np.testing.assert_allclose(curve.y, [0.3, 0.5])
  scored_at_zero = plot.load_run(_write_run(tmp_path / "own", [_train(10, 1.0), {"step": 0, "eval_pass": 0.2},
                                                               {"step": 10, "eval_pass": 0.5}]))
  np.testing.assert_allclose(plot.curves(scored_at_zero, ["eval_pass"], start=origin)["eval_pass"].y, [0.2, 0.5])


def test_smoothing_is_an_ema_of_the_train_curves_only(tmp_path):
  losses = [4.0, 2.0, 3.0, 1.0]
  records = [_train(10 * (i + 1), loss, learning_rate=0.1 * i) for i, loss in enumerate(losses)]
  run = plot.load_run(_write_run(tmp_path / "run", [*records, {"step": 20, "eval_loss": 5.0}]))
  curves = plot.curves(run, ["loss", "learning_rate", "eval_loss"], smooth=0.75)
  expected = [4.0]
  for loss in losses[1:]:
    expected.append(0.75 * expected[-1] + 0.25 * loss)
  np.testing.assert_allclose(curves["loss"].y, expected)
  np.testing.assert_array_equal(curves["loss"].raw, losses)
  np.testing.assert_allclose(curves["learning_rate"].y, [0.0, 0.1, 0.2, 0.3])  # a schedule is not smoothed
  np.testing.assert_array_equal(curves["eval_loss"].y, [5.0])
  with pytest.raises(plot.PlotError, match=r"smooth=1.0 must be in \[0, 1\)"):
    plot.curves(run, ["loss"], smooth=1.0)


def test_the_panels_leave_out_metrics_without_data_and_refuse_unknown_names(tmp_path):
  align = plot.load_run(_write_run(tmp_path / "dpo", [{"step": 5, "loss": 0.6, "reward_margin": 0.1, "kl": "nan"}]))
  assert plot.chosen_metrics([align]) == ["loss"]
  assert plot.chosen_metrics([align], ["reward_margin", "kl", "loss"]) == ["reward_margin", "loss"]
  with pytest.raises(plot.PlotError, match="'rewards'; the runs record kl, loss, reward_margin$"):
    plot.chosen_metrics([align], ["loss", "rewards"])


def test_bad_run_directories_are_named(tmp_path):
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty' / 'metrics.jsonl'} does not exist")):
    plot.load_run(tmp_path / "empty")
  run = _write_run(tmp_path / "run", [_train(1, 1.0)])
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "loss": \n')
  with pytest.raises(plot.PlotError, match=re.escape(f"{run / 'metrics.jsonl'}:2: not JSON")):
    plot.load_run(run)
  (run / "config.json").unlink()
  (run / "metrics.jsonl").write_text(json.dumps(_train(1, 1.0)))
  with pytest.raises(plot.PlotError, match="gives no batch_size and seq_len"):
    plot.x_axis(plot.load_run(run), "tokens")


def test_the_figure_is_a_png_of_one_panel_per_metric(old_run, tmp_path):
  other = _write_run(tmp_path / "other", [_train(10, 6.0), _train(20, 5.0)])
  out = plot.plot_runs([old_run, other], tmp_path / "figures" / "runs.png", x="tokens", smooth=0.5, log_y=True,
                       dpi=50)
  assert out == tmp_path / "figures" / "runs.png"
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(out.parent) == ["runs.png"]  # the temporary file was renamed
  # The five default panels: 3 columns by 2 rows of PANEL_INCHES.
  height, width = matplotlib.image.imread(out).shape[:2]
  assert (width, height) == (3 * plot.PANEL_INCHES[0] * 50, 2 * plot.PANEL_INCHES[1] * 50)

  one = plot.plot_runs([other], tmp_path / "one.png", metrics=["loss"], labels=["mine"], dpi=50)
  assert matplotlib.image.imread(one).shape[:2] == (plot.PANEL_INCHES[1] * 50, plot.PANEL_INCHES[0] * 50)
  with pytest.raises(plot.PlotError, match="1 labels"):
    plot.plot_runs([old_run, other], tmp_path / "x.png", labels=["a"])


def test_twelve_runs_get_twelve_different_lines(tmp_path):
  runs = [_write_run(tmp_path / f"r{i}", [_train(10, 5.0 - i / 10), _train(20, 4.0 - i / 10)]) for i in range(12)]
  figure = plot._draw([plot.curves(plot.load_run(r), ["loss"], x="step", smooth=0.0) for r in runs], [f"r{i}" for i in range(12)],
                      ["loss"], x_label="step", log_y=False, smoothed=False)
  lines = figure.axes[0].get_lines()
  looks = {(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in lines}
  assert len(lines) == 12 and len(looks) == 12  # past matplotlib's ten colours, the line style tells runs apart
  assert len(figure.legends[0].get_lines()) == 12


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "train.plot", *map(str, args)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_the_command_line_plots_several_runs_and_names_a_bad_directory_in_one_line(old_run, tmp_path):
  other = _write_run(tmp_path / "other", [_train(10, 6.0), _train(20, 5.0)])
  out = tmp_path / "plots" / "f.png"
  proc = _run_cli(old_run, other, f"--out={out}", "--x=wall", "--labels=a,b", "--smooth=0.5")
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes()[:4] == b"\x89PNG"

  proc = _run_cli(old_run, tmp_path / "missing", f"--out={out}")
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: {tmp_path / 'missing' / 'metrics.jsonl'} does not exist: {tmp_path / 'missing'} is not a run "
      "directory of python -m train or align"
  ]


def test_importing_the_module_imports_neither_jax_nor_matplotlib():
  code = "import sys, train.plot; print(sorted(m for m in ('jax', 'matplotlib') if m in sys.modules))"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.stdout.strip() == "[]", proc.stderr
