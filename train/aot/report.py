"""What a compiled TPU program needs and costs, per device: memory by category, flops, XLA's
estimated step time, and the collectives in it.

Memory comes from the compiler's `memory_analysis()`: arguments (split here into the parts we
know: parameters, optimizer state, frozen weights, the batch), outputs that do not alias an
argument (a donated state's update aliases it), temporaries (activations, gradients, workspace)
and the program's code. Flops and `optimal_seconds` come from `cost_analysis()`, XLA's cost model
of the TPU: an estimate, not a measurement. That model counts a loop's body once, not once per
iteration, and custom calls (Pallas kernels: flash attention) count nothing. Measured on Llama 3.1
8B's widths with 2 layers: scanned, with full remat and flash attention, XLA counted 22% of the
model's flops; unrolled, without remat, with XLA's attention, 100.2%. So the estimated step time
is XLA's `optimal_seconds` scaled by the model's own flops (model.flops_per_token) over the flops
XLA counted, when that is above 1: the uncounted iterations taken to run at the counted ones'
rate. A job of several programs (GRPO's train step, prefill and decode steps) is scaled program by
program, each by its own shortfall. The MFU is the model's flops over that time and the slice's
peak. `optimal_seconds` prices each op at the chip's roofline (its peak flops or HBM bandwidth,
whichever binds), with no overheads: the time is a lower bound and the MFU an upper bound (Llama
3.1 8B's step: 45% on v5p-64, but 100% of peak on v6e-64, where the model finds every op
compute-bound).
"""

import collections
import dataclasses
import math
import re
from typing import Any

import jax

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|ragged-all-to-all)"
    r"(?P<start>-start)?\(", re.MULTILINE)
_ARRAY = re.compile(r"(?P<dtype>pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[(?P<dims>[0-9,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def shard_bytes(tree) -> int:
  """Bytes of one device's shard of every array of `tree` (ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize  # a PRNG key dtype has one too
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {count, bytes}} of the collectives in an optimized HLO module's text (an async pair
  counted once, at its start). Bytes are each op's result per device; ops inside a loop body (the
  layer scan) are counted once, not once per iteration."""
  found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for match in _COLLECTIVE.finditer(hlo_text):
    arrays = [(dtype, dims) for dtype, dims in _ARRAY.findall(match.group("shape")) if dims or dtype != "u32"]
    if match.group("start") and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2:]  # an async start's tuple: (operands, results, sync flags)
    size = sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype] for dtype, dims in arrays)
    entry = found[match.group("kind")]
    entry["count"] += 1
    entry["bytes"] += int(size)
  return dict(sorted(found.items()))


@dataclasses.dataclass
class Report:
  """One compiled program on one topology; bytes and flops are per device (one chip)."""
  job: str
  topology: str
  chip: str
  num_devices: int
  num_hosts: int
  mesh: dict[str, int]
  hbm_capacity_bytes: int
  memory: dict[str, int]  # category -> bytes
  hbm_per_device_bytes: int
  flops_per_step: float  # XLA's count, all devices
  model_flops_per_step: float  # the model's own count (matmuls and attention), all devices
  tokens_per_step: int
  estimated_step_seconds: float
  estimated_mfu: float
  compile_seconds: float
  collectives: dict[str, dict[str, int]]
  xla_optimal_seconds: float = 0.0  # XLA's own figure, before the loop correction
  programs: list[str] = dataclasses.field(default_factory=list)
  program_memory: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # per program, by category
  program_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # per program, estimated, all its calls

  @property
  def fits(self) -> bool:
    return self.hbm_per_device_bytes <= self.hbm_capacity_bytes

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["fits"] = self.fits
    out["shortfall_bytes"] = max(0, self.hbm_per_device_bytes - self.hbm_capacity_bytes)
    out["flops_per_token"] = self.model_flops_per_step / max(self.tokens_per_step, 1)
    out["estimates"] = ("estimated_step_seconds and estimated_mfu come from XLA's TPU cost model "
                        "(cost_analysis optimal_seconds, scaled per program by model flops over XLA-counted flops "
                        "when above 1), not a measurement on a chip")
    return out


def memory(compiled, known_arguments: dict[str, int]) -> dict[str, int]:
  """Per-device bytes by category from `compiled.memory_analysis()`: the known argument parts,
  'other arguments' for the rest, outputs not aliased to an argument, temporaries, code."""
  analysis = compiled.memory_analysis()
  arguments = int(analysis.argument_size_in_bytes)
  out = {name: int(size) for name, size in known_arguments.items()}
  out["other arguments"] = max(0, arguments - sum(out.values()))
  out["outputs (not aliased)"] = max(0, int(analysis.output_size_in_bytes) - int(analysis.alias_size_in_bytes))
  out["temporaries"] = int(analysis.temp_size_in_bytes)
  out["code"] = int(getattr(analysis, "generated_code_size_in_bytes", 0))
  return out


def cost(compiled, chip) -> tuple[float, float]:
  """(flops, seconds) of one device's program from XLA's cost model: its `optimal_seconds`, or
  where it gives none (a negative figure, as for a program around a while loop) the roofline of
  the flops and bytes it counted on `chip` (train.aot.topology.Chip)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = float(analysis.get("flops", 0.0))
  seconds = float(analysis.get("optimal_seconds", -1.0))
  if seconds <= 0:
    seconds = max(flops / chip.peak_bf16_flops, float(analysis.get("bytes accessed", 0.0)) / chip.hbm_bandwidth)
  return flops, seconds


_OOM = re.compile(r"required for HLO temporaries \((?P<need>[0-9.]+)(?P<unit>[KMGT])\)")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def hbm_oom_temporaries(message: str) -> int | None:
  """The temporaries' bytes in the TPU compiler's out-of-HBM refusal ('CompileTimeHbmOom: ... the
  total memory required for HLO temporaries (120.60G) exceeds available HBM (95.73G)'); None for
  any other error."""
  if "RESOURCE_EXHAUSTED" not in message or "HBM" not in message:
    return None
  match = _OOM.search(message)
  return int(float(match.group("need")) * _UNITS[match.group("unit")]) if match else None


def format_bytes(n: float) -> str:
  return f"{n / (1 << 30):.2f} GiB" if abs(n) >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def to_text(report: Report) -> str:
  """The report as a researcher reads it in a terminal."""
  r = report
  verdict = (f"fits, {format_bytes(r.hbm_capacity_bytes - r.hbm_per_device_bytes)} to spare" if r.fits else
             f"DOES NOT FIT: {format_bytes(r.hbm_per_device_bytes - r.hbm_capacity_bytes)} short")
  mesh = " ".join(f"{axis}={size}" for axis, size in r.mesh.items() if size > 1) or "one device"
  lines = [
      f"{r.job} on {r.topology} ({r.chip}, {r.num_devices} chips, {r.num_hosts} hosts), mesh {mesh}",
      f"compiled in {r.compile_seconds:.1f} s ({', '.join(r.programs)})",
      f"HBM per chip: {format_bytes(r.hbm_per_device_bytes)} of {format_bytes(r.hbm_capacity_bytes)}: {verdict}",
  ]
  lines += [f"  {name:<24} {format_bytes(size):>12}" for name, size in r.memory.items() if size]
  per_token = r.model_flops_per_step / max(r.tokens_per_step, 1)
  lines += [
      f"model flops per step {r.model_flops_per_step:.3e} ({per_token:.3e} per token, {r.tokens_per_step} tokens); "
      f"XLA counts {r.flops_per_step:.3e} (custom calls such as Pallas kernels count none)",
      f"estimated step time {r.estimated_step_seconds * 1e3:.1f} ms, estimated MFU {100 * r.estimated_mfu:.1f}% "
      f"(ESTIMATES from XLA's TPU cost model, {r.xla_optimal_seconds * 1e3:.1f} ms as it counts, scaled to the "
      "model's flops: a roofline bound, so the MFU is at most this; not measurements)",
  ]
  if len(r.program_seconds) > 1:
    each = (f"{name} {seconds * 1e3:.1f} ms" for name, seconds in r.program_seconds.items())
    lines.append("  of which " + ", ".join(each))
  lines.append("collectives (ops in the program; a loop body's counted once):")
  lines += [f"  {kind:<20} {c['count']:>5} ops {format_bytes(c['bytes']):>12}" for kind, c in r.collectives.items()]
  if not r.collectives:
    lines.append("  none")
  return "\n".join(lines)
