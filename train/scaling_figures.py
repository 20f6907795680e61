"""fits.json and the figures of `python -m train.scaling --out=DIR`: isoflop.png (loss against N per
budget with each profile's parabola), frontier.png (N_opt and D_opt against C, Approaches 1-3 with
their bootstrap bands) and loss_fit.png (measured against predicted loss). matplotlib is imported
only when a figure is drawn (headless).
"""

import math
import os
from pathlib import Path

import numpy as np

from rundir import loading
from train.plot import save_figure
from train.scaling_fits import compute_optimal, degenerate_reason



def _json_ready(value):
  """Non-finite floats as None (JSON has no NaN), numpy scalars as Python numbers."""
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_outputs(result: dict, out: str | os.PathLike) -> list[Path]:
  """DIR/fits.json (analyze's result) and the figures isoflop.png, frontier.png, loss_fit.png; returns the paths."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  loading.write_json_atomic(out / "fits.json", _json_ready(result))
  paths = [out / "fits.json"]
  for name, draw in (("isoflop.png", _isoflop_figure), ("frontier.png", _frontier_figure),
                     ("loss_fit.png", _loss_fit_figure)):
    save_figure(draw(result), out / name)
    paths.append(out / name)
  return paths


def _new_figure(columns: int = 1):
  import matplotlib  # noqa: PLC0415 (here: reading and fitting a sweep needs no matplotlib)

  matplotlib.use("Agg")  # headless
  from matplotlib import figure as figure_lib  # noqa: PLC0415

  figure = figure_lib.Figure(figsize=(5.5 * columns, 4.2), layout="constrained")
  return figure, figure.subplots(1, columns, squeeze=False)[0]


def _isoflop_figure(result: dict):
  """Loss against N per budget, with each profile's fitted parabola and its minimum."""
  figure, (panel,) = _new_figure()
  runs = result["grid_runs"]
  budgets = sorted({r["budget"] for r in runs})
  colours = {c: f"C{i % 10}" for i, c in enumerate(budgets)}
  for r in runs:
    panel.scatter(r["n_params"], r["measured_loss"], color=colours[r["budget"]], s=18)
  profiles = result["fits"]["approach2"].get("profiles", [])
  for p in profiles:
    sizes = [r["n_params"] for r in runs if r["budget"] == p["budget"]]
    x = np.linspace(np.log(min(sizes)) - 0.2, np.log(max(sizes)) + 0.2, 100)
    c2, c1, c0 = p["parabola"]
    colour = colours.get(p["budget"], "k")
    panel.plot(np.exp(x), c2 * x**2 + c1 * x + c0, color=colour, label=f"C = {p['budget']:.2g}")
    panel.scatter(p["n_opt"], p["loss_opt"], color=colour, marker="*", s=120, edgecolor="k", zorder=3)
  panel.set(xscale="log", xlabel=f"N ({result['counting']} parameters)", ylabel="final loss",
            title="IsoFLOP profiles (Approach 2); * = each minimum")
  if profiles:
    panel.legend(fontsize=7)
  panel.grid(alpha=0.3)
  return figure


def _frontier_curves(result: dict, budgets: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per approach, (the fit, the bootstrap band's low, its high), each [2, C]: N_opt and D_opt at `budgets`."""
  fits, k = result["fits"], result["flops_per_param_token"]
  samples = (result["bootstrap"] or {}).get("samples", {})

  def approach3(law):
    optima = [compute_optimal(law, c, k) for c in budgets]
    return np.array([[o["n_params"] for o in optima], [o["tokens"] for o in optima]])

  def approach1_or_2(law):
    with np.errstate(over="ignore", invalid="ignore"):  # a resample's wild law: inf or nan, not drawn
      return np.array([law["k_n"] * budgets ** law["a"], law["k_d"] * budgets ** law["b"]])

  out = {}
  for name in ("approach1", "approach2", "approach3"):
    fit = fits[name]
    if "error" in fit or (name == "approach3" and degenerate_reason(fit)):
      continue
    frontier = approach3 if name == "approach3" else approach1_or_2
    drawn = samples.get(name, {})
    laws = [dict(zip(drawn, values)) for values in zip(*drawn.values())]
    sampled = [frontier(law) for law in laws if all(math.isfinite(v) for v in law.values())
               and (name != "approach3" or degenerate_reason(law) is None)]
    best = frontier(fit)
    low, high = np.percentile(sampled, result["bootstrap"]["percentiles"], axis=0) if sampled else (best, best)
    out[name] = (best, low, high)
  return out


def _frontier_figure(result: dict):
  """N_opt and D_opt against C: Approach 1's envelope, Approach 2's minima, the three fitted laws and bands."""
  figure, panels = _new_figure(columns=2)
  fits = result["fits"]
  known = [p["budget"] for p in fits["approach2"].get("profiles", [])] + [p[0] for p in
                                                                         fits["approach1"].get("envelope", [])]
  known += [a["budget"] for a in result["compute_optimal"]] + [r["budget"] for r in result["extrapolation"]]
  known += [r["budget"] for r in result["grid_runs"]]
  budgets = np.geomspace(min(known) / 2, max(known) * 2, 60) if known else np.geomspace(1e12, 1e16, 60)
  styles = {"approach1": ("C0", "Approach 1"), "approach2": ("C1", "Approach 2"), "approach3": ("C2", "Approach 3")}
  for name, (best, low, high) in _frontier_curves(result, budgets).items():
    colour, label = styles[name]
    for row, panel in enumerate(panels):
      panel.plot(budgets, best[row], color=colour, label=label)
      panel.fill_between(budgets, low[row], high[row], color=colour, alpha=0.2)
  envelope = np.array(fits["approach1"].get("envelope", []))
  if len(envelope):
    for row, panel in enumerate(panels):
      panel.scatter(envelope[:, 0], envelope[:, 1 + row], color="C0", s=8)
  profiles = fits["approach2"].get("profiles", [])
  for row, key in enumerate(("n_opt", "tokens_opt")):
    panels[row].scatter([p["budget"] for p in profiles], [p[key] for p in profiles], color="C1", marker="*", s=80,
                        edgecolor="k", zorder=3)
  for r in result["extrapolation"]:
    for row, key in enumerate(("n_params", "tokens")):
      panels[row].scatter(r["budget"], r[key], color="C3", marker="D", s=40, zorder=3,
                          label="extrapolation run" if row == 0 else None)
  band = "bands: bootstrap 90%" if result["bootstrap"] else "no bootstrap"
  panels[0].set(ylabel=f"N_opt ({result['counting']} parameters)", title=f"Compute-optimal N ({band})")
  panels[1].set(ylabel="D_opt (tokens)", title="Compute-optimal D")
  for panel in panels:
    panel.set(xscale="log", yscale="log", xlabel="C (FLOPs)")
    panel.grid(alpha=0.3)
  panels[0].legend(fontsize=7)
  return figure


def _loss_fit_figure(result: dict):
  """Each run's measured final loss against the Approach-3 law's prediction (grid, extrapolation, hold-out)."""
  figure, (panel,) = _new_figure()
  groups = [("grid runs (fitted)", result["grid_runs"], "C0", "o"),
            ("extrapolation (not fitted)", result["extrapolation"], "C3", "D")]
  if result["holdout"] and "runs" in result["holdout"]:
    groups.append((f"hold-out (fit on C <= {result['holdout']['budgets_above']:.2g})", result["holdout"]["runs"],
                   "C1", "s"))
  values = []
  for label, runs, colour, marker in groups:
    runs = [r for r in runs if r["predicted_loss"] is not None]
    if runs:
      predicted, measured = [r["predicted_loss"] for r in runs], [r["measured_loss"] for r in runs]
      panel.scatter(predicted, measured, color=colour, marker=marker, s=24, label=label)
      values += predicted + measured
  if values:
    low, high = min(values), max(values)
    panel.plot([low, high], [low, high], color="k", lw=0.8, label="measured = predicted")
    panel.legend(fontsize=7)
  panel.set(xlabel="predicted final loss (Approach 3)", ylabel="measured final loss",
            title="L(N, D) = E + A/N^alpha + B/D^beta against the runs")
  panel.grid(alpha=0.3)
  return figure
