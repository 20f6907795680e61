"""VMEM per TPU generation, and a check that a kernel's blocks fit it before Mosaic compiles them.

A Pallas TPU kernel's working set lives in VMEM: each BlockSpec's tile, double-buffered (the
pipeline DMAs the next tile while this one computes), its scratch, and the values Mosaic keeps
between operations ([bq, bk] float32 logits and probabilities). Mosaic fails a kernel whose
working set passes the chip's scoped VMEM limit only when compiling, with an error that names
neither our block sizes nor the fix ("E1001: CompileTimeScopedVmemOom"); `check` names the block
sizes to shrink, while tracing, before anything is lowered.

The estimate is a model, not the compiler's allocator: tiles padded to the TPU's (8, 128) layout,
twice for double buffering, plus scratch, plus the float32 temporaries counted per kernel in
_TEMPS. Those counts are fitted to the VMEM that libtpu reports per kernel (the
`used_scoped_memory_configs` of its tpu_custom_call in the compiled HLO, or the size in its E1001
error) and rounded down, so that near the limit the estimate is at or just under the compiler's
figure: a block size the check rejects does not compile either, while one it passes may still fail
in Mosaic, whose error then says so. tests/test_tpu_compile.py compiles both sides of the line.

Which chip: the TPU the computation is compiled for, found as jax's own Pallas lowering finds it
(the device of the mesh in context, `jax.set_mesh`, else the default device, `jax.default_device`,
else the default backend's). When that is not a TPU, a kernel in TPU interpret mode is checked
against a v5e (16 MiB: the smallest default scoped limit of v5e, v5p and v6e, so what passes fits
all three), and the check is skipped otherwise: `jax.lax.platform_dependent` traces the TPU branch
of every call, also on CPU and GPU, where that branch never runs. A TPU generation missing from
CHIPS is not checked.
"""

import dataclasses
import os
import re

import jax
import numpy as np

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TensorCore's memory. scoped_limit_bytes: what one kernel (one HLO instruction) may take
  of VMEM by default; vmem_bytes: all of it; hbm_bytes: the chip's HBM."""

  name: str
  vmem_bytes: int
  scoped_limit_bytes: int
  hbm_bytes: int


# Keyed by device_kind as libtpu reports it (the compile-only devices of `jax.experimental.topologies`
# for "v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2" report "TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite").
# VMEM: jax's pltpu.get_tpu_info_for_chip (jax/_src/pallas/mosaic/tpu_info.py, the table behind the
# Pallas "TPU hardware reference" page): 16 MiB per core on v4, 128 MiB on v5e and v6e, 64 MiB on
# v5p; libtpu 0.0.52 agrees, failing a larger scratch buffer with "would exceed memory (size=16777216 /
# 134217728 / 67108864)". (The Pallas software-pipelining guide's "TPU v5p contains 96MB of VMEM" is
# at odds with both; 95 GiB is v5p's HBM.) Scoped limits, measured with libtpu 0.0.52 by compiling a
# kernel of growing blocks: "Scoped allocation with size ... and limit 16.00M" on v5e and v5p, "limit
# 32.00M" on v6e (the E1001 error, openxla.org/xla/errors/error_1001: set by the libtpu flag
# --xla_tpu_scoped_vmem_limit_kib or a kernel's vmem_limit_bytes); a v4 kernel fails at its whole
# 16 MiB instead. HBM: the Cloud TPU system-architecture pages (v4 32 GiB, v5e 16 GB, v5p 95 GB,
# v6e 32 GB per chip), as in tpu_info's hbm_capacity_bytes.
_V4 = Chip("v4", 16 * MiB, 16 * MiB, 32 * 1024 * MiB)
_V5E = Chip("v5e", 128 * MiB, 16 * MiB, 16 * 1024 * MiB)
_V5P = Chip("v5p", 64 * MiB, 16 * MiB, 95 * 1024 * MiB)
_V6E = Chip("v6e", 128 * MiB, 32 * MiB, 32 * 1024 * MiB)
CHIPS = {"TPU v4": _V4, "TPU v5 lite": _V5E, "TPU v5e": _V5E, "TPU v5": _V5P, "TPU v5p": _V5P, "TPU v6 lite": _V6E,
         "TPU v6e": _V6E}
INTERPRET_CHIP = _V5E  # the chip a kernel in TPU interpret mode is checked against, off a TPU

# Float32 [rows, cols] temporaries each kernel keeps in VMEM beside its tiles, in [bq, bk] tiles
# (the paged kernel's: [rows, keys of a step]); fitted, rounded down: the forward's logits and
# probabilities, less what streams through; the dQ kernel's, mostly streamed; the dK/dV kernel's,
# per query head of the group it loops over, at most two (the unrolled loop reuses the rest);
# the paged kernel's, one kv head's logits at a time, half kept.
_TEMPS = {"forward": 1.75, "dq": 0.75, "dkv": 0.75, "paged": 0.5}


def _tile_bytes(shape, dtype) -> int:
  """Bytes of an array in VMEM: its last two dimensions padded to the TPU's tiles, 128 lanes by 8
  rows (16-bit types too, in (8, 128)(2, 1) tiles; 32 rows of 8-bit types), or by 1, 2 or 4 rows
  where there are fewer (XLA's T(1, 128), T(2, 128), T(4, 128) layouts)."""
  itemsize = np.dtype(dtype).itemsize
  *lead, rows, cols = shape
  sublanes = (8 if itemsize >= 2 else 8 * 4 // itemsize) if rows >= 8 else 1 << (rows - 1).bit_length()
  return int(np.prod(lead, dtype=np.int64)) * -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


def flash_vmem_bytes(kernel: str, *, block_q: int, block_kv: int, head_dim: int, dtype, group: int = 1) -> int:
  """Estimated VMEM of one of flash_attention_tpu.py's kernels ("forward", "dq" or "dkv") at these
  blocks; dtype: q's, k's and v's; group: G, the query heads per kv head (the dK/dV kernel's
  query tiles hold all G)."""
  q, kv = _tile_bytes((block_q, head_dim), dtype), _tile_bytes((block_kv, head_dim), dtype)
  row = _tile_bytes((block_q, 1), np.float32)  # lse, delta, and the query segment ids (int32)
  segments = row + _tile_bytes((1, block_kv), np.int32)
  f32 = lambda rows, cols: _tile_bytes((rows, cols), np.float32)  # noqa: E731
  if kernel == "forward":  # q, k, v, segment ids -> o, lse; scratch m, l, acc
    tiles, scratch = q + 2 * kv + segments + q + row, 2 * row + f32(block_q, head_dim)
  elif kernel == "dq":  # q, k, v, segment ids, do, lse, delta -> dq; scratch dq
    tiles, scratch = 3 * q + 2 * kv + segments + 2 * row, f32(block_q, head_dim)
  elif kernel == "dkv":  # G query heads' q, do, lse, delta; k, v, segment ids -> dk, dv; scratch dk, dv
    tiles, scratch = group * (2 * q + 2 * row) + 4 * kv + segments, 2 * f32(block_kv, head_dim)
  else:
    raise ValueError(f"kernel={kernel!r} must be 'forward', 'dq' or 'dkv'")
  temps = _TEMPS[kernel] * (min(group, 2) if kernel == "dkv" else 1) * f32(block_q, block_kv)
  return int(2 * tiles + scratch + temps)


def paged_vmem_bytes(*, rows: int, pages_per_step: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
  """Estimated VMEM of paged_attention.py's kernel: a query tile [K, rows, H] in and out,
  2 * pages_per_step pages [block_size, K, H] (k and v); scratch m, l [K, rows, 1] and acc
  [K, rows, H]; one kv head's logits [rows, pages_per_step * block_size] in float32."""
  tile = _tile_bytes((kv_heads, rows, head_dim), dtype)
  page = _tile_bytes((block_size, kv_heads, head_dim), dtype)
  scratch = 2 * _tile_bytes((kv_heads, rows, 1), np.float32) + _tile_bytes((kv_heads, rows, head_dim), np.float32)
  temps = _TEMPS["paged"] * _tile_bytes((rows, pages_per_step * block_size), np.float32)
  return int(2 * (2 * tile + 2 * pages_per_step * page) + scratch + temps)


def target_chip(interpret=False) -> Chip | None:
  """The chip to check against: the TPU being compiled for, found as jax's Pallas lowering finds it
  (the mesh in context, else the default device); INTERPRET_CHIP for a kernel in TPU interpret mode
  off a TPU; None otherwise (not for a TPU, or a generation not in CHIPS)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is None:
    default = jax.config.jax_default_device
    device = default if default is not None and not isinstance(default, str) else jax.devices(default)[0]
  if device.platform == "tpu":
    return CHIPS.get(device.device_kind)
  return INTERPRET_CHIP if interpret else None


def scoped_limit_bytes(chip: Chip) -> int:
  """The chip's scoped VMEM limit, or the one set by --xla_tpu_scoped_vmem_limit_kib in
  LIBTPU_INIT_ARGS (libtpu reads its flags from there)."""
  flag = re.search(r"--xla_tpu_scoped_vmem_limit_kib=(\d+)", os.environ.get("LIBTPU_INIT_ARGS", ""))
  return min(int(flag.group(1)) * 1024, chip.vmem_bytes) if flag else chip.scoped_limit_bytes


def check(need: int, chip: Chip | None, *, kernel: str, blocks: str):
  """Raises ValueError naming `blocks` (the block-size keys and values to shrink) when `need` bytes
  exceed the chip's scoped VMEM limit; nothing when chip is None."""
  if chip is None:
    return
  limit = scoped_limit_bytes(chip)
  if need > limit:
    raise ValueError(
        f"{blocks}: the {kernel} kernel needs about {need / MiB:.1f} MiB of VMEM (its tiles double-buffered, "
        f"scratch and float32 temporaries), over the {limit / MiB:.1f} MiB scoped VMEM limit of a TPU {chip.name}; "
        "use smaller blocks (or raise the limit with LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=N)")


def check_flash(step: str, *, block_q: int, block_kv: int, head_dim: int, dtype, group: int, interpret):
  """Checks flash_attention_tpu.py's kernels of one step, "forward" or "backward" (dQ and dK/dV),
  on the chip being compiled for (see target_chip), naming the BlockSizes keys that set the blocks."""
  chip = target_chip(interpret)
  keys = ("block_q", "block_kv") if step == "forward" else ("block_q_bwd", "block_kv_bwd")
  blocks = (f"BlockSizes {keys[0]}={block_q}, {keys[1]}={block_kv} (head_dim={head_dim}, "
            f"{np.dtype(dtype).name}, G={group})")
  for kernel in ("forward",) if step == "forward" else ("dq", "dkv"):
    need = flash_vmem_bytes(kernel, block_q=block_q, block_kv=block_kv, head_dim=head_dim, dtype=dtype, group=group)
    check(need, chip, kernel=f"flash_attention_{kernel}_tpu", blocks=blocks)


def check_paged(*, block_q: int, group: int, pages_per_step: int, block_size: int, kv_heads: int, head_dim: int, dtype,
                interpret):
  """Checks paged_attention.py's kernel on the chip being compiled for, naming its tiling keys."""
  need = paged_vmem_bytes(rows=block_q * group, pages_per_step=pages_per_step, block_size=block_size,
                          kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
  blocks = (f"paged_attention block_q={block_q} (x G={group}: {block_q * group} rows), pages_per_step="
            f"{pages_per_step} (x block_size={block_size}: {pages_per_step * block_size} keys; K={kv_heads}, "
            f"head_dim={head_dim}, {np.dtype(dtype).name})")
  check(need, target_chip(interpret), kernel="paged_attention_tpu", blocks=blocks)
