"""The scaling-law fits of Kaplan et al. 2020 and Hoffmann et al. 2022 ("Chinchilla"), on plain arrays.

N is parameters (counted as the caller chooses), D training tokens, C = (FLOPs per token) x D training
compute, L the loss. Everything is float64 numpy; `train/scaling.py` reads a sweep into these arrays
and reports.

- Kaplan: L(N) = (N_c / N)^alpha_N and L(D) = (D_c / D)^alpha_D (`fit_power_law`, `fit_kaplan`).
- Chinchilla Approach 1: the envelope of the training curves gives N_opt(C), D_opt(C) (`fit_approach1`).
- Approach 2: a parabola per IsoFLOP profile, then N_opt = k_N C^a, D_opt = k_D C^b (`fit_approach2`).
- Approach 3: L(N, D) = E + A / N^alpha + B / D^beta (`fit_chinchilla`, `predict_loss`,
  `compute_optimal`).
"""

import dataclasses
import itertools

import numpy as np

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, app. D.2
# The paper's grid of L-BFGS initialisations (app. D.2), in the order of the parameters theta = (a, b, e, alpha,
# beta), with A = exp(a), B = exp(b), E = exp(e).
PAPER_GRID = np.array(list(itertools.product(
    np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0), np.arange(-1.0, 1.5, 0.5),
    np.arange(0.0, 2.5, 0.5), np.arange(0.0, 2.5, 0.5))))
# L-BFGS runs from this many of the grid's points, those where the objective is lowest: the paper runs it from all
# 4,500 (num_starts=None), 70 times the work; the screened starts reach the same minimum on the tests' data.
NUM_STARTS = 64


def _checked(name: str, values) -> np.ndarray:
  """values as a 1-D float64 array, finite and positive, or a ValueError naming the first bad one."""
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence, got shape {array.shape}")
  bad = ~np.isfinite(array) | (array <= 0)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{name}[{i}]={float(array[i])!r} must be finite and positive")
  return array


def _same_length(**arrays: np.ndarray) -> None:
  lengths = {name: len(a) for name, a in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"the inputs must have one length each, got {lengths}")


def fit_power_law(x, y) -> dict[str, float]:
  """y = coefficient * x^exponent, by least squares on log y against log x.

  Returns "coefficient" and "exponent", and Kaplan's reading of the same line, y = (scale / x)^alpha:
  "alpha" = -exponent and "scale" = coefficient^(1 / alpha) (inf when the exponent is 0); also
  "rmse_log" (the root mean square residual of log y) and "num_points".
  """
  x, y = _checked("x", x), _checked("y", y)
  _same_length(x=x, y=y)
  if len(x) < 2:
    raise ValueError(f"a power law needs at least 2 points, got {len(x)}")
  if np.ptp(np.log(x)) == 0:
    raise ValueError(f"a power law needs at least 2 distinct x, got x={float(x[0])!r} only")
  exponent, intercept = np.polyfit(np.log(x), np.log(y), 1)
  residual = np.log(y) - (intercept + exponent * np.log(x))
  alpha = -float(exponent)
  with np.errstate(over="ignore"):  # a near-flat law has a scale (or coefficient) past float64: inf says so
    scale = float(np.exp(intercept / alpha)) if alpha != 0 else float("inf")
    coefficient = float(np.exp(intercept))
  return {"coefficient": coefficient, "exponent": float(exponent), "alpha": alpha, "scale": scale,
          "rmse_log": float(np.sqrt(np.mean(residual**2))), "num_points": len(x)}


def power_law(fit: dict[str, float], x) -> np.ndarray:
  """fit_power_law's law evaluated at x."""
  return fit["coefficient"] * np.asarray(x, dtype=np.float64) ** fit["exponent"]


# ---------------------------------------------------------------------------------------------------------------
# Approach 3: L(N, D) = E + A / N^alpha + B / D^beta.


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                     weights: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """sum_i w_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) (Hoffmann et al. 2022, app. D.2)
  and its gradient, for S parameter vectors theta [S, 5] = (a, b, e, alpha, beta) with weights w [S, P] (a
  bootstrap resample is a weighting of the runs by how often each is drawn): f [S], grad [S, 5]."""
  a, b, e, alpha, beta = (theta[:, j:j + 1] for j in range(5))  # each [S, 1]
  n_term, d_term = a - alpha * log_n, b - beta * log_d  # [S, P]
  top = np.maximum(np.maximum(n_term, d_term), e)
  n_share, d_share, e_share = np.exp(n_term - top), np.exp(d_term - top), np.exp(e - top)
  total = n_share + d_share + e_share
  residual = top + np.log(total) - log_l
  size = np.abs(residual)
  loss = (weights * np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta))).sum(axis=1)
  slope = weights * np.clip(residual, -delta, delta) / total  # w Huber'(residual) / sum of the shares
  n_slope, d_slope = slope * n_share, slope * d_share  # d LSE / d term is each term's share of the total
  grad = np.stack([n_slope.sum(1), d_slope.sum(1), (slope * e_share).sum(1), -(n_slope * log_n).sum(1),
                   -(d_slope * log_d).sum(1)], axis=1)
  return loss, grad


def lbfgs(objective, x0, *, memory: int = 10, max_iter: int = 200, ftol: float = 1e-10,
          gtol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
  """Minimises `objective` from each row of x0 [S, K] at once; returns (x [S, K], f [S]).

  L-BFGS (Nocedal & Wright 2006, alg. 7.4 and 7.5: the two-loop recursion over the last `memory` steps) with a
  backtracking (Armijo) line search, batched over the S starts: `objective(x [S', K], rows [S'])` returns
  (f [S'], grad [S', K]) for the starts `rows` of x0. One vectorised run costs what a few scipy.optimize.minimize
  calls do, which makes the paper's 4,500 starts, or a whole bootstrap, one call (scipy's L-BFGS-B also calls
  threaded BLAS on these 5-vectors, many times slower on a busy machine).
  A start stops when a step lowers f by no more than ftol * |f|, its gradient is below gtol, or no step does.
  """
  x = np.array(x0, dtype=np.float64)
  num, size = x.shape
  f, g = objective(x, np.arange(num))
  s_memory, y_memory = np.zeros((memory, num, size)), np.zeros((memory, num, size))
  rho = np.zeros((memory, num))  # 1 / (s . y); 0 marks a pair skipped (or not yet made): it then adds nothing
  gamma = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-12)  # so that the first step has length 1
  active = np.isfinite(f) & np.isfinite(g).all(axis=1)
  for iteration in range(max_iter):
    rows = np.flatnonzero(active)
    if rows.size == 0:
      break
    # The two-loop recursion: r = H g, H the inverse Hessian estimate from the stored pairs.
    newest_first = [(iteration - 1 - j) % memory for j in range(min(iteration, memory))]
    r, coefficient = g[rows].copy(), {}
    for j in newest_first:
      coefficient[j] = rho[j, rows] * np.einsum("sk,sk->s", s_memory[j, rows], r)
      r -= coefficient[j][:, None] * y_memory[j, rows]
    r *= gamma[rows, None]
    for j in reversed(newest_first):
      r += (coefficient[j] - rho[j, rows] * np.einsum("sk,sk->s", y_memory[j, rows], r))[:, None] * s_memory[j, rows]
    direction = -r
    slope = np.einsum("sk,sk->s", g[rows], direction)
    uphill = ~(slope < 0)  # a stale estimate: fall back to steepest descent
    direction[uphill] = -g[rows][uphill] * gamma[rows][uphill, None]
    slope[uphill] = np.einsum("sk,sk->s", g[rows][uphill], direction[uphill])
    # Backtracking: halve the step until f falls by at least 1e-4 of what the slope promises (Armijo).
    step, todo = np.ones(rows.size), np.arange(rows.size)
    x_new, f_new, g_new = x[rows], f[rows], g[rows]  # fancy indexing: copies
    for _ in range(40):
      trial = x[rows[todo]] + step[todo, None] * direction[todo]
      f_trial, g_trial = objective(trial, rows[todo])
      ok = np.isfinite(f_trial) & (f_trial <= f[rows[todo]] + 1e-4 * step[todo] * slope[todo])
      x_new[todo[ok]], f_new[todo[ok]], g_new[todo[ok]] = trial[ok], f_trial[ok], g_trial[ok]
      todo = todo[~ok]
      step[todo] *= 0.5
      if todo.size == 0:
        break
    stuck = np.zeros(rows.size, dtype=bool)
    stuck[todo] = True
    s, y = x_new - x[rows], g_new - g[rows]
    sy = np.einsum("sk,sk->s", s, y)
    # Keep a pair only where the curvature is positive: Armijo alone does not promise it.
    yy = np.einsum("sk,sk->s", y, y)
    keep = ~stuck & (yy > 0) & (sy > 1e-12 * np.sqrt(np.einsum("sk,sk->s", s, s) * yy))
    slot = iteration % memory
    s_memory[slot, rows], y_memory[slot, rows] = s * keep[:, None], y * keep[:, None]
    rho[slot, rows] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
    gamma[rows[keep]] = sy[keep] / yy[keep]
    done = stuck | (f[rows] - f_new <= ftol * np.abs(f[rows])) | (np.abs(g_new).max(axis=1) <= gtol)
    x[rows], f[rows], g[rows] = x_new, f_new, g_new
    active[rows[done]] = False
  return x, f


def _fit_laws(n: np.ndarray, d: np.ndarray, l: np.ndarray, weights: np.ndarray, starts: np.ndarray,
              num_starts: int | None, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """The best (a, b, e, alpha, beta) [R, 5] and its objective [R] for each weighting of the runs [R, P], from
  the `num_starts` starts where each weighting's objective is lowest (all when None)."""
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(l)
  if num_starts is not None and num_starts < len(starts):
    chosen = np.stack([np.argsort(_huber_objective(starts, log_n, log_d, log_l, w[None], delta)[0],
                                  kind="stable")[:num_starts] for w in weights])  # [R, num_starts]
  else:
    chosen = np.broadcast_to(np.arange(len(starts)), (len(weights), len(starts)))
  per_weighting = chosen.shape[1]
  row_weights = np.repeat(weights, per_weighting, axis=0)  # [R * starts, P]
  # L-BFGS runs on a - alpha log N = (a - alpha mean log N) - alpha (log N - mean log N), the same for b: centred,
  # a and alpha are no longer nearly collinear (log N ~ 20 otherwise), and it converges in a fraction of the steps.
  mean_n, mean_d = log_n.mean(), log_d.mean()

  def objective(theta, rows):
    with np.errstate(over="ignore", invalid="ignore"):  # a start that runs off gives inf or nan: lbfgs drops it
      return _huber_objective(theta, log_n - mean_n, log_d - mean_d, log_l, row_weights[rows], delta)

  theta0 = starts[chosen.reshape(-1)]  # a copy (fancy indexing)
  theta0[:, 0] -= theta0[:, 3] * mean_n
  theta0[:, 1] -= theta0[:, 4] * mean_d
  thetas, values = lbfgs(objective, theta0)
  thetas[:, 0] += thetas[:, 3] * mean_n
  thetas[:, 1] += thetas[:, 4] * mean_d
  thetas, values = thetas.reshape(len(weights), per_weighting, 5), values.reshape(len(weights), per_weighting)
  best = np.argmin(np.where(np.isfinite(values), values, np.inf), axis=1)
  rows = np.arange(len(weights))
  return thetas[rows, best], values[rows, best]


def _law(theta: np.ndarray, value: float, num_points: int) -> dict[str, float]:
  a, b, e, alpha, beta = (float(t) for t in theta)
  return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta,
          "huber_loss": float(value), "num_points": num_points}


def fit_chinchilla(n_params, n_tokens, losses, *, delta: float = HUBER_DELTA, starts=None,
                   num_starts: int | None = NUM_STARTS) -> dict[str, float]:
  """Approach 3 of Hoffmann et al. 2022 (app. D.2): L(N, D) = E + A / N^alpha + B / D^beta.

  Minimises sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i), delta 1e-3, where
  A = exp(a), B = exp(b), E = exp(e), with L-BFGS (`lbfgs`) from the starts [S, 5] of (a, b, e, alpha, beta)
  (the paper's grid, PAPER_GRID, by default) where the objective is lowest, `num_starts` of them (None: all),
  keeping the best. Returns "E", "A", "B", "alpha", "beta", "huber_loss" (the objective there), "num_points".
  """
  n, d, l = _checked("n_params", n_params), _checked("n_tokens", n_tokens), _checked("losses", losses)
  _same_length(n_params=n, n_tokens=d, losses=l)
  if len(n) < 5:
    raise ValueError(f"fit_chinchilla fits 5 constants and needs at least 5 runs, got {len(n)}")
  starts = PAPER_GRID if starts is None else np.asarray(starts, dtype=np.float64).reshape(-1, 5)
  thetas, values = _fit_laws(n, d, l, np.ones((1, len(n))), starts, num_starts, delta)
  return _law(thetas[0], values[0], len(n))


def bootstrap_chinchilla(n_params, n_tokens, losses, counts, *, starts,
                         delta: float = HUBER_DELTA) -> list[dict[str, float]]:
  """fit_chinchilla on R bootstrap resamples at once, each from every one of `starts` [S, 5]: counts [R, P]
  says how often each run is drawn."""
  n, d, l = _checked("n_params", n_params), _checked("n_tokens", n_tokens), _checked("losses", losses)
  counts = np.asarray(counts, dtype=np.float64)
  thetas, values = _fit_laws(n, d, l, counts, np.asarray(starts, dtype=np.float64).reshape(-1, 5), None, delta)
  return [_law(theta, value, len(n)) for theta, value in zip(thetas, values)]


def chinchilla_theta(fit: dict[str, float]) -> np.ndarray:
  """A fit's constants as fit_chinchilla's parameter vector (a, b, e, alpha, beta): a start for a refit."""
  return np.array([np.log(fit["A"]), np.log(fit["B"]), np.log(fit["E"]), fit["alpha"], fit["beta"]])


def law_loss(fit: dict[str, float], n_params, n_tokens) -> np.ndarray:
  """E + A / N^alpha + B / D^beta, elementwise over arrays of N and D."""
  n, d = np.asarray(n_params, dtype=np.float64), np.asarray(n_tokens, dtype=np.float64)
  return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def predict_loss(fit: dict[str, float], n_params: float, n_tokens: float) -> float:
  """The loss fit_chinchilla's law predicts for a run of n_params parameters trained on n_tokens tokens."""
  if not (np.isfinite(n_params) and n_params > 0 and np.isfinite(n_tokens) and n_tokens > 0):
    raise ValueError(f"n_params={n_params!r} and n_tokens={n_tokens!r} must be finite and positive")
  return float(law_loss(fit, n_params, n_tokens))


def compute_optimal(fit: dict[str, float], budget: float, flops_per_param_token: float = 6.0) -> dict[str, float]:
  """The N and D that minimise fit_chinchilla's law under the budget C = k N D (k = flops_per_param_token).

  Closed form (Hoffmann et al. 2022, eq. 4 and app. D.2): N_opt = G (C/k)^(beta / (alpha + beta)),
  D_opt = (C/k) / N_opt = G^-1 (C/k)^(alpha / (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta)).
  Returns "budget", "n_params", "tokens" and "loss" (the law's loss there).
  """
  if not (np.isfinite(budget) and budget > 0):
    raise ValueError(f"budget={budget!r} must be a finite, positive number of FLOPs")
  if not (np.isfinite(flops_per_param_token) and flops_per_param_token > 0):
    raise ValueError(f"flops_per_param_token={flops_per_param_token!r} must be finite and positive")
  alpha, beta = fit["alpha"], fit["beta"]
  if not (alpha > 0 and beta > 0):
    raise ValueError(f"a law with alpha={alpha!r}, beta={beta!r} has no compute-optimal size: both must be > 0")
  g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
  per_param_token = budget / flops_per_param_token  # N * D
  n_opt = g * per_param_token ** (beta / (alpha + beta))
  tokens = per_param_token / n_opt
  return {"budget": float(budget), "n_params": float(n_opt), "tokens": float(tokens),
          "loss": float(law_loss(fit, n_opt, tokens))}


def degenerate_reason(fit: dict[str, float]) -> str | None:
  """Why an Approach-3 fit cannot be trusted to extrapolate, or None: a constant that is not finite, or an
  exponent at ~0 (that term is a constant, folded into E: the data do not pin it) or past the grid's 2.5."""
  bad = [k for k in ("E", "A", "B", "alpha", "beta") if not np.isfinite(fit[k])]
  if bad:
    return f"{', '.join(bad)} not finite"
  for name in ("alpha", "beta"):
    if not 0.01 < fit[name] < 2.5:
      return f"{name}={fit[name]:.3g} is outside (0.01, 2.5)"
  return None


# ---------------------------------------------------------------------------------------------------------------
# Approach 2: a parabola per IsoFLOP profile.


def fit_approach2(budgets, n_params, losses, flops_per_token) -> dict:
  """Approach 2 of Hoffmann et al. 2022 (sec. 3.2): per IsoFLOP profile (the runs of one budget C), a parabola of
  L against log N; its minimum is N_opt(C). Then N_opt = k_N C^a and D_opt = k_D C^b (fit_power_law).

  D_opt = C / (k N_opt) with k the median of flops_per_token / N over the profile's runs (k = 6 when C = 6ND):
  the tokens that put the profile's compute into a model of N_opt parameters.
  Returns "profiles" (per budget: "budget", "n_opt", "tokens_opt", "loss_opt", "parabola" [c2, c1, c0] with
  L = c2 x^2 + c1 x + c0, x = ln N, "num_points"), "skipped" (budgets whose profile has no minimum within
  its sizes, with the reason: a vertex past the sizes is not a measurement), "n_opt" and "tokens_opt" (fit_power_law against C),
  their exponents "a" and "b" and coefficients "k_n" and "k_d". Raises ValueError when fewer than two profiles
  have a minimum within their sizes.
  """
  c, n = _checked("budgets", budgets), _checked("n_params", n_params)
  l, k = _checked("losses", losses), _checked("flops_per_token", flops_per_token)
  _same_length(budgets=c, n_params=n, losses=l, flops_per_token=k)
  profiles, skipped = [], []
  for budget in np.unique(c):
    here = c == budget
    x = np.log(n[here])
    if len(np.unique(x)) < 3:
      skipped.append({"budget": float(budget), "reason": f"{len(np.unique(x))} model size(s); a parabola needs 3"})
      continue
    c2, c1, c0 = np.polyfit(x, l[here], 2)
    if c2 <= 0:
      skipped.append({"budget": float(budget), "reason": "the profile curves down: no minimum"})
      continue
    x_opt = -c1 / (2 * c2)
    n_opt = float(np.exp(x_opt))
    if not x.min() <= x_opt <= x.max():  # a vertex past the sizes is the parabola's guess, not a measurement
      skipped.append({"budget": float(budget), "reason": f"its minimum (N = {n_opt:.3g}) lies outside its sizes "
                      f"[{np.exp(x.min()):.3g}, {np.exp(x.max()):.3g}]: the profile does not bracket it"})
      continue
    per_param_token = float(np.median(k[here] / n[here]))
    profiles.append({"budget": float(budget), "n_opt": n_opt, "tokens_opt": float(budget / (per_param_token * n_opt)),
                     "loss_opt": float(c0 - c1**2 / (4 * c2)), "parabola": [float(c2), float(c1), float(c0)],
                     "inside": True, "num_points": int(here.sum())})
  if len(profiles) < 2:
    why = "; ".join(f"C = {s['budget']:.3g}: {s['reason']}" for s in skipped)
    raise ValueError(f"Approach 2 needs at least 2 IsoFLOP profiles with a minimum within their sizes, got "
                     f"{len(profiles)} (skipped {why})")
  at = np.array([p["budget"] for p in profiles])
  n_law = fit_power_law(at, [p["n_opt"] for p in profiles])
  tokens_law = fit_power_law(at, [p["tokens_opt"] for p in profiles])
  return {"profiles": profiles, "skipped": skipped, "n_opt": n_law, "tokens_opt": tokens_law,
          "a": n_law["exponent"], "b": tokens_law["exponent"], "k_n": n_law["coefficient"],
          "k_d": tokens_law["coefficient"]}


# ---------------------------------------------------------------------------------------------------------------
# Approach 1: the envelope of the training curves.


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
  """A centred moving average over `window` points, the window cut short at the ends (no padding)."""
  kernel = np.ones(min(window, len(values)))
  return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def fit_approach1(curves, n_params, flops_per_token, *, num_flops: int = 40, smooth: int = 5) -> dict:
  """Approach 1 of Hoffmann et al. 2022 (sec. 3.1): the lower envelope of the training curves.

  curves: per run, [2, T] of (FLOPs seen, training loss), smoothed by a centred moving average of `smooth`
  points. At `num_flops` FLOP values C spaced logarithmically from the smallest to the largest FLOPs any run
  ends at, each curve covering C is interpolated (in log C) and the run with the lowest loss gives N_opt(C) and
  D_opt(C) = C / its flops_per_token. Mid-way through its schedule a run's loss is higher than that of a run
  annealed to end there, so the lower envelope is mostly made of runs near their ends: as in the paper, which
  trains each size with several schedule lengths, the sweep's budgets give each size several.
  Returns "envelope" ([C, N, D, loss] per FLOP value), "n_opt" and "tokens_opt" (fit_power_law against C),
  "a", "b" (their exponents), "k_n", "k_d" (their coefficients), "num_curves". Raises ValueError with fewer
  than two curves or FLOP values, or when a single size makes the whole envelope.
  """
  n, k = _checked("n_params", n_params), _checked("flops_per_token", flops_per_token)
  if len(curves) != len(n):
    raise ValueError(f"{len(curves)} curves for {len(n)} runs")
  if num_flops < 2:
    raise ValueError(f"num_flops={num_flops} must be >= 2")
  runs = []
  for i, curve in enumerate(curves):
    curve = np.asarray(curve, dtype=np.float64)
    if curve.ndim != 2 or curve.shape[0] != 2 or curve.shape[1] < 2:
      continue  # not logged, or a single point: no curve
    order = np.argsort(curve[0])
    flops, loss = curve[0, order], curve[1, order]
    finite = np.isfinite(flops) & np.isfinite(loss) & (flops > 0)
    if finite.sum() >= 2:
      runs.append((i, np.log(flops[finite]), _smoothed(loss[finite], smooth)))
  if len(runs) < 2:
    raise ValueError(f"Approach 1 needs at least 2 training curves, got {len(runs)}")
  lo, hi = min(r[1][-1] for r in runs), max(r[1][-1] for r in runs)
  if not hi > lo:
    raise ValueError("Approach 1 needs runs that end at different FLOPs; all end at the same")
  log_c = np.linspace(lo, hi, num_flops)
  losses = np.stack([np.where((log_f[0] <= log_c) & (log_c <= log_f[-1]), np.interp(log_c, log_f, loss), np.inf)
                     for _, log_f, loss in runs])  # [runs, num_flops]: inf where a run does not reach C
  best = np.argmin(losses, axis=0)
  envelope = [[float(np.exp(c)), float(n[runs[b][0]]), float(np.exp(c) / k[runs[b][0]]), float(losses[b, j])]
              for j, (c, b) in enumerate(zip(log_c, best)) if np.isfinite(losses[b, j])]
  points = np.array(envelope)
  sizes = np.unique(points[:, 1])
  if len(sizes) < 2:  # N_opt(C) would be a constant: an exponent of 0 that says nothing
    raise ValueError(f"the envelope is one size's curve (N = {sizes[0]:.4g}) at every C: the grid does not bracket "
                     "the optimum (add sizes on the other side)")
  n_law, tokens_law = fit_power_law(points[:, 0], points[:, 1]), fit_power_law(points[:, 0], points[:, 2])
  return {"envelope": envelope, "n_opt": n_law, "tokens_opt": tokens_law, "a": n_law["exponent"],
          "b": tokens_law["exponent"], "k_n": n_law["coefficient"], "k_d": tokens_law["coefficient"],
          "num_curves": len(runs)}


# ---------------------------------------------------------------------------------------------------------------
# Kaplan et al. 2020: L(N) and L(D).


def pareto_front(x, losses) -> np.ndarray:
  """Indices of the runs no run with as small or smaller x beats (lower loss), in increasing x."""
  x, l = np.asarray(x, dtype=np.float64), np.asarray(losses, dtype=np.float64)
  order = np.lexsort((l, x))
  front, best = [], np.inf
  for i in order:
    if l[i] < best:
      front.append(int(i))
      best = l[i]
  return np.array(front, dtype=int)


def fit_kaplan(n_params, tokens, losses) -> dict:
  """Kaplan et al. 2020 (eq. 1.1, 1.2): L(N) = (N_c / N)^alpha_N and L(D) = (D_c / D)^alpha_D.

  Kaplan fits L(N) on models trained to convergence and L(D) on models large enough not to limit it. A finite
  sweep has neither, so each law is fitted on its Pareto front (`pareto_front`): the runs that no run with as
  few (or fewer) parameters, or tokens, beats. The exponents are rough: those runs are still limited by the
  other quantity, and Kaplan's form has no irreducible loss E to absorb.
  Returns "alpha_N", "N_c", "alpha_D", "D_c", and "params" and "tokens" (fit_power_law, with "front": the
  [x, L] fitted). Raises ValueError when a front has fewer than two runs.
  """
  n, d, l = _checked("n_params", n_params), _checked("tokens", tokens), _checked("losses", losses)
  _same_length(n_params=n, tokens=d, losses=l)
  laws = {}
  for name, x in (("params", n), ("tokens", d)):
    front = pareto_front(x, l)
    if len(front) < 2:
      raise ValueError(f"Kaplan's L({name}) needs at least 2 runs on its Pareto front, got {len(front)}")
    laws[name] = {**fit_power_law(x[front], l[front]), "front": [[float(x[i]), float(l[i])] for i in front]}
  return {"alpha_N": laws["params"]["alpha"], "N_c": laws["params"]["scale"], "alpha_D": laws["tokens"]["alpha"],
          "D_c": laws["tokens"]["scale"], **laws}


# ---------------------------------------------------------------------------------------------------------------
# A sweep's runs, all the fits at once, and their bootstrap.


@dataclasses.dataclass(frozen=True)
class Runs:
  """A sweep's finished runs as the fits read them, one entry per run (train/scaling.py reads them)."""

  names: tuple[str, ...]
  n_params: np.ndarray  # [R] N, counted as the sweep chose (non-embedding or total)
  tokens: np.ndarray  # [R] D, tokens trained on
  flops_per_token: np.ndarray  # [R] C / D, as the sweep counts C (6 N, or the model's own count)
  budgets: np.ndarray  # [R] the IsoFLOP budget each run was sized for: its profile in Approach 2
  losses: np.ndarray  # [R] the loss each run ends at
  curves: tuple[np.ndarray | None, ...]  # per run [2, T]: FLOPs seen and training loss; None when not logged

  def __post_init__(self):
    lengths = {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"Runs fields must have one length each, got {lengths}")

  def __len__(self) -> int:
    return len(self.names)

  @property
  def flops(self) -> np.ndarray:
    """C of each run: flops_per_token x tokens."""
    return self.flops_per_token * self.tokens

  def subset(self, index) -> "Runs":
    """The runs at `index` (an index array, repeats allowed: a bootstrap resample)."""
    index = np.asarray(index, dtype=int)
    return Runs(names=tuple(self.names[i] for i in index), n_params=self.n_params[index],
                tokens=self.tokens[index], flops_per_token=self.flops_per_token[index],
                budgets=self.budgets[index], losses=self.losses[index],
                curves=tuple(self.curves[i] for i in index))


def or_error(fit, *args, **kwargs) -> dict:
  """fit(*args, **kwargs), or {"error": why} when the data cannot support it (a ValueError)."""
  try:
    return fit(*args, **kwargs)
  except ValueError as e:
    return {"error": str(e)}


def _quick_fits(runs: Runs) -> dict[str, dict]:
  """The fits that cost milliseconds: Kaplan's, Approaches 1 and 2."""
  return {
      "kaplan": or_error(fit_kaplan, runs.n_params, runs.tokens, runs.losses),
      "approach1": or_error(fit_approach1, runs.curves, runs.n_params, runs.flops_per_token),
      "approach2": or_error(fit_approach2, runs.budgets, runs.n_params, runs.losses, runs.flops_per_token),
  }


def fit_all(runs: Runs, *, num_starts: int | None = NUM_STARTS) -> dict[str, dict]:
  """Kaplan's laws and Chinchilla's three approaches on `runs`: {"kaplan", "approach1", "approach2",
  "approach3"}, each the dict of its fit, or {"error": why} when these runs cannot support it."""
  return {**_quick_fits(runs),
          "approach3": or_error(fit_chinchilla, runs.n_params, runs.tokens, runs.losses, num_starts=num_starts)}


# The bootstrap's 90% interval, and what it keeps of each approach per resample.
INTERVAL_PERCENTILES = (5.0, 95.0)
_SAMPLED = {
    "kaplan": ("alpha_N", "alpha_D"),
    "approach1": ("a", "b", "k_n", "k_d"),
    "approach2": ("a", "b", "k_n", "k_d"),
    "approach3": ("E", "A", "B", "alpha", "beta"),
}


def bootstrap(runs: Runs, fits: dict[str, dict], *, resamples: int = 200, seed: int = 0,
              num_starts: int = 4) -> dict:
  """Bootstrap intervals (5th to 95th percentile: 90%) of each approach's constants: the runs are resampled
  with replacement `resamples` times and every fit repeated.

  Approach 3 refits all resamples in one batched L-BFGS run, each from `fits["approach3"]`'s optimum and the
  `num_starts - 1` points of the paper's grid where the full data's objective is lowest: a resample's optimum
  lies near the full data's, so the 4,500-point grid is not searched again.
  Returns "resamples", "seed", "percentiles", "samples" ({approach: {constant: [value per resample, nan where
  that resample could not be fitted]}}) and "intervals" ({approach: {constant: [low, high]}}).
  """
  if resamples < 1:
    raise ValueError(f"resamples={resamples} must be >= 1")
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, len(runs), size=(resamples, len(runs)))
  samples = {name: {key: np.full(resamples, np.nan) for key in keys} for name, keys in _SAMPLED.items()}
  for r, draw in enumerate(draws):
    for name, result in _quick_fits(runs.subset(draw)).items():
      for key in _SAMPLED[name]:
        samples[name][key][r] = result.get(key, np.nan)
  if "error" not in fits["approach3"]:
    log_n, log_d, log_l = np.log(runs.n_params), np.log(runs.tokens), np.log(runs.losses)
    screened = _huber_objective(PAPER_GRID, log_n, log_d, log_l, np.ones((1, len(runs))), HUBER_DELTA)[0]
    starts = np.vstack([chinchilla_theta(fits["approach3"]), PAPER_GRID[np.argsort(screened)[:num_starts - 1]]])
    counts = np.stack([np.bincount(draw, minlength=len(runs)) for draw in draws])
    laws = bootstrap_chinchilla(runs.n_params, runs.tokens, runs.losses, counts, starts=starts)
    for r, law in enumerate(laws):
      for key in _SAMPLED["approach3"]:
        samples["approach3"][key][r] = law[key]
  intervals = {
      name: {key: [float(v) for v in np.nanpercentile(values, INTERVAL_PERCENTILES)] if np.isfinite(values).any()
             else [float("nan")] * 2 for key, values in by_key.items()}
      for name, by_key in samples.items()}
  return {"resamples": resamples, "seed": seed, "percentiles": list(INTERVAL_PERCENTILES),
          "samples": {name: {key: values.tolist() for key, values in by_key.items()}
                      for name, by_key in samples.items()},
          "intervals": intervals}
