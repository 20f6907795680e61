"""python -m train.plot WORKDIR [WORKDIR ...] --out=FILE.png [--x=step|tokens|wall|flops] [--metrics=a,b]
    [--labels=a,b] [--smooth=0.9] [--log_y] [--start=RUN]

One figure, one panel per metric (default: loss, eval_loss, learning_rate, grad_norm, tokens_per_second),
the runs overlaid, against step, tokens, wall time or training FLOPs. From a notebook:

    from train import plot
    plot.plot_runs(["runs/a", "runs/b"], "ab.png", x="tokens")
    run = plot.load_run("runs/a")  # its train and eval records, for other code

Runs written before the trainer recorded `tokens_seen` and `wall_seconds` are placed on those axes by
estimate (step * batch_size * seq_len from config.json; the steps between records over their
steps_per_second, summed), and the figure says so. A bad run directory, metrics line or flag is one line
on stderr with exit status 2. Importing this module imports neither jax nor matplotlib; plot_runs imports
matplotlib (headless).
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

# The names of a run directory's files (train.metrics and rundir.loading write them; named here too so
# that plotting imports no jax).
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
EVAL_PREFIX = "eval_"  # the trainer's prefix for held-out metrics
DEFAULT_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")
X_AXES = ("step", "tokens", "wall", "flops")
X_LABELS = {"step": "step", "tokens": "tokens", "wall": "wall time (s)", "flops": "training FLOPs"}
X_RECORDED = {"tokens": "tokens_seen", "wall": "wall_seconds", "flops": "flops_seen"}  # cumulative fields
X_ESTIMATES = {  # how an old run is placed on the axis, as the figure says
    "tokens": "step * batch_size * seq_len",
    "wall": "the sum of (steps since the last record) / steps_per_second",
}
UNSMOOTHED = ("learning_rate",)  # a schedule, not a noisy measurement: an EMA would only delay it
PANEL_INCHES = (5.0, 3.5)  # (width, height) of one panel
COLORS = 10  # matplotlib's default colour cycle, C0-C9
LINE_STYLES = ("-", "--", ":", "-.")  # one per pass through the colours, so that eleven runs or more stay apart
MAX_COLUMNS = 3
FORMATS = ("png", "pdf", "svg")


class PlotError(ValueError):
  """A run directory, a metrics line or an argument that cannot be plotted; the message names it."""


@dataclasses.dataclass(frozen=True)
class RunMetrics:
  """A run directory's metrics.jsonl, read: records in step order, non-finite values as float nan/inf.

  A resumed run appends the steps after its last checkpoint again: the last record of a step is kept.
  """

  workdir: Path
  train: list[dict[str, float]]  # each has "step"; loss, grad_norm, learning_rate, ... (or an align method's)
  eval: list[dict[str, float]]  # each has "step" and eval_* metrics
  config: dict  # config.json; {} when the run has none

  def metric_names(self) -> set[str]:
    return {key for record in self.train + self.eval for key in record if key != "step"}


@dataclasses.dataclass(frozen=True)
class XAxis:
  """Where a run's records lie on the x axis."""

  train: np.ndarray  # (len(run.train),)
  eval: np.ndarray  # (len(run.eval),)
  estimated: bool  # from X_ESTIMATES, because the run's records do not carry the quantity


@dataclasses.dataclass(frozen=True)
class Curve:
  """One run's values of one metric, in step order, its non-finite values left out."""

  x: np.ndarray  # (n,)
  y: np.ndarray  # (n,) smoothed when asked
  raw: np.ndarray  # (n,) as recorded


def load_run(workdir: str | os.PathLike) -> RunMetrics:
  """Reads WORKDIR/metrics.jsonl (and config.json if there is one); PlotError names a missing file or a bad line."""
  workdir = Path(workdir)
  path = workdir / METRICS_FILE
  if not path.is_file():
    raise PlotError(f"{path} does not exist: {workdir} is not a run directory of python -m train or align")
  by_step: dict[tuple[bool, int], dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if line.strip():
        record = _parse_record(line, f"{path}:{line_number}")
        by_step[_is_eval(record), int(record["step"])] = record  # a later record of the same step wins
  ordered = [by_step[key] for key in sorted(by_step, key=lambda key: key[1])]
  config_path = workdir / CONFIG_FILE
  config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
  train = [r for r in ordered if not _is_eval(r)]
  return RunMetrics(workdir, train=train, eval=[r for r in ordered if _is_eval(r)], config=config)


def _is_eval(record: dict[str, float]) -> bool:
  """The trainer writes the held-out metrics as records of their own, each name prefixed."""
  return any(key.startswith(EVAL_PREFIX) for key in record)


def _parse_record(line: str, where: str) -> dict[str, float]:  # "step" stays an int
  """One metrics line: {"step": int, name: number or "nan"/"inf"/"-inf" (how MetricsWriter writes non-finite)}."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise PlotError(f"{where}: not JSON ({e.msg}): {line.strip()[:80]!r}") from None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    raise PlotError(f"{where}: not a metrics record (a JSON object with an integer 'step'): {line.strip()[:80]!r}")
  try:
    return {key: value if key == "step" else float(value) for key, value in record.items()}
  except (TypeError, ValueError):
    raise PlotError(f"{where}: a value that is not a number: {line.strip()[:80]!r}") from None


def x_axis(run: RunMetrics, x: str = "step") -> XAxis:
  """The run's records on the x axis `x` (one of X_AXES); PlotError when the run cannot be placed on it."""
  train_steps = np.array([r["step"] for r in run.train], dtype=np.float64)
  eval_steps = np.array([r["step"] for r in run.eval], dtype=np.float64)
  if x == "step":
    return XAxis(train_steps, eval_steps, estimated=False)
  if x not in X_RECORDED:
    raise PlotError(f"x={x!r} is not one of {', '.join(X_AXES)}")
  field = X_RECORDED[x]
  if run.train and all(math.isfinite(r.get(field, math.nan)) for r in run.train):
    train, estimated = np.array([r[field] for r in run.train]), False
  elif x == "tokens":
    per_step = _tokens_per_step(run)
    return XAxis(train_steps * per_step, eval_steps * per_step, estimated=True)
  elif x == "wall":
    train, estimated = _wall_from_throughput(run), True
  else:
    raise PlotError(
        f"{run.workdir / METRICS_FILE} does not record {field} (a run from before the trainer counted it); "
        "plot it against step, tokens or wall"
    )
  # Eval records carry no cumulative counts: each lies between the train records around its step.
  eval_x = np.interp(eval_steps, np.r_[0.0, train_steps], np.r_[0.0, train])
  return XAxis(train, eval_x, estimated)


def _tokens_per_step(run: RunMetrics) -> int:
  try:
    return int(run.config["batch_size"]) * int(run.config["seq_len"])
  except (KeyError, TypeError, ValueError):
    raise PlotError(
        f"{run.workdir / METRICS_FILE} does not record tokens_seen and {run.workdir / CONFIG_FILE} gives no "
        "batch_size and seq_len to count them by"
    ) from None


def _wall_from_throughput(run: RunMetrics) -> np.ndarray:
  """Seconds of training at each train record: the steps since the previous record over its steps_per_second."""
  steps = np.array([r["step"] for r in run.train], dtype=np.float64)
  rates = np.array([r.get("steps_per_second", math.nan) for r in run.train])
  if not np.all(np.isfinite(rates) & (rates > 0)):
    raise PlotError(f"{run.workdir / METRICS_FILE} records neither wall_seconds nor steps_per_second at every step")
  return np.cumsum(np.diff(steps, prepend=0.0) / rates)


def curves(run: RunMetrics, metrics: Sequence[str], *, x: str = "step", smooth: float = 0.0,
           start: dict[str, float] | None = None) -> dict[str, Curve]:
  """What plot_runs draws for one run: metric -> Curve, for the metrics of `metrics` the run has finite values of.

  `smooth` is the factor of an exponential moving average over the train metrics (0 = off):
  y_0 = raw_0, y_i = smooth * y_(i-1) + (1 - smooth) * raw_i. Eval metrics and UNSMOOTHED are drawn as recorded.
  `start`: eval values the run started from (another run's last: see start_point), drawn at x = 0 where the
  run has no record of its own at step 0.
  """
  if not 0.0 <= smooth < 1.0:
    raise PlotError(f"smooth={smooth} must be in [0, 1)")
  axis = x_axis(run, x)
  out = {}
  for metric in metrics:
    is_eval = metric.startswith(EVAL_PREFIX)
    records, xs = (run.eval, axis.eval) if is_eval else (run.train, axis.train)
    points = [(x_value, r[metric]) for x_value, r in zip(xs, records) if math.isfinite(r.get(metric, math.nan))]
    if is_eval and start and math.isfinite(start.get(metric, math.nan)) and not any(r["step"] == 0 for r in records):
      points.insert(0, (0.0, start[metric]))
    if not points:
      continue
    x_values, raw = (np.array(values, dtype=np.float64) for values in zip(*points))
    factor = 0.0 if is_eval or metric in UNSMOOTHED else smooth
    out[metric] = Curve(x_values, _ema(raw, factor), raw)
  return out


def start_point(run: RunMetrics) -> dict[str, float]:
  """The values of the run's last eval record of each metric: where runs that start from its end begin."""
  point = {}
  for record in run.eval:
    point.update({k: v for k, v in record.items() if k != "step" and math.isfinite(v)})
  return point


def _ema(values: np.ndarray, factor: float) -> np.ndarray:
  smoothed = values.copy()
  for i in range(1, len(values)):
    smoothed[i] = factor * smoothed[i - 1] + (1.0 - factor) * values[i]
  return smoothed


def chosen_metrics(runs: Sequence[RunMetrics], metrics: Sequence[str] | None = None) -> list[str]:
  """The panels: `metrics` (None or empty: DEFAULT_METRICS) less those no run has a finite value of.

  A name that no run records at all is a mistake (PlotError listing the names there are); a default
  name no run records (an align method logs no grad_norm, say) is left out quietly.
  """
  available = set().union(*(run.metric_names() for run in runs))
  unknown = [m for m in metrics or () if m not in available]
  if unknown:
    raise PlotError(f"no run records the metric {unknown[0]!r}; the runs record {', '.join(sorted(available))}")
  requested = list(metrics or DEFAULT_METRICS)
  chosen = [m for m in requested if any(_has_values(r, m) for r in runs)]
  if not chosen:
    raise PlotError(f"nothing to plot: the runs have no finite values of {', '.join(requested)}")
  return chosen


def _has_values(run: RunMetrics, metric: str) -> bool:
  return any(math.isfinite(r.get(metric, math.nan)) for r in run.train + run.eval)


def plot_runs(
    workdirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, x: str = "step",
    metrics: Sequence[str] | None = None, labels: Sequence[str] | None = None, smooth: float = 0.0,
    log_y: bool = False, dpi: int = 100, start: str | os.PathLike | None = None,
) -> Path:
  """Draws the runs' metrics (see the module docstring) to `out` (png, pdf or svg, by its suffix), atomically;
  returns its path. The figure is PANEL_INCHES per panel, at most MAX_COLUMNS panels wide, at `dpi`.
  `start`: the run every run started from (its init_from); its last held-out scores are drawn at x = 0."""
  out = Path(out)
  if out.suffix[1:].lower() not in FORMATS:
    raise PlotError(f"out={str(out)!r} must end in one of {', '.join('.' + f for f in FORMATS)}")
  if not workdirs:
    raise PlotError("no run directory to plot")
  runs = [load_run(w) for w in workdirs]
  labels = list(labels) if labels is not None else [run.workdir.resolve().name for run in runs]
  if len(labels) != len(runs):
    raise PlotError(f"{len(labels)} labels ({', '.join(labels)}) for {len(runs)} run directories")
  metrics = chosen_metrics(runs, metrics)
  origin = start_point(load_run(start)) if start is not None else None
  run_curves = [curves(run, metrics, x=x, smooth=smooth, start=origin) for run in runs]
  estimated = [label for run, label in zip(runs, labels) if x != "step" and x_axis(run, x).estimated]
  figure = _draw(run_curves, labels, metrics, x_label=X_LABELS[x], log_y=log_y, smoothed=smooth > 0)
  if estimated:
    figure.supxlabel(f"{X_LABELS[x]} estimated as {X_ESTIMATES[x]} for {', '.join(estimated)}", fontsize="small")
  return save_figure(figure, out, dpi)


def _draw(run_curves: list[dict[str, Curve]], labels: list[str], metrics: list[str], *, x_label: str,
          log_y: bool, smoothed: bool):
  """A matplotlib Figure: one panel per metric, one colour per run, the legend above the panels."""
  import matplotlib  # noqa: PLC0415 (here, so that importing this module stays cheap)

  matplotlib.use("Agg")  # headless: no display is needed, none is opened
  from matplotlib import figure as figure_lib  # noqa: PLC0415

  columns = min(len(metrics), MAX_COLUMNS)
  rows = math.ceil(len(metrics) / columns)
  figure = figure_lib.Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), layout="constrained")
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  handles = {}  # run index -> its line, for the legend
  for panel, metric in zip(axes, metrics):
    for i, (by_metric, label) in enumerate(zip(run_curves, labels)):
      if metric not in by_metric:
        continue
      curve, color = by_metric[metric], f"C{i % COLORS}"
      style = LINE_STYLES[i // COLORS % len(LINE_STYLES)]  # past ten runs the colours repeat
      marker = "o" if metric.startswith(EVAL_PREFIX) else None
      if smoothed and not np.array_equal(curve.y, curve.raw):
        panel.plot(curve.x, curve.raw, color=color, linestyle=style, alpha=0.25, linewidth=0.8)
      (line,) = panel.plot(curve.x, curve.y, color=color, linestyle=style, marker=marker, markersize=3)
      handles.setdefault(i, line)
    panel.set_title(metric)
    panel.set_xlabel(x_label)
    panel.grid(alpha=0.3)
    if log_y:
      panel.set_yscale("log")
  for panel in axes[len(metrics):]:
    panel.set_visible(False)
  runs = sorted(handles)
  figure.legend([handles[i] for i in runs], [labels[i] for i in runs], loc="outside upper center",
                ncols=min(len(runs), 6))
  return figure


def save_figure(figure, out: str | os.PathLike, dpi: int = 120) -> Path:
  """Saves a matplotlib figure to `out` (format from its suffix) through a temporary file beside it, renamed
  into place: a reader never sees half a figure. Creates the directory; returns the path."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      figure.savefig(f, format=out.suffix[1:].lower(), dpi=dpi)
    os.replace(temporary, out)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise
  return out


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing this module adds none."""
  flags.DEFINE_string("out", None, "The figure to write (FILE.png, .pdf or .svg); its directory is created.")
  flags.DEFINE_enum("x", "step", X_AXES, "The x axis: step, tokens, wall (seconds) or flops.")
  flags.DEFINE_list("metrics", None, f"The panels, in order (default: {','.join(DEFAULT_METRICS)}).")
  flags.DEFINE_list("labels", None, "One legend label per WORKDIR (default: the directory names).")
  flags.DEFINE_float("smooth", 0.0, "EMA factor for the train curves, in [0, 1); 0 draws them as recorded.")
  flags.DEFINE_bool("log_y", False, "Logarithmic y axes.")
  flags.DEFINE_string("start", None, "The run the runs started from: its last eval_ scores are drawn at x = 0.")
  flags.mark_flag_as_required("out")


def main(argv: list[str]) -> None:
  from configs import validation  # noqa: PLC0415 (imports jax: only the command line pays for it)

  flag = flags.FLAGS
  try:
    path = plot_runs(argv[1:], flag.out, x=flag.x, metrics=flag.metrics, labels=flag.labels, smooth=flag.smooth,
                     log_y=flag.log_y, start=flag.start)
  except PlotError as e:  # configs.cli reports a ConfigError in one line, exit status 2
    raise validation.ConfigError(str(e)) from e
  print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  from configs import cli  # noqa: PLC0415 (imports jax: only the command line pays for it)

  define_flags()
  cli.run(main)
