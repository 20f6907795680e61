"""python -m train.sweep --config=configs/scaling/FILE.py --workdir=runs/scaling [--config.parallel=N]

Runs a scaling sweep: the grid of train/sweep_plan.py (model sizes x compute budgets, IsoFLOP
profiles), each point an ordinary run directory WORKDIR/points/NAME trained by `python -m train`'s
trainer in its own process, then (config.extrapolate > 0) one run at that many times the largest
budget, at the size the grid's fit calls compute-optimal, its loss predicted before it runs
(`python -m train.scaling --workdir=WORKDIR` reports the error).

Stopping and starting again is safe: a point whose summary.json says completed is never rerun, a
point stopped half-way (SIGTERM or Ctrl-C reach its process, which saves a checkpoint) resumes from
its checkpoint, and WORKDIR/sweep.json keeps the plan (a different config on the same WORKDIR is
an error). All points share one tokenizer, WORKDIR/tokenizer.model, trained once.

`--config.parallel=N` runs N points at once, each pinned to its share of the CPU cores (on an
accelerator, give each its own device with CUDA_VISIBLE_DEVICES instead and keep parallel=1).
`python -m train.sweep --point=DIR` trains one prepared point (what the sweep runs).
"""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train.host_devices import one_device_per_cpu_core

CORES_ENV = "INGREDIENTS_SWEEP_CORES"  # the cores a point's process keeps to ('0,1'), set by the sweep
if os.environ.get(CORES_ENV):  # before jax starts its threads
  os.sched_setaffinity(0, [int(core) for core in os.environ[CORES_ENV].split(",")])
one_device_per_cpu_core()

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import cli, validation  # noqa: E402
from rundir.loading import SUMMARY_FILE  # noqa: E402
from train import sweep_plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/scaling/...py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: sweep.json, points/, tokenizer.model.")
_POINT = flags.DEFINE_string("point", None, "Train one prepared point directory (the sweep's subprocesses).")

PLAN_FILE, POINTS_DIR = sweep_plan.PLAN_FILE, sweep_plan.POINTS_DIR
POINT_CONFIG = "point_config.json"  # the point's training config, as the sweep planned it
LOG_FILE = "log.txt"


def _write_json(path: Path, value) -> None:
  from rundir import loading  # noqa: PLC0415  (jax comes with it: not at import, for --point's device flags)
  loading.write_json_atomic(path, value)


def completed(point_dir: Path) -> bool:
  """The point's run reached its last step (its summary.json says so)."""
  try:
    return bool(json.loads((point_dir / SUMMARY_FILE).read_text())["completed"])
  except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
    return False


def _shared_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """config.base.tokenizer.path, or one tokenizer trained into WORKDIR for every point."""
  if config.base.tokenizer.path:
    return
  from rundir import tokenizer as tokenizer_lib  # noqa: PLC0415
  from train import data as data_lib  # noqa: PLC0415
  tokenizer_lib.get_tokenizer(config.base.tokenizer, workdir,
                              lambda: data_lib.training_texts(config.base.data, seed=config.base.seed))
  config.base.tokenizer.path = str((workdir / tokenizer_lib.MODEL_FILENAME).resolve())


def _read_plan(workdir: Path) -> dict | None:
  path = workdir / PLAN_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise validation.ConfigError(f"{path} is not valid JSON ({e}); it is the sweep's plan: fix or remove it") from None


def _check_same_plan(workdir: Path, old: dict, grid: list[sweep_plan.Point], config) -> None:
  """A workdir holds one sweep: its grid and counting cannot change under it."""
  new = [dataclasses.asdict(p) for p in grid]
  old_grid = [p for p in old.get("points", []) if p.get("kind") == "grid"]
  for key in ("counting", "flop_count"):
    if old.get(key) != config[key]:
      raise validation.ConfigError(
          f"{workdir / PLAN_FILE} was planned with {key}={old.get(key)!r}, the config says {config[key]!r}; "
          "use a new --workdir for a different sweep")
  if old_grid != new:
    names = {p["name"] for p in old_grid} ^ {p["name"] for p in new}
    detail = f"points {sorted(names)} differ" if names else "a point's size, steps or counts differ"
    raise validation.ConfigError(
        f"{workdir / PLAN_FILE} was planned from another config ({detail}); use a new --workdir for a different sweep")


def _prepare(workdir: Path, point: sweep_plan.Point, run_config: ml_collections.ConfigDict) -> Path:
  """The point's directory with its training config; an existing one must hold the same config."""
  point_dir = workdir / POINTS_DIR / point.name
  point_dir.mkdir(parents=True, exist_ok=True)
  path = point_dir / POINT_CONFIG
  wanted = json.loads(json.dumps(run_config.to_dict(), default=str))
  if path.exists() and json.loads(path.read_text()) != wanted:
    raise validation.ConfigError(f"{path} holds another config than this sweep plans for point {point.name}; "
                                 "use a new --workdir for a different sweep")
  _write_json(path, wanted)
  return point_dir


class _Runner:
  """Runs points as subprocesses, at most `parallel` at once, each pinned to its share of the cores;
  SIGTERM / SIGINT stop starting new ones and pass SIGTERM on (each saves a checkpoint)."""

  def __init__(self, parallel: int):
    cores = sorted(os.sched_getaffinity(0))
    share = max(len(cores) // parallel, 1)
    self.slots = [cores[i * share:(i + 1) * share] or cores for i in range(parallel)]
    self.stopping = False
    self._running: dict[int, subprocess.Popen] = {}

  def _stop(self, signum, frame):
    del frame
    logging.warning("signal %d: stopping the running points (each saves a checkpoint); rerun to continue", signum)
    self.stopping = True
    for process in self._running.values():
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)

  def run(self, point_dirs: list[Path]) -> list[Path]:
    """Trains each directory's point; returns those that did not complete."""
    queue, failed, self._running, self._dirs = list(point_dirs), [], {}, {}
    free = list(range(len(self.slots)))
    previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      while (queue and not self.stopping) or self._running:
        while queue and free and not self.stopping:
          slot, point_dir = free.pop(0), queue.pop(0)
          self._running[slot] = self._start(point_dir, self.slots[slot], pinned=len(self.slots) > 1)
          self._dirs[slot] = point_dir
        time.sleep(0.2)
        for slot, process in list(self._running.items()):
          if process.poll() is not None:
            del self._running[slot]
            free.append(slot)
            point_dir = self._dirs[slot]
            if process.returncode != 0 or not completed(point_dir):
              failed.append(point_dir)
              if not self.stopping:
                print(f"point {point_dir.name} failed (exit status {process.returncode}); its log: "
                      f"{point_dir / LOG_FILE}", flush=True)
            else:
              print(f"point {point_dir.name} done", flush=True)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    return failed + queue

  @staticmethod
  def _start(point_dir: Path, cores: list[int], pinned: bool) -> subprocess.Popen:
    env = dict(os.environ)
    if pinned:  # the child pins itself (a fork of this process, which runs jax's threads, must not)
      devices = 1 << (len(cores).bit_length() - 1)  # a power of two: it divides the batch
      flags_now = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
      env["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={devices}".strip()
      env[CORES_ENV] = ",".join(map(str, cores))
    print(f"point {point_dir.name}: training" + (f" on cores {cores}" if pinned else ""), flush=True)
    log = open(point_dir / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115  (the child holds it)
    return subprocess.Popen(
        [sys.executable, "-m", "train.sweep", f"--point={point_dir}"], stdout=log, stderr=subprocess.STDOUT,
        env=env, start_new_session=True,
    )


def _extrapolation_point(config, workdir: Path, grid: list[sweep_plan.Point]) -> tuple[sweep_plan.Point, dict]:
  """The run at config.extrapolate x the largest budget, its size the candidate nearest to the grid
  fit's compute-optimal N, and the loss the fit predicts for it (fixed before it trains)."""
  import math  # noqa: PLC0415

  from train import scaling  # noqa: PLC0415
  budget = config.extrapolate * max(p.budget for p in grid)
  optimum = scaling.plan_extrapolation(workdir, factor=config.extrapolate)
  candidates = [sweep_plan.make_point(config, size, budget, kind="extrapolation")
                for size in sweep_plan.parse_list(config.extrapolation_sizes, "extrapolation_sizes", str)]
  key = scaling.N_KEYS[config.counting]  # the Point field N is counted by
  point = min(candidates, key=lambda p: abs(math.log(getattr(p, key) / optimum["n_params"])))
  predicted = scaling.predict_loss(optimum["fit"], getattr(point, key), point.tokens)
  return point, {"optimal_n_params": optimum["n_params"], "optimal_tokens": optimum["tokens"],
                 "predicted_loss": predicted, "predicted_from": optimum.get("method", "approach3")}


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Plans (or reloads) the sweep in `workdir`, trains every unfinished point, then the extrapolation
  run; returns {'completed': [...], 'unfinished': [...]} point names."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())  # the tokenizer path is filled in below
  grid = sweep_plan.plan(config)
  old = _read_plan(workdir)
  if old is not None:
    _check_same_plan(workdir, old, grid, config)
  _shared_tokenizer(config, workdir)
  extra = [p for p in (old or {}).get("points", []) if p.get("kind") == "extrapolation"]
  plan = {"counting": config.counting, "flop_count": config.flop_count,
          "budgets": sweep_plan.parse_list(config.budgets, "budgets"),
          "points": [dataclasses.asdict(p) for p in grid] + extra}
  _write_json(workdir / PLAN_FILE, plan)
  runner = _Runner(config.parallel)
  dirs = [_prepare(workdir, p, sweep_plan.point_config(config, p)) for p in grid]
  todo = [d for d in dirs if not completed(d)]
  print(f"sweep {workdir}: {len(grid)} grid points, {len(grid) - len(todo)} already done", flush=True)
  unfinished = runner.run(todo)
  if config.extrapolate and not unfinished and not runner.stopping:
    if not extra:
      point, prediction = _extrapolation_point(config, workdir, grid)
      extra = [{**dataclasses.asdict(point), **prediction}]
      plan["points"] += extra
      _write_json(workdir / PLAN_FILE, plan)
      print(f"extrapolation: {point.name}, predicted loss {prediction['predicted_loss']:.4f}", flush=True)
    point = sweep_plan.Point(**{k: extra[0][k] for k in sweep_plan.Point.__dataclass_fields__})
    point_dir = _prepare(workdir, point, sweep_plan.point_config(config, point))
    if not completed(point_dir):
      unfinished += runner.run([point_dir])
  names = [p["name"] for p in plan["points"]]
  unfinished_names = [d.name for d in unfinished]
  return {"completed": [n for n in names if n not in unfinished_names and completed(workdir / POINTS_DIR / n)],
          "unfinished": unfinished_names}


def train_point(point_dir: str | os.PathLike) -> dict:
  """Trains (or resumes) one prepared point in its directory."""
  from train import trainer  # noqa: PLC0415
  point_dir = Path(point_dir)
  path = point_dir / POINT_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"--point={str(point_dir)!r} has no {POINT_CONFIG}: it is not a prepared sweep point")
  return trainer.train(ml_collections.ConfigDict(json.loads(path.read_text())), point_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  if _POINT.value:
    result = train_point(_POINT.value)
    sys.exit(0 if not result.get("stopped_early") else 1)
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("give --config=configs/scaling/FILE.py and --workdir=DIR (or --point=DIR)")
  result = run_sweep(_CONFIG.value, _WORKDIR.value)
  if result["unfinished"]:
    print(f"unfinished points: {result['unfinished']}; rerun the same command to continue", flush=True)
    sys.exit(1)
  print(f"sweep done: {len(result['completed'])} points in {_WORKDIR.value}/{POINTS_DIR}; fit with "
        f"python -m train.scaling --workdir={_WORKDIR.value}", flush=True)


if __name__ == "__main__":
  cli.run(main)
