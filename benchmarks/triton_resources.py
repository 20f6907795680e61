"""Compile our flash-attention kernels for Hopper (sm_90a) without a GPU, and check their resources.

    pip install triton==3.9.0          # the Triton compiler; a tool here, not a dependency
    python benchmarks/triton_resources.py [--block-q 128 --block-kv 64 --block-q-bwd 128 --block-kv-bwd 32
                                           --warps 8 --stages 2]   # default: BlockSizes.get_default("gpu", H)

For head dims 64/128/256, GQA groups 1 and 8, plain causal and with every feature (segments,
sliding window, soft-cap), it lowers forward+backward for CUDA on this CPU host (Pallas's Triton
lowering, as on a GPU), takes the three kernels' Triton IR, compiles it with the `triton` package
to PTX and ptxas (the ptxas that Triton ships) to a cubin, and prints per kernel: shared memory,
registers per thread, spilled bytes, and whether the matmuls became Hopper's wgmma. A kernel over
the chip's limits (227 KiB of shared memory per block, 255 registers) fails at launch on the GPU;
spills slow it down. Exits 1 when any kernel is over a limit.

What this is not: a timing, or XLA's own compilation. On a GPU, jaxlib compiles the same IR with
the Triton version pinned in XLA and XLA's pass pipeline, so the figures are close but not
identical; only the GPU run (benchmarks/gpu_check.sh) is the measurement.
"""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # this checkout, not an installed copy
from pallas_kernels import BlockSizes, flash_attention  # noqa: E402

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

_SHARED_LIMIT = 227 * 1024  # H100/H200: the most dynamic shared memory one block can opt into
_REGISTER_LIMIT = 255


def kernel_ir(head_dim, group, features, blocks, seq=1024, kv_heads=2):
  """{kernel name: Triton IR text} of forward+backward lowered for CUDA."""
  from jax._src.pallas.triton import pallas_call_registration  # noqa: PLC0415 (private: where the IR is made)

  captured = {}
  lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    text = result.module.operation.get_asm()
    captured[re.search(r"tt\.func public @(\w+)", text).group(1)] = text
    return result

  q = jax.ShapeDtypeStruct((1, seq, kv_heads * group, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), jnp.bfloat16)
  segments = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  kwargs = dict(sliding_window=512, logit_softcap=30.0) if features else {}

  def loss(q, k, v, segment_ids):
    out = flash_attention(q, k, v, segment_ids=segment_ids if features else None, block_sizes=blocks,
                          interpret=False, **kwargs)
    return out.astype(jnp.float32).sum()

  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, segments).lower(lowering_platforms=("cuda",))
  finally:
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
  return captured


def compile_for_hopper(ir_text, num_warps, num_stages, workdir):
  """(shared bytes, registers, spill bytes, uses wgmma) of the IR compiled for sm_90a."""
  import triton  # noqa: PLC0415 (the optional tool)
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

  path = os.path.join(workdir, "kernel.ttir")
  with open(path, "w") as f:
    f.write(ir_text)
  kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
  ptx = kernel.asm["ptx"]
  with open(path + ".ptx", "w") as f:
    f.write(ptx)
  report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path + ".ptx", "-o", path + ".cubin"],
                          capture_output=True, text=True, check=True).stderr
  registers = int(re.search(r"Used (\d+) registers", report).group(1))
  spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
  return kernel.metadata.shared, registers, spills, "wgmma" in ptx


def main():
  parser = argparse.ArgumentParser()
  overrides = dict(block_q="--block-q", block_kv="--block-kv", block_q_bwd="--block-q-bwd",
                   block_kv_bwd="--block-kv-bwd", num_warps="--warps", num_stages="--stages")
  for field, flag in overrides.items():
    parser.add_argument(flag, type=int, dest=field)
  parser.add_argument("--head-dims", default="64,128,256")
  parser.add_argument("--groups", default="1,8")
  args = parser.parse_args()
  try:
    import triton  # noqa: PLC0415
  except ImportError:
    print("needs the Triton compiler: pip install triton==3.9.0")
    return 0
  print(f"jax {jax.__version__}, triton {triton.__version__}, target sm_90a (H100/H200); "
        f"limits: {_SHARED_LIMIT} bytes shared memory per block, {_REGISTER_LIMIT} registers")
  print(f"{'H':>4} {'G':>2} {'features':>8} {'kernel':>24} {'blocks':>8} {'warps':>5} {'stages':>6} "
        f"{'shared B':>9} {'regs':>5} {'spill B':>7} {'wgmma':>5}")
  over = 0
  with tempfile.TemporaryDirectory() as workdir:
    for head_dim in map(int, args.head_dims.split(",")):
      blocks = dataclasses.replace(BlockSizes.get_default("gpu", head_dim),
                                   **{f: getattr(args, f) for f in overrides if getattr(args, f) is not None})
      for group in map(int, args.groups.split(",")):
        for features in (False, True):
          for name, ir_text in sorted(kernel_ir(head_dim, group, features, blocks).items()):
            shared, registers, spills, wgmma = compile_for_hopper(ir_text, blocks.num_warps, blocks.num_stages,
                                                                  workdir)
            flag = "  OVER" if shared > _SHARED_LIMIT or registers > _REGISTER_LIMIT else ""
            over += bool(flag)
            tile = (blocks.block_q, blocks.block_kv) if name.endswith("forward") else blocks.backward
            print(f"{head_dim:>4} {group:>2} {'all' if features else 'causal':>8} {name:>24} "
                  f"{tile[0]:>3}x{tile[1]:<4} {blocks.num_warps:>5} {blocks.num_stages:>6} "
                  f"{shared:>9} {registers:>5} {spills:>7} {str(wgmma):>5}{flag}", flush=True)
  print(f"{over} kernel(s) over a limit")
  return 1 if over else 0


if __name__ == "__main__":
  sys.exit(main())
