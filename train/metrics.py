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
