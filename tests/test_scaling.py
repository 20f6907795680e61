"""Scaling-law fits (train/scaling_fits.py) against the laws that generated their data, and the command line
(train/scaling.py) on a fake sweep directory written from a known law.

Every reference is independent of the code under test: the generating constants (Chinchilla's published
Approach 3 fit, Kaplan's L(N)), closed forms (N_opt ~ C^(beta / (alpha + beta))), or a brute-force search.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import cli
from train import scaling, scaling_fits

ROOT = Path(__file__).resolve().parent.parent
# Hoffmann et al. 2022, eq. 10: Approach 3's fit.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
A_TRUE = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])  # N_opt ~ C^a
B_TRUE = CHINCHILLA["alpha"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])  # D_opt ~ C^b
NOISE = 0.005  # log-normal noise on the losses: sigma 0.5%


def law(n, d, constants=CHINCHILLA):
  """L(N, D) = E + A / N^alpha + B / D^beta, written out here (not the code's law_loss)."""
  c = constants
  return c["E"] + c["A"] / np.asarray(n, float) ** c["alpha"] + c["B"] / np.asarray(d, float) ** c["beta"]


def closed_form_optimum(budget, constants=CHINCHILLA, k=6.0):
  """Hoffmann et al. 2022, eq. 4: N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
  c = constants
  g = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / (c["alpha"] + c["beta"]))
  n = g * (budget / k) ** (c["beta"] / (c["alpha"] + c["beta"]))
  return n, budget / k / n


def brute_force_optimum(budget, constants=CHINCHILLA, k=6.0):
  """The N of least loss under C = k N D, on a grid of sizes 1e-5 apart in log10 N (1e2 to 1e16)."""
  n = np.logspace(2, 16, 1_400_001)
  return n[np.argmin(law(n, budget / (k * n), constants))]


def noisy(losses, rng):
  return losses * np.exp(NOISE * rng.normal(size=np.shape(losses)))


def isoflop_sweep(budgets, rng, *, sizes_per_budget=9, spread=8.0):
  """IsoFLOP profiles of the law: per budget, sizes log-spaced from N_opt / spread to N_opt * spread (jittered),
  D = C / (6 N); returns budgets, N, D, noisy losses."""
  rows = []
  for c in budgets:
    n_opt, _ = closed_form_optimum(c)
    jitter = np.exp(rng.uniform(-0.1, 0.1, sizes_per_budget))
    for n in n_opt * np.geomspace(1 / spread, spread, sizes_per_budget) * jitter:
      rows.append((c, n, c / (6 * n)))
  c, n, d = (np.array(v) for v in zip(*rows))
  return c, n, d, noisy(law(n, d), rng)


# ---------------------------------------------------------------------------------------------------------------
# The fits on synthetic data.


def test_fit_chinchilla_recovers_the_papers_approach_3_constants():
  rng = np.random.default_rng(0)
  n, d = np.meshgrid(np.geomspace(1e7, 1e10, 10), np.geomspace(1e8, 1e12, 8))
  n, d = n.ravel(), d.ravel()
  fit = scaling.fit_chinchilla(n, d, noisy(law(n, d), rng))
  assert set(fit) >= {"E", "A", "B", "alpha", "beta"}
  assert all(isinstance(fit[k], float) for k in ("E", "A", "B", "alpha", "beta"))
  # Stated tolerances: exponents within 0.02, E within 2%; A and B trade off against the exponents (a 0.01 change
  # in alpha moves A by ~20%), so they are held to 25% and the law itself to its predictions.
  assert fit["alpha"] == pytest.approx(CHINCHILLA["alpha"], abs=0.02)
  assert fit["beta"] == pytest.approx(CHINCHILLA["beta"], abs=0.02)
  assert fit["E"] == pytest.approx(CHINCHILLA["E"], rel=0.02)
  assert fit["A"] == pytest.approx(CHINCHILLA["A"], rel=0.25)
  assert fit["B"] == pytest.approx(CHINCHILLA["B"], rel=0.25)
  # Within 0.5% of the true loss over the fitted range, and within 1% a decade of N and D beyond it.
  n_test, d_test = np.geomspace(1e7, 1e11, 9), np.geomspace(1e8, 1e13, 9)
  predicted = [scaling.predict_loss(fit, a, b) for a, b in zip(n_test, d_test)]
  np.testing.assert_allclose(predicted[:7], law(n_test, d_test)[:7], rtol=0.005)
  np.testing.assert_allclose(predicted, law(n_test, d_test), rtol=0.01)


def test_lbfgs_finds_the_rosenbrock_minimum_from_every_start():
  def rosenbrock(x, rows):
    del rows
    f = 100 * (x[:, 1] - x[:, 0] ** 2) ** 2 + (1 - x[:, 0]) ** 2
    grad = np.stack([-400 * x[:, 0] * (x[:, 1] - x[:, 0] ** 2) - 2 * (1 - x[:, 0]), 200 * (x[:, 1] - x[:, 0] ** 2)], 1)
    return f, grad

  x, f = scaling_fits.lbfgs(rosenbrock, np.array([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0], [-3.0, 5.0]]),
                            max_iter=500, ftol=1e-15)
  np.testing.assert_allclose(x, np.ones((4, 2)), atol=1e-4)
  assert np.all(f < 1e-8)


def test_fit_power_law_recovers_kaplans_l_of_n():
  n = np.geomspace(1e6, 1e10, 20)
  exact = scaling.fit_power_law(n, (8.8e13 / n) ** 0.076)  # Kaplan et al. 2020, eq. 1.1
  assert exact["alpha"] == pytest.approx(0.076, rel=1e-9)
  assert exact["exponent"] == pytest.approx(-0.076, rel=1e-9)
  assert exact["scale"] == pytest.approx(8.8e13, rel=1e-6)
  assert exact["coefficient"] == pytest.approx(8.8e13**0.076, rel=1e-9)
  fit = scaling.fit_power_law(n, noisy((8.8e13 / n) ** 0.076, np.random.default_rng(1)))
  # With 0.5% noise: alpha_N within 0.003; N_c = coefficient^(1/alpha) magnifies it, so within a factor of 3.
  assert fit["alpha"] == pytest.approx(0.076, abs=0.003)
  assert 8.8e13 / 3 < fit["scale"] < 8.8e13 * 3


@pytest.mark.parametrize("x, y, message", [
    ([1.0, -2.0], [1.0, 2.0], r"x\[1\]=-2.0 must be finite and positive"),
    ([1.0, 2.0], [1.0, float("nan")], r"y\[1\]=nan"),
    ([1.0], [1.0], "at least 2 points"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "one length"),
    ([2.0, 2.0], [1.0, 3.0], "2 distinct x"),
])
def test_fit_power_law_names_bad_input(x, y, message):
  with pytest.raises(ValueError, match=message):
    scaling.fit_power_law(x, y)


def test_approach_2_recovers_the_closed_form_exponents():
  rng = np.random.default_rng(2)
  c, n, d, losses = isoflop_sweep(np.geomspace(1e18, 1e22, 5), rng)
  fit = scaling.fit_approach2(c, n, losses, 6 * n)
  # Stated tolerance: 0.02 (a parabola in log N is the IsoFLOP curve only near its minimum).
  assert fit["a"] == pytest.approx(A_TRUE, abs=0.02)
  assert fit["b"] == pytest.approx(B_TRUE, abs=0.02)
  assert not fit["skipped"]
  for profile in fit["profiles"]:
    assert profile["n_opt"] == pytest.approx(closed_form_optimum(profile["budget"])[0], rel=0.15)


def test_approach_1_recovers_the_frontier_roughly():
  curves, sizes = [], []
  for budget in np.geomspace(1e18, 1e22, 5):
    for n in np.geomspace(1e7, 1e11, 24):
      tokens = np.geomspace(budget / (6 * n) / 100, budget / (6 * n), 30)
      if tokens[-1] >= 1e8:
        curves.append(np.stack([6 * n * tokens, law(n, tokens)]))  # ideal curves: the law at every point
        sizes.append(n)
  sizes = np.array(sizes)
  fit = scaling.fit_approach1(curves, sizes, 6 * sizes)
  # Stated tolerance: 0.05; N takes only the 24 sizes, so N_opt(C) is a staircase about the true line.
  assert fit["a"] == pytest.approx(A_TRUE, abs=0.05)
  assert fit["b"] == pytest.approx(B_TRUE, abs=0.05)


def test_approach_1_refuses_an_envelope_of_one_size():
  """Where the smallest size is best at every C (a grid that does not bracket the optimum), N_opt(C) is a
  constant: the fit says so instead of reporting an exponent of 0."""
  sizes = np.array([1e6, 1e7, 1e8] * 3)  # each trained to each of three budgets, as the sweep does
  curves = []
  for i, n in enumerate(sizes):
    tokens = np.geomspace(1e-2, 1, 20) * 1e15 * 2 ** (i // 3) / (6 * n)
    curves.append(np.stack([6 * n * tokens, 2.0 + 0.1 * np.log10(n) + 10 / tokens ** 0.3]))
  with pytest.raises(ValueError, match="one size"):
    scaling.fit_approach1(curves, sizes, 6 * sizes)


def test_kaplan_fits_on_the_pareto_front_recover_a_pure_power_law():
  n = np.geomspace(1e6, 1e9, 12)
  losses = (8.8e13 / n) ** 0.076
  # Runs that a smaller run beats are off the front and must not bend the fit.
  fit = scaling.fit_kaplan(np.r_[n, n[3:6]], np.r_[np.geomspace(1e9, 1e11, 12), [1e8] * 3],
                           np.r_[losses, losses[3:6] * 1.3])
  assert fit["alpha_N"] == pytest.approx(0.076, rel=1e-9)
  assert fit["N_c"] == pytest.approx(8.8e13, rel=1e-6)
  assert len(fit["params"]["front"]) == 12


@pytest.mark.parametrize("constants, budget, k", [
    (CHINCHILLA, 5.76e23, 6.0),  # Gopher's budget, the paper's Table 3 row
    (CHINCHILLA, 1e18, 6.0),
    ({"E": 2.0, "A": 50.0, "B": 900.0, "alpha": 0.5, "beta": 0.25}, 3e15, 7.5),
])
def test_compute_optimal_matches_the_closed_form_and_a_brute_force_search(constants, budget, k):
  optimum = scaling.compute_optimal(constants, budget, flops_per_param_token=k)
  n_closed, d_closed = closed_form_optimum(budget, constants, k)
  assert optimum["n_params"] == pytest.approx(n_closed, rel=1e-9)
  assert optimum["tokens"] == pytest.approx(d_closed, rel=1e-9)
  assert optimum["n_params"] == pytest.approx(brute_force_optimum(budget, constants, k), rel=1e-4)
  assert optimum["loss"] == pytest.approx(float(law(n_closed, d_closed, constants)), rel=1e-12)
  assert optimum["n_params"] * optimum["tokens"] * k == pytest.approx(budget, rel=1e-12)


def test_compute_optimal_and_predict_loss_name_bad_input():
  with pytest.raises(ValueError, match="budget=-1"):
    scaling.compute_optimal(CHINCHILLA, -1.0)
  with pytest.raises(ValueError, match="alpha=0.0"):
    scaling.compute_optimal({**CHINCHILLA, "alpha": 0.0}, 1e20)
  with pytest.raises(ValueError, match="n_params=0"):
    scaling.predict_loss(CHINCHILLA, 0, 1e9)
  with pytest.raises(ValueError, match="at least 5 runs"):
    scaling.fit_chinchilla([1e7] * 4, [1e9] * 4, [3.0] * 4)


def test_bootstrap_intervals_contain_the_true_exponents():
  rng = np.random.default_rng(3)
  c, n, d, losses = isoflop_sweep(np.geomspace(1e18, 1e22, 5), rng)
  runs = scaling.Runs(names=tuple(f"r{i}" for i in range(len(n))), n_params=n, tokens=d, flops_per_token=6 * n,
                      budgets=c, losses=losses, curves=(None,) * len(n))
  fits = scaling.fit_all(runs)
  boot = scaling.bootstrap(runs, fits, resamples=40, seed=0)
  intervals = boot["intervals"]
  for approach, key, truth in (("approach3", "alpha", CHINCHILLA["alpha"]), ("approach3", "beta", CHINCHILLA["beta"]),
                               ("approach2", "a", A_TRUE), ("approach2", "b", B_TRUE)):
    low, high = intervals[approach][key]
    assert low <= truth <= high, (approach, key, low, high)
    assert high - low < 0.15, (approach, key, low, high)  # informative, not everything
  assert len(boot["samples"]["approach3"]["alpha"]) == 40
  assert "error" in fits["approach1"]  # no curves given: Approach 1 says why instead of failing the rest


# ---------------------------------------------------------------------------------------------------------------
# A fake sweep directory (train/sweep.py's layout) and the command line.

EMBEDDING = 50_000  # total = non-embedding + this


def write_sweep(workdir: Path, rng, *, budgets=(1e15, 2e15, 4e15, 8e15), extrapolate=8.0) -> dict:
  """sweep.json and points/NAME/{summary.json,metrics.jsonl} of an IsoFLOP sweep of CHINCHILLA's law, N counted
  non-embedding, C = 6 N D; one extrapolation run at `extrapolate` x the largest budget, its size the law's
  compute-optimal one; and two unfinished points. Returns the extrapolation run's true loss and size."""
  sizes = np.geomspace(4e5, 5e7, 9)
  points = []

  def add(kind, budget, n, loss_noise=True, completed=True, summary=True):
    name = f"{kind[0]}{len(points)}_c{budget:.0e}_n{n:.2e}"
    tokens = budget / (6 * n)
    points.append({"name": name, "kind": kind, "budget": budget, "size": f"n{n:.0f}", "n_params": n + EMBEDDING,
                   "n_params_non_embedding": n, "tokens": tokens, "flops_per_token": 6 * n, "steps": 20,
                   "batch_size": 4, "seq_len": tokens / 80})
    point_dir = workdir / "points" / name
    point_dir.mkdir(parents=True)
    loss = float(law(n, tokens)) * (np.exp(NOISE * rng.normal()) if loss_noise else 1.0)
    with open(point_dir / "metrics.jsonl", "w") as f:
      for step in range(1, 21):
        seen = tokens * step / 20
        f.write(json.dumps({"step": step, "loss": float(law(n, seen)), "tokens_seen": seen,
                            "flops_seen": 6 * n * seen}) + "\n")
      f.write(json.dumps({"step": 20, "eval_loss": loss, "eval_perplexity": float(np.exp(loss))}) + "\n")
    if summary:
      (point_dir / "summary.json").write_text(json.dumps({
          "step": 20 if completed else 7, "total_steps": 20, "completed": completed, "tokens": tokens,
          "flops": 6 * n * tokens, "flops_per_token": 6 * (n + EMBEDDING), "params": n + EMBEDDING,
          "non_embedding_params": n, "train_loss": loss * 1.01, "eval_loss": loss}))
    return loss

  for budget in budgets:
    for n in sizes:
      add("grid", budget, n)
  add("grid", budgets[0], sizes[0] * 1.5, completed=False)
  add("grid", budgets[0], sizes[0] * 2.0, summary=False)
  budget = extrapolate * max(budgets)
  n_opt, _ = closed_form_optimum(budget)
  loss = add("extrapolation", budget, n_opt, loss_noise=False)
  (workdir / "sweep.json").write_text(json.dumps({"counting": "non_embedding", "flop_count": "6nd",
                                                  "budgets": list(budgets), "points": points}))
  return {"loss": loss, "n_params": n_opt, "budget": budget}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "train.scaling", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_the_command_line_writes_fits_and_figures_and_reports_the_extrapolation_error(tmp_path):
  truth = write_sweep(tmp_path / "sweep", np.random.default_rng(4))
  out = tmp_path / "out"
  proc = _run_cli(f"--workdir={tmp_path / 'sweep'}", f"--out={out}", "--bootstrap=20", "--budget=1e17",
                  "--predict=1e6:1e9", "--holdout_budgets_above=4e15")
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert "non-embedding parameters" in text and "C = 6 N D" in text and "eval_loss" in text
  assert "2 point(s) unfinished" in text
  assert "Extrapolation" in text and "error" in text
  fits = json.loads((out / "fits.json").read_text())
  for name in ("isoflop.png", "frontier.png", "loss_fit.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert fits["counting"] == "non_embedding" and fits["num_grid_runs"] == 36
  assert fits["fits"]["approach3"]["alpha"] == pytest.approx(CHINCHILLA["alpha"], abs=0.05)
  assert fits["fits"]["approach2"]["a"] == pytest.approx(A_TRUE, abs=0.03)
  (run,) = fits["extrapolation"]
  assert run["measured_loss"] == pytest.approx(truth["loss"], rel=1e-9)
  assert abs(run["relative_error"]) < 0.01  # the grid's law, 8x past its largest budget
  assert f"{100 * run['relative_error']:+.2f}%" in text
  (answer,) = fits["compute_optimal"]
  assert answer["approach3"]["n_params"] == pytest.approx(closed_form_optimum(1e17)[0], rel=0.25)
  assert fits["predictions"][0]["loss"] == pytest.approx(float(law(1e6, 1e9)), rel=0.01)
  assert fits["holdout"]["mean_abs_relative_error"] < 0.01
  assert len(fits["bootstrap"]["samples"]["approach3"]["alpha"]) == 20


def test_total_counting_the_models_flop_count_and_plan_extrapolation(tmp_path):
  truth = write_sweep(tmp_path, np.random.default_rng(5))
  sweep = scaling.read_sweep(tmp_path, counting="total", flop_count="model")
  assert sweep.counting == "total" and sweep.flop_count == "model"
  assert min(sweep.grid.n_params) == pytest.approx(4e5 + EMBEDDING)
  # The summaries' flops_per_token is 6 x total parameters here: C = k N D with k = 6 for total N.
  np.testing.assert_allclose(sweep.grid.flops_per_token, 6 * sweep.grid.n_params)
  assert sweep.flops_per_param_token == pytest.approx(6.0)
  assert sorted(why for _, why in sweep.unfinished) == ["not started", "stopped at step 7 of 20"]
  plan = scaling.plan_extrapolation(tmp_path, factor=8.0)
  assert plan["budget"] == pytest.approx(truth["budget"])
  assert plan["method"] == "approach3" and plan["counting"] == "non_embedding"
  assert plan["n_params"] == pytest.approx(truth["n_params"], rel=0.25)
  assert plan["tokens"] * plan["n_params"] * 6 == pytest.approx(truth["budget"], rel=1e-9)
  assert plan["predicted_loss"] == pytest.approx(float(law(plan["n_params"], plan["tokens"])), rel=0.01)
  assert scaling.predict_loss(plan["fit"], plan["n_params"], plan["tokens"]) == pytest.approx(plan["predicted_loss"])


def test_bad_sweep_directories_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="sweep.json"):
    scaling.read_sweep(tmp_path)
  write_sweep(tmp_path, np.random.default_rng(6))
  broken = sorted((tmp_path / "points").glob("g0_*"))[0] / "summary.json"
  broken.write_text('{"completed": true, "tokens": ')
  with pytest.raises(scaling.SweepError, match=re.escape(f"{broken} is not valid JSON")):
    scaling.read_sweep(tmp_path)
  broken.write_text('{"completed": true, "eval_loss": 3.0}')
  with pytest.raises(scaling.SweepError, match=re.escape(f"{broken} has no 'tokens'")):
    scaling.read_sweep(tmp_path)


def test_a_broken_file_on_the_command_line_is_one_line_naming_it(tmp_path):
  write_sweep(tmp_path, np.random.default_rng(7))
  broken = sorted((tmp_path / "points").glob("g0_*"))[0] / "summary.json"
  broken.write_text("not json")
  proc = _run_cli(f"--workdir={tmp_path}", "--bootstrap=0")
  assert proc.returncode == cli.EXIT_STATUS, proc.stderr[-3000:]
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"error: {broken} is not valid JSON")
