"""Metrics a researcher can plot: `workdir/metrics.jsonl` (one JSON object per line) and TensorBoard.

Only process 0 writes. A progress bar (tqdm) on an interactive terminal, plain log lines otherwise.
"""

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import tqdm

# Dense bf16 peak FLOP/s per device, for MFU; devices not listed get no mfu.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


# Stated board power (TDP) per device in watts, for the energy estimate: NVIDIA's data sheets (SXM
# parts), Google's TPU v4 paper (Jouppi et al. 2023, 192 W peak). A kind not listed needs
# config.device_power_watts; a CPU device (one core, train/host_devices.py) is counted at
# CPU_WATTS_PER_CORE, a server CPU's stated TDP over its cores (e.g. 280 W / 32 cores), a rough figure.
POWER_WATTS = {
    "H100": 700.0,
    "H200": 700.0,
    "A100": 400.0,
    "L4": 72.0,
    "TPU v4": 192.0,
}
CPU_WATTS_PER_CORE = 9.0
ENERGY_NOTE = ("an estimate: device_power_watts x devices x wall time, at the stated power (TDP) of the device, "
               "not a measurement")


def device_power_watts(configured: float = 0.0, device: jax.Device | None = None) -> float | None:
  """config.device_power_watts when > 0, else the stated power of this device kind; None when unknown."""
  if configured > 0:
    return float(configured)
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return CPU_WATTS_PER_CORE
  for name, watts in POWER_WATTS.items():
    if name.lower() in device.device_kind.lower():
      return watts
  return None


def energy_kwh(watts_per_device: float | None, devices: int, seconds: float) -> float | None:
  return None if watts_per_device is None else watts_per_device * devices * seconds / 3.6e6


def last_value(workdir: str | os.PathLike, key: str, *, up_to_step: int) -> float:
  """The last value of `key` in workdir/metrics.jsonl at or before `up_to_step` (0 when none): a
  resumed run carries its cumulative counters (wall time) on from where its checkpoint was."""
  path = Path(workdir) / "metrics.jsonl"
  value = 0.0
  if not path.is_file():
    return value
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a crash
      continue
    if record.get("step", 0) <= up_to_step and isinstance(record.get(key), (int, float)):
      value = float(record[key])
  return value


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


class MetricsWriter:
  def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int = 0):
    self.enabled = jax.process_index() == 0
    self._bar = None
    if not self.enabled:
      return
    workdir = Path(workdir)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    # Imported here: tensorboardX imports torch when torch is installed (4 s of every start-up).
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))
    if sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for key, value in metrics.items():
      value = float(value)
      record[f"{prefix}{key}"] = value if math.isfinite(value) else str(value)
      if math.isfinite(value):
        self._tensorboard.add_scalar(f"{prefix}{key}", value, int(step))
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._tensorboard.flush()
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._jsonl.close()
    self._tensorboard.close()
