"""Cloud TPU accelerator types (`v5p-128`, `v5litepod-16`, `v6e-256`, ...) as compile-only devices.

libtpu describes a slice without a TPU attached: `jax.experimental.topologies.get_topology_desc`
returns devices that `jax.jit(...).lower(...).compile()` targets with the real TPU compiler, one
per chip (v4 and v5p chips are megacore: one device for their two TensorCores). The name's number
counts TensorCores for v4 and v5p (v5p-128 is 64 chips) and chips for v5e and v6e; hosts hold a
2x2 block of chips (v5e-8 and v6e-8 are single 8-chip hosts), as Cloud TPU slices are laid out.

Chip figures are Google's published peak numbers (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
/v6e): HBM per chip, dense bf16 flops per second per chip, HBM bandwidth per chip.
"""

import dataclasses
import importlib.util
import os
import re

# Chip layout per slice size, by the count in the accelerator-type name.
_CUBE = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
         1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16", 8192: "16x16x16", 12288: "16x16x24"}
_PLANE = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # libtpu's topology prefix: v4, v5e, v5p, v6e
  hbm_bytes: int
  peak_bf16_flops: float  # per chip, per second
  hbm_bandwidth: float  # bytes per second per chip
  cores_in_name: int  # TensorCores per chip counted by the accelerator-type name (v4-8: 4 chips)


CHIPS = {
    "v4": Chip("v4", 32 * _GIB, 275e12, 1.2e12, 2),
    "v5e": Chip("v5e", 16 * _GIB, 197e12, 0.819e12, 1),
    "v5p": Chip("v5p", 95 * _GIB, 459e12, 2.765e12, 2),
    "v6e": Chip("v6e", 32 * _GIB, 918e12, 1.64e12, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given: v5p-128
  chip: Chip
  num_chips: int
  layout: str  # libtpu's: 4x4x4

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.generation}:{self.layout}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    if self.chip.generation in ("v5e", "v6e") and self.num_chips <= 8:
      return tuple(int(d) for d in self.layout.split("x")) + (1,)  # one host
    return (2, 2, 1) if self.num_chips >= 4 else (1, 1, 1)

  @property
  def num_hosts(self) -> int:
    per_host = 1
    for d in self.chips_per_host_bounds:
      per_host *= d
    return max(1, self.num_chips // per_host)


def parse(name: str) -> Topology:
  """'v5p-128' -> Topology(v5p, 64 chips, 4x4x4); a name that is not a Cloud TPU slice is a
  ValueError naming it and the sizes that exist."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite|v6litepod)-(\d+)", name.strip().lower())
  if not match:
    raise ValueError(f"--topology={name!r} is not a Cloud TPU accelerator type like v4-8, v5e-16 (v5litepod-16), "
                     f"v5p-128 or v6e-256")
  chip = CHIPS[_ALIASES.get(match.group(1), match.group(1))]
  count = int(match.group(2))
  table = _CUBE if chip.generation in ("v4", "v5p") else _PLANE
  if count % chip.cores_in_name or count not in table:
    sizes = ", ".join(f"{chip.generation}-{n}" for n in sorted(table))
    raise ValueError(f"--topology={name!r}: {chip.generation} slices come in {sizes}")
  return Topology(name=name, chip=chip, num_chips=count // chip.cores_in_name, layout=table[count])


def quiet_libtpu(topology: Topology | None = None) -> None:
  """Environment for libtpu on a machine without a TPU, set before it loads (values already set,
  as on a TPU VM, are kept): no lockfile, so several processes may compile at once (pytest's
  workers); the slice's accelerator type and a local worker, which libtpu otherwise looks up and
  warns about on stderr; its own logging at errors only."""
  generation = topology.chip.generation if topology else "v5p"
  count = topology.num_chips * topology.chip.cores_in_name if topology else 8
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{'v5litepod' if generation == 'v5e' else generation}-{count}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")


def devices(topology: Topology) -> list:
  """The slice's compile-only devices (one per chip), from libtpu; an ImportError saying how to
  install it when it is missing."""
  if importlib.util.find_spec("libtpu") is None:
    raise ImportError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
  quiet_libtpu(topology)
  from jax.experimental import topologies  # noqa: PLC0415 (loads libtpu)

  chip_config = "megacore" if topology.chip.cores_in_name == 2 else "default"
  description = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.libtpu_name, chip_config_name=chip_config,
      chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1,
  )
  found = list(description.devices)
  if len(found) != topology.num_chips:
    raise RuntimeError(f"libtpu described {len(found)} devices for {topology.libtpu_name}, expected {topology.num_chips}")
  return found
