"""python -m train.scaling --workdir=runs/scaling [--out=DIR] [--counting=non_embedding|total]
    [--flop_count=6nd|model] [--budget=1e15 ...] [--predict=N:D ...] [--bootstrap=200] [--holdout_budgets_above=C]

Fits scaling laws to the finished runs of a sweep (`python -m train.sweep` writes WORKDIR/sweep.json and
WORKDIR/points/NAME/{summary.json,metrics.jsonl}) and reports them: Kaplan's L(N) and L(D), Chinchilla's
Approaches 1, 2 and 3 with bootstrap intervals, the compute-optimal N and D of each --budget, the loss of each
--predict=N:D, and the error of the extrapolation run's predicted loss. --out=DIR writes DIR/fits.json and the
figures isoflop.png, frontier.png and loss_fit.png (train/scaling_figures.py). The fits themselves are in
train/scaling_fits.py, on arrays.

N is counted as sweep.json's "counting" says (non-embedding or total parameters; --counting overrides) and C as
its "flop_count" ("6nd": C = 6 N D; "model": C = model.flops_per_token x D; --flop_count overrides); a --budget
is in those FLOPs. A run's loss is its summary's eval_loss (held out), or its train_loss when eval was off; the
report says which. Points of kind "extrapolation" are never fitted, only predicted.
From a notebook:

    from train import scaling
    result = scaling.analyze(scaling.read_sweep("runs/scaling"), budgets=[1e15])
    print(scaling.report(result))
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

from configs import cli, validation
from rundir.loading import SUMMARY_FILE
from train import plot as plot_lib
from train import scaling_fits
from train.scaling_figures import write_outputs
from train.scaling_fits import (Runs, bootstrap, compute_optimal, degenerate_reason, fit_all, fit_approach1,
                                fit_approach2, fit_chinchilla, fit_kaplan, fit_power_law, power_law, predict_loss)
from train.sweep_plan import COUNTINGS, FLOP_COUNTS, PLAN_FILE, POINTS_DIR

__all__ = ["Runs", "Sweep", "SweepError", "analyze", "bootstrap", "compute_optimal", "fit_all", "fit_approach1",
           "fit_approach2", "fit_chinchilla", "fit_kaplan", "fit_power_law", "plan_extrapolation", "predict_loss",
           "read_sweep", "report", "write_outputs"]

N_KEYS = {"total": "n_params", "non_embedding": "n_params_non_embedding"}  # sweep.json's point keys
C_DEFINITIONS = {"6nd": "C = 6 N D", "model": "C = model.flops_per_token x D (the model's own FLOP count)"}
POINT_KEYS = ("name", "kind", "budget", "n_params", "n_params_non_embedding", "tokens", "flops_per_token")
KINDS = ("grid", "extrapolation")


class SweepError(ValueError):
  """A sweep file that is not valid JSON or lacks a key; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep directory, read: its finished runs (N counted as `counting` says) and what is not finished."""

  workdir: Path
  counting: str  # 'non_embedding' | 'total'
  flop_count: str  # '6nd' | 'model'
  grid: Runs  # the IsoFLOP grid's finished runs: the fits' data
  extrapolation: Runs  # finished runs of kind 'extrapolation': never fitted, only predicted
  loss_keys: dict[str, str]  # run name -> 'eval_loss' or 'train_loss', the loss taken as the run's
  planned_losses: dict[str, float]  # extrapolation run name -> the loss sweep.json predicted before it ran
  unfinished: tuple[tuple[str, str], ...]  # (name, why) of the points not used
  notes: tuple[str, ...] = ()  # what else the report should say: a training curve that could not be read

  @property
  def flops_per_param_token(self) -> float:
    """k in C = k N D: 6 for '6nd'; for 'model', the median over the grid of flops_per_token / N."""
    return 6.0 if self.flop_count == "6nd" else float(np.median(self.grid.flops_per_token / self.grid.n_params))


def _read_json(path: Path) -> dict:
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise SweepError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise SweepError(f"{path} holds a {type(value).__name__}, not a JSON object")
  return value


def _number(record: dict, key: str, where: str, *, positive: bool = True) -> float:
  """record[key] as a float, or SweepError naming where it is missing or bad."""
  if key not in record:
    raise SweepError(f"{where} has no {key!r}")
  value = record[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
    raise SweepError(f"{where}: {key}={value!r} must be a {'positive ' if positive else ''}number")
  return float(value)


def _loss(summary: dict, path: Path) -> tuple[float, str]:
  """The run's loss and its key: eval_loss (held out), else train_loss."""
  for key in ("eval_loss", "train_loss"):
    value = summary.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
      return float(value), key
  raise SweepError(f"{path} has neither a finite eval_loss nor train_loss "
                   f"(eval_loss={summary.get('eval_loss')!r}, train_loss={summary.get('train_loss')!r})")


def _curve(point_dir: Path, point: dict, flops_per_token: float, notes: list[str]) -> np.ndarray | None:
  """[2, T]: the FLOPs seen and the training loss of each train record of metrics.jsonl; None without one (and a
  line in `notes` when the file cannot be read)."""
  if not (point_dir / plot_lib.METRICS_FILE).is_file():
    return None
  tokens_per_step = point.get("batch_size", 0) * point.get("seq_len", 0)  # for records without tokens_seen
  try:
    records = [r for r in plot_lib.load_run(point_dir).train if math.isfinite(r.get("loss", math.nan))]
  except plot_lib.PlotError as e:  # a line cut short by a crash: only Approach 1 loses this curve
    notes.append(f"no training curve for Approach 1: {e}")
    return None
  tokens = [r.get("tokens_seen", r["step"] * tokens_per_step) for r in records]
  curve = np.array([[t * flops_per_token for t in tokens], [r["loss"] for r in records]], dtype=np.float64)
  return curve if curve.shape[1] >= 2 and (curve[0] > 0).all() else None


def read_sweep(workdir: str | os.PathLike, counting: str | None = None, flop_count: str | None = None) -> Sweep:
  """Reads WORKDIR/sweep.json and each point's summary.json and metrics.jsonl (train/sweep.py's layout).

  N is counted as `counting` says and C as `flop_count` ('6nd': 6 N D; 'model': the summary's flops_per_token
  x D), by default as sweep.json's "counting" and "flop_count" say; the IsoFLOP profiles stay the budgets the
  points were planned for. Points whose summary.json is missing or
  not completed are left out (listed in `unfinished`); a file that is not valid JSON or lacks a key raises
  SweepError naming it, and a missing sweep.json FileNotFoundError.
  """
  workdir = Path(workdir)
  path = workdir / PLAN_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: --workdir={str(workdir)!r} is not a sweep directory "
                            "(python -m train.sweep writes it)")
  plan = _read_json(path)
  for key in ("counting", "flop_count", "points"):
    if key not in plan:
      raise SweepError(f"{path} has no {key!r}")
  counting = counting or plan["counting"]
  if counting not in COUNTINGS:
    raise SweepError(f"counting={counting!r} (of {path} or --counting) is not one of {', '.join(COUNTINGS)}")
  flop_count = flop_count or plan["flop_count"]
  if flop_count not in FLOP_COUNTS:
    raise SweepError(f"flop_count={flop_count!r} (of {path} or --flop_count) is not one of {', '.join(FLOP_COUNTS)}")
  if not isinstance(plan["points"], list):
    raise SweepError(f"{path}: points must be a list, got {type(plan['points']).__name__}")
  rows = {kind: [] for kind in KINDS}
  loss_keys, planned, unfinished, notes = {}, {}, [], []
  for i, point in enumerate(plan["points"]):
    where = f"{path}: points[{i}]"
    if not isinstance(point, dict) or any(key not in point for key in POINT_KEYS):
      raise SweepError(f"{where} must be an object with the keys {', '.join(POINT_KEYS)}")
    if point["kind"] not in KINDS:
      raise SweepError(f"{where}: kind={point['kind']!r} is not one of {', '.join(KINDS)}")
    name, point_dir = str(point["name"]), workdir / POINTS_DIR / str(point["name"])
    summary_path = point_dir / SUMMARY_FILE
    if not summary_path.is_file():
      unfinished.append((name, "not started"))
      continue
    summary = _read_json(summary_path)
    if summary.get("completed") is not True:
      unfinished.append((name, f"stopped at step {summary.get('step')} of {summary.get('total_steps')}"))
      continue
    n = _number(point, N_KEYS[counting], where)
    tokens = _number(summary, "tokens", str(summary_path))
    per_token = 6.0 * n if flop_count == "6nd" else _number(summary, "flops_per_token", str(summary_path))
    loss, loss_keys[name] = _loss(summary, summary_path)
    if point["kind"] == "extrapolation" and isinstance(point.get("predicted_loss"), (int, float)):
      planned[name] = float(point["predicted_loss"])
    rows[point["kind"]].append((name, n, tokens, per_token, _number(point, "budget", where), loss,
                                _curve(point_dir, point, per_token, notes)))
  return Sweep(workdir=workdir, counting=counting, flop_count=flop_count, grid=_runs(rows["grid"]),
               extrapolation=_runs(rows["extrapolation"]), loss_keys=loss_keys, planned_losses=planned,
               unfinished=tuple(unfinished), notes=tuple(notes))


def _runs(rows: list[tuple]) -> Runs:
  names, n, tokens, per_token, budgets, losses, curves = zip(*rows) if rows else ((),) * 7
  return Runs(names=tuple(names), n_params=np.array(n, dtype=np.float64), tokens=np.array(tokens, dtype=np.float64),
              flops_per_token=np.array(per_token, dtype=np.float64), budgets=np.array(budgets, dtype=np.float64),
              losses=np.array(losses, dtype=np.float64), curves=tuple(curves))


# ---------------------------------------------------------------------------------------------------------------
# The analysis: every fit, the answers the user asked for, and the honest checks.


def _allocation(fits: dict, budget: float, per_param_token: float) -> dict:
  """The compute-optimal N and D of `budget` by each approach that fitted."""
  out = {"budget": float(budget)}
  law = fits["approach3"]
  out["approach3"] = (scaling_fits.or_error(compute_optimal, law, budget, per_param_token) if "error" not in law
                      else law)
  for name in ("approach1", "approach2"):
    fit = fits[name]
    out[name] = fit if "error" in fit else {"n_params": float(power_law(fit["n_opt"], budget)),
                                            "tokens": float(power_law(fit["tokens_opt"], budget))}
  return out


def _predicted(law: dict, runs: Runs, sweep: Sweep) -> list[dict]:
  """Each run's measured loss beside the one `law` predicts (None, and no error, when `law` is {"error": ...})."""
  out = []
  for i, name in enumerate(runs.names):
    measured = float(runs.losses[i])
    predicted = None if "error" in law else predict_loss(law, runs.n_params[i], runs.tokens[i])
    out.append({"name": name, "budget": float(runs.budgets[i]), "n_params": float(runs.n_params[i]),
                "tokens": float(runs.tokens[i]), "predicted_loss": predicted, "measured_loss": measured,
                "loss_key": sweep.loss_keys.get(name, "eval_loss"),
                "error": None if predicted is None else predicted - measured,
                "relative_error": None if predicted is None else (predicted - measured) / measured})
  return out


def _holdout(sweep: Sweep, budgets_above: float) -> dict:
  """Approach 3 fitted on the grid's budgets <= budgets_above, predicting the runs of the larger ones."""
  grid = sweep.grid
  kept = np.flatnonzero(grid.budgets <= budgets_above)
  held = np.flatnonzero(grid.budgets > budgets_above)
  if len(held) == 0:
    return {"budgets_above": budgets_above, "error": f"no grid budget is above {budgets_above:g}"}
  law = scaling_fits.or_error(fit_chinchilla, grid.n_params[kept], grid.tokens[kept], grid.losses[kept])
  if "error" in law:
    return {"budgets_above": budgets_above, "error": law["error"]}
  runs = _predicted(law, grid.subset(held), sweep)
  return {"budgets_above": budgets_above, "fit": law, "num_fitted": len(kept), "runs": runs,
          "mean_abs_relative_error": float(np.mean([abs(r["relative_error"]) for r in runs]))}


def analyze(sweep: Sweep, *, budgets: Sequence[float] = (), predictions: Sequence[tuple[float, float]] = (),
            resamples: int = 200, seed: int = 0, holdout_budgets_above: float | None = None) -> dict:
  """Every fit of the sweep's grid runs, with bootstrap intervals (`resamples` of them; 0: none), the
  compute-optimal N and D of each budget, the loss of each (N, D) in `predictions`, the error of each finished
  extrapolation run's predicted loss and, with holdout_budgets_above, of a fit on the smaller budgets only.
  Returns what write_outputs writes to fits.json: dicts, lists and numbers (nan where a resample failed)."""
  grid = sweep.grid
  if len(grid) == 0:
    raise SweepError(f"{sweep.workdir / PLAN_FILE}: no grid point has finished yet "
                     f"({len(sweep.unfinished)} unfinished)")
  fits = fit_all(grid)
  law = fits["approach3"]
  k = sweep.flops_per_param_token
  keys = sorted(set(sweep.loss_keys[name] for name in grid.names))
  result = {
      "workdir": str(sweep.workdir), "counting": sweep.counting, "flop_count": sweep.flop_count,
      "C": C_DEFINITIONS[sweep.flop_count], "flops_per_param_token": k, "loss": keys,
      "num_grid_runs": len(grid), "num_extrapolation_runs": len(sweep.extrapolation),
      "unfinished": [list(u) for u in sweep.unfinished], "notes": list(sweep.notes), "fits": fits,
      "bootstrap": bootstrap(grid, fits, resamples=resamples, seed=seed) if resamples else None,
      "compute_optimal": [_allocation(fits, c, k) for c in budgets],
      "predictions": [{"n_params": n, "tokens": d, "loss": predict_loss(law, n, d) if "error" not in law else None}
                      for n, d in predictions],
      "grid_runs": _predicted(law, grid, sweep),
      "extrapolation": [{**run, "planned_loss": sweep.planned_losses.get(run["name"])}
                        for run in _predicted(law, sweep.extrapolation, sweep)],
      "holdout": _holdout(sweep, holdout_budgets_above) if holdout_budgets_above is not None else None,
  }
  return result


def plan_extrapolation(workdir_or_points: str | os.PathLike | Runs, factor: float = 8.0) -> dict:
  """The run to extrapolate to: the compute-optimal N and D at `factor` x the largest grid budget, and its loss,
  fitted on the finished grid runs (a sweep directory, read with its own counting, or Runs).

  Approach 3's law gives the allocation (compute_optimal) unless its fit is degenerate (degenerate_reason:
  an exponent at ~0 or past the grid), when Approach 2's N_opt(C) does, with D = C / (k N). The loss is the
  Approach-3 law's either way (Approach 2 has no loss law). Returns "budget", "n_params", "tokens",
  "predicted_loss", "fit" (the Approach-3 law: predict_loss(fit, N, D) for a nearby size), "method"
  ('approach3' | 'approach2'), "note" (why Approach 2, or ''), "counting" (None for Runs) and
  "flops_per_param_token" (k in C = k N D).
  """
  if factor <= 0:
    raise ValueError(f"factor={factor!r} must be > 0")
  if isinstance(workdir_or_points, Runs):
    runs, counting = workdir_or_points, None
  else:
    sweep = read_sweep(workdir_or_points)
    runs, counting = sweep.grid, sweep.counting
  if len(runs) == 0:
    raise ValueError("plan_extrapolation needs finished grid runs; there are none")
  k = float(np.median(runs.flops_per_token / runs.n_params))  # 6 exactly when C = 6 N D
  budget = factor * float(runs.budgets.max())
  law = fit_chinchilla(runs.n_params, runs.tokens, runs.losses)
  note = degenerate_reason(law)
  if note is None:
    optimum, method = compute_optimal(law, budget, k), "approach3"
    n_params, tokens = optimum["n_params"], optimum["tokens"]
  else:
    profiles = fit_approach2(runs.budgets, runs.n_params, runs.losses, runs.flops_per_token)
    n_params, method = float(power_law(profiles["n_opt"], budget)), "approach2"
    tokens = budget / (k * n_params)
    note = f"Approach 3's fit is degenerate ({note}): N from Approach 2"
  return {"budget": budget, "n_params": n_params, "tokens": tokens,
          "predicted_loss": predict_loss(law, n_params, tokens), "fit": law, "method": method, "note": note or "",
          "counting": counting, "flops_per_param_token": k}


# ---------------------------------------------------------------------------------------------------------------
# The report.


def _interval(result: dict, approach: str, key: str) -> str:
  boot = result["bootstrap"]
  if not boot:
    return ""
  low, high = boot["intervals"][approach][key]
  return f" [{low:.3g}, {high:.3g}]" if math.isfinite(low) else " [no interval]"


def _frontier_lines(result: dict, name: str) -> list[str]:
  fit = result["fits"][name]
  return [f"  N_opt = {fit['n_opt']['coefficient']:.3g} C^{fit['a']:.3f}{_interval(result, name, 'a')}",
          f"  D_opt = {fit['tokens_opt']['coefficient']:.3g} C^{fit['b']:.3f}{_interval(result, name, 'b')}"]


def report(result: dict) -> str:
  """analyze's result as text a researcher reads: the counting, each law, the answers asked for, the checks."""
  counted = "non-embedding" if result["counting"] == "non_embedding" else "total"
  fits = result["fits"]
  lines = [f"Scaling fits of {result['workdir']}",
           f"  N: {counted} parameters; {result['C']}, in FLOPs (k = {result['flops_per_param_token']:.4g} FLOPs "
           f"per parameter per token); loss: {' and '.join(result['loss'])} of each run's summary",
           f"  {result['num_grid_runs']} grid runs fitted, {result['num_extrapolation_runs']} extrapolation run(s) "
           f"finished, {len(result['unfinished'])} point(s) unfinished and skipped"
           + (f" ({', '.join(name for name, _ in result['unfinished'][:5])}"
              f"{', ...' if len(result['unfinished']) > 5 else ''})" if result["unfinished"] else "")]
  lines += [f"  note: {note}" for note in result["notes"]]
  if result["bootstrap"]:
    boot = result["bootstrap"]
    lines.append(f"  [low, high]: {boot['percentiles'][1] - boot['percentiles'][0]:.0f}% bootstrap interval, "
                 f"{boot['resamples']} resamples of the runs")
  lines.append("Kaplan et al. 2020, fitted on the Pareto front of the runs (not at convergence: rough)")
  kaplan = fits["kaplan"]
  if "error" in kaplan:
    lines.append(f"  not fitted: {kaplan['error']}")
  else:
    lines += [f"  L(N) = (N_c / N)^alpha_N: alpha_N = {kaplan['alpha_N']:.4f}{_interval(result, 'kaplan', 'alpha_N')},"
              f" N_c = {kaplan['N_c']:.3g}",
              f"  L(D) = (D_c / D)^alpha_D: alpha_D = {kaplan['alpha_D']:.4f}{_interval(result, 'kaplan', 'alpha_D')},"
              f" D_c = {kaplan['D_c']:.3g}"]
  lines.append("Chinchilla Approach 1: the envelope of the training curves")
  lines += ([f"  not fitted: {fits['approach1']['error']}"] if "error" in fits["approach1"]
            else _frontier_lines(result, "approach1"))
  lines.append("Chinchilla Approach 2: a parabola per IsoFLOP profile")
  if "error" in fits["approach2"]:
    lines.append(f"  not fitted: {fits['approach2']['error']}")
  else:
    for profile in fits["approach2"]["profiles"]:
      lines.append(f"  C = {profile['budget']:.3g}: N_opt = {profile['n_opt']:.3g}, "
                   f"D_opt = {profile['tokens_opt']:.3g}, L = {profile['loss_opt']:.4f}")
    lines += [f"  C = {s['budget']:.3g} skipped: {s['reason']}" for s in fits["approach2"]["skipped"]]
    lines += _frontier_lines(result, "approach2")
  lines.append("Chinchilla Approach 3: L(N, D) = E + A / N^alpha + B / D^beta (Huber 1e-3 on log L, L-BFGS)")
  law = fits["approach3"]
  if "error" in law:
    lines.append(f"  not fitted: {law['error']}")
  else:
    lines.append(f"  E = {law['E']:.4g}{_interval(result, 'approach3', 'E')}, A = {law['A']:.4g}, B = {law['B']:.4g}, "
                 f"alpha = {law['alpha']:.4f}{_interval(result, 'approach3', 'alpha')}, "
                 f"beta = {law['beta']:.4f}{_interval(result, 'approach3', 'beta')}")
    if law["alpha"] + law["beta"] > 0:
      lines.append(f"  so N_opt ~ C^{law['beta'] / (law['alpha'] + law['beta']):.3f}, "
                   f"D_opt ~ C^{law['alpha'] / (law['alpha'] + law['beta']):.3f}")
    if degenerate_reason(law):
      lines.append(f"  degenerate: {degenerate_reason(law)}")
  for answer in result["compute_optimal"]:
    lines.append(f"Compute-optimal at C = {answer['budget']:.3g} FLOPs")
    for name in ("approach3", "approach2", "approach1"):
      fit = answer[name]
      lines.append(f"  {name}: " + (f"not fitted ({fit['error']})" if "error" in fit else
                                     f"N = {fit['n_params']:.4g}, D = {fit['tokens']:.4g}"
                                     + (f", predicted loss {fit['loss']:.4f}" if "loss" in fit else "")))
  for p in result["predictions"]:
    loss = "no Approach-3 fit" if p["loss"] is None else f"{p['loss']:.4f}"
    lines.append(f"Predicted loss of N = {p['n_params']:.4g}, D = {p['tokens']:.4g}: {loss}")
  for run in result["extrapolation"]:
    head = (f"Extrapolation {run['name']} (C = {run['budget']:.3g}, N = {run['n_params']:.4g}, "
            f"D = {run['tokens']:.4g}): measured {run['measured_loss']:.4f} ({run['loss_key']})")
    if run["predicted_loss"] is None:
      lines.append(f"{head}; no Approach-3 fit to predict it")
      continue
    lines.append(f"{head}, predicted {run['predicted_loss']:.4f} by the grid's Approach-3 fit: error "
                 f"{run['error']:+.4f} ({100 * run['relative_error']:+.2f}%)"
                 + (f"; sweep.json's prediction before it ran: {run['planned_loss']:.4f}"
                    if run["planned_loss"] is not None else ""))
  holdout = result["holdout"]
  if holdout is not None:
    lines.append(f"Hold-out: Approach 3 on the grid budgets <= {holdout['budgets_above']:.3g}, predicting the rest")
    if "error" in holdout:
      lines.append(f"  not fitted: {holdout['error']}")
    else:
      lines += [f"  {r['name']}: predicted {r['predicted_loss']:.4f}, measured {r['measured_loss']:.4f} "
                f"({100 * r['relative_error']:+.2f}%)" for r in holdout["runs"]]
      lines.append(f"  mean |relative error| {100 * holdout['mean_abs_relative_error']:.2f}% over "
                   f"{len(holdout['runs'])} runs ({holdout['num_fitted']} fitted)")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The command line.


def define_flags() -> None:
  """The command line's flags; defined only when run as a program (python -m train.sweep imports this module
  and has a --workdir of its own)."""
  flags.DEFINE_string("workdir", None, "The sweep's directory (sweep.json, points/).")
  flags.DEFINE_string("out", None, "Write DIR/fits.json, isoflop.png, frontier.png and loss_fit.png.")
  flags.DEFINE_enum("counting", None, COUNTINGS, "How N is counted (default: sweep.json's counting).")
  flags.DEFINE_enum("flop_count", None, FLOP_COUNTS,
                    "C = 6 N D (6nd) or the model's own FLOP count x D (model); default: sweep.json's flop_count.")
  flags.DEFINE_multi_float("budget", [], "A compute budget C in FLOPs (as the sweep counts C) to allocate.")
  flags.DEFINE_multi_string("predict", [], "N:D, a run of N parameters (as counted) and D tokens to predict.")
  flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the intervals (0: none).", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "The bootstrap's seed.")
  flags.DEFINE_float("holdout_budgets_above", None, "Also fit on the grid budgets <= C only and predict the rest.")
  flags.mark_flag_as_required("workdir")


def parse_prediction(text: str) -> tuple[float, float]:
  """'1e8:2e9' -> (1e8, 2e9); a ConfigError naming --predict otherwise."""
  try:
    n, d = (float(part) for part in text.split(":"))
  except ValueError:
    raise validation.ConfigError(f"--predict={text!r} must be N:D, e.g. --predict=1e8:2e9") from None
  if not (n > 0 and d > 0 and math.isfinite(n) and math.isfinite(d)):
    raise validation.ConfigError(f"--predict={text!r}: N and D must be finite and positive")
  return n, d


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise validation.ConfigError(f"unexpected arguments: {argv[1:]}")
  flag = flags.FLAGS
  if any(not (math.isfinite(c) and c > 0) for c in flag.budget):
    raise validation.ConfigError(f"--budget={flag.budget} must be finite, positive FLOPs")
  predictions = [parse_prediction(text) for text in flag.predict]
  try:
    sweep = read_sweep(flag.workdir, flag.counting, flag.flop_count)
    result = analyze(sweep, budgets=flag.budget, predictions=predictions, resamples=flag.bootstrap, seed=flag.seed,
                     holdout_budgets_above=flag.holdout_budgets_above)
  except (SweepError, plot_lib.PlotError) as e:  # configs.cli reports a ConfigError in one line, exit status 2
    raise validation.ConfigError(str(e)) from e
  print(report(result), flush=True)
  if flag.out:
    for path in write_outputs(result, flag.out):
      print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
