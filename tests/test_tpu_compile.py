"""Every Pallas TPU kernel compiled, not interpreted, for TPU v5e, v5p and v6e on this CPU host.

libtpu describes each chip's topology (`jax.experimental.topologies`: compile-only devices, no chip
attached) and runs Mosaic's and XLA's whole pipeline for it. Flash attention forward and backward
over head dims 64, 128 and 256 with GQA, MQA, causal and bidirectional masks, a sliding window,
segment ids and a soft-cap, combined into three cases per chip (compiling dominates the time), and
paged attention in decode and chunked-prefill form. Each compile's memory is printed (`pytest -s`)
and checked against the chip: HBM from `compiled.memory_analysis()`, and the VMEM each kernel
reserves, which the compiled HLO records on its tpu_custom_call (`used_scoped_memory_configs`,
memory space 1: VMEM, S(1) in XLA's TPU layouts) and memory_analysis does not report. Block sizes
over a chip's scoped VMEM limit are rejected by pallas_kernels/tpu_vmem.py while tracing, before
anything is lowered or compiled. Skipped where libtpu is not installed.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import BlockSizes, flash_attention, paged_attention, tpu_vmem

pytest.importorskip("libtpu", reason="compiling for TPU on this host needs libtpu (`pip install libtpu`, in the "
                    "test extra); it is not installed")

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
CHIPS = ["v5e", "v5p", "v6e"]  # the generations the kernels are compiled for
MiB = tpu_vmem.MiB


@functools.cache
def _device(chip):
  """One chip of a small topology of that generation, described by libtpu on this host. libtpu
  takes a lock file that lets one process load it at a time, for the chips' sake; compiling
  touches no chip, so this process neither waits for nor blocks another one compiling for TPU."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[chip]).devices[0]


def _spec(shape, dtype, device):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))


def _traced(fn, device, *specs):
  """fn traced with `device` as the default device: the chip that tpu_vmem checks the blocks
  against, found as jax's Pallas lowering finds it. Tracing is where the check runs."""
  with jax.default_device(device):
    return jax.jit(fn).trace(*specs)


def _compiled(fn, device, *specs):
  """(lowered, compiled) for `device`."""
  lowered = _traced(fn, device, *specs).lower()
  return lowered, lowered.compile()


def _kernel_vmem(lowered, compiled) -> dict[str, int]:
  """Kernel name -> the bytes of VMEM its tpu_custom_call reserves, from the compiled HLO."""
  try:
    text = compiled.as_text()
  except jax.errors.JaxRuntimeError:
    # libtpu 0.0.52 on v5p and v6e offloads paged attention's scatter (the tokens counted per
    # sequence) to a SparseCore, whose async ops XLA cannot print ("async-update instruction
    # should have 1 operands but sees 4"): the same program with the scatter left on the
    # TensorCore prints, and its Mosaic kernel is the same.
    text = lowered.compile(compiler_options={"xla_tpu_enable_offloading_scatter_to_sparsecore": False}).as_text()
  out = {}
  for line in text.splitlines():
    if 'custom_call_target="tpu_custom_call"' not in line:
      continue
    name = re.match(r"\s*(?:ROOT )?%([\w-]+?)(?:\.\d+)? = ", line).group(1)
    used = re.findall(r'"used_scoped_memory_configs":\[\{"memory_space":"1","offset":"\d+","size":"(\d+)"', line)
    out[name] = max([out.get(name, 0), *map(int, used)])
  return out


def _check_memory(lowered, compiled, chip, *, inputs, outputs, estimates):
  """Prints and checks what the compiler reports: HBM for arguments, outputs and temporaries;
  VMEM per kernel against its scoped limit and against tpu_vmem's estimate (estimates: kernel
  name -> bytes)."""
  limits = tpu_vmem.CHIPS[_device(chip).device_kind]
  memory = compiled.memory_analysis()
  vmem = _kernel_vmem(lowered, compiled)
  print(f"\n{chip}: arguments {memory.argument_size_in_bytes / MiB:.1f} MiB, outputs "
        f"{memory.output_size_in_bytes / MiB:.1f} MiB, temporaries {memory.temp_size_in_bytes / MiB:.1f} MiB, "
        f"code {memory.generated_code_size_in_bytes / MiB:.2f} MiB; VMEM per kernel (compiler / estimate, MiB): "
        + ", ".join(f"{name} {used / MiB:.2f} / {estimates[name] / MiB:.2f}" for name, used in sorted(vmem.items())))
  assert sorted(vmem) == sorted(estimates)
  # The arrays, padded to the TPU's tiles, are at least their bytes; all of it fits the chip's HBM.
  assert memory.argument_size_in_bytes >= sum(x.size * x.dtype.itemsize for x in inputs)
  assert memory.output_size_in_bytes >= sum(x.size * x.dtype.itemsize for x in outputs)
  assert 0 < memory.temp_size_in_bytes < limits.hbm_bytes
  assert memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes < limits.hbm_bytes
  for name, used in vmem.items():
    assert 0 < used <= limits.scoped_limit_bytes, (name, used)
    # tpu_vmem's model against the compiler: near the limit it was fitted to stay at or just under
    # the compiler's figure; at these default 128-row tiles it counts up to twice what Mosaic takes.
    assert 0.7 * used <= estimates[name] <= 2 * used, (name, used, estimates[name])


BATCH, SEQ = 4, 16384  # operands of 32 to 128 MiB: in HBM, streamed through VMEM tile by tile
# id: (head dim, query heads N, kv heads K, flash_attention keywords; segments: segment ids given)
FLASH_CASES = {
    "h64_gqa_causal_window_softcap": (64, 8, 2, dict(causal=True, sliding_window=512, logit_softcap=30.0)),
    "h128_mqa_causal_segments": (128, 8, 1, dict(causal=True, segments=True)),
    "h256_bidirectional_segments_window_softcap": (
        256, 4, 4, dict(causal=False, segments=True, sliding_window=300, logit_softcap=50.0)),
}


def _flash_specs(device, head_dim, heads, kv_heads):
  """q [B, T, N, H], k and v [B, S, K, H] in bfloat16, segment ids [B, T] int32 (T = S)."""
  return (_spec((BATCH, SEQ, heads, head_dim), jnp.bfloat16, device),
          *[_spec((BATCH, SEQ, kv_heads, head_dim), jnp.bfloat16, device)] * 2,
          _spec((BATCH, SEQ), jnp.int32, device))


def _forward_and_grads(q, k, v, segment_ids, *, segments, **kwargs):
  """The output and (dq, dk, dv) for cotangent 1: one program holding all three kernels."""
  attend = functools.partial(flash_attention, segment_ids=segment_ids if segments else None, interpret=False, **kwargs)
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(jnp.ones_like(out))


@pytest.mark.parametrize("case", FLASH_CASES)
@pytest.mark.parametrize("chip", CHIPS)
def test_flash_attention_forward_and_backward_compile(chip, case):
  head_dim, heads, kv_heads, kwargs = FLASH_CASES[case]
  kwargs = dict(kwargs)
  segments = kwargs.pop("segments", False)
  device = _device(chip)
  specs = _flash_specs(device, head_dim, heads, kv_heads)
  lowered, compiled = _compiled(functools.partial(_forward_and_grads, segments=segments, **kwargs), device, *specs)
  blocks = BlockSizes.get_default("tpu", head_dim)  # SEQ is a multiple of its blocks: these are the kernels'
  estimates = {f"flash_attention_{kernel}_tpu": tpu_vmem.flash_vmem_bytes(
      kernel, block_q=blocks.block_q, block_kv=blocks.block_kv, head_dim=head_dim, dtype=jnp.bfloat16,
      group=heads // kv_heads) for kernel in ("forward", "dq", "dkv")}
  q, k, v, _ = specs
  inputs = specs if segments else specs[:3]  # jit drops an unused argument
  _check_memory(lowered, compiled, chip, inputs=inputs, outputs=[q, q, k, v], estimates=estimates)


# Serving sizes: a pool of 2048 blocks of 16 positions, K = 8 kv heads of 128, N = 32 query heads
# (G = 4), 32 sequences of up to 64 blocks; default tiles (block_q = 128 // G, 128 keys a step).
# (Not tests/test_paged_attention.py's v5e compile: the same program would hit the persistent
# compilation cache, which cannot load an executable for a compile-only device.)
PAGED_FORMS = {
    "decode": (32, 1, {}),  # 32 sequences of one token
    "chunked_prefill": (256, 128, dict(sliding_window=100, logit_softcap=30.0)),  # chunks of up to 128 tokens
}


@pytest.mark.parametrize("form", PAGED_FORMS)
@pytest.mark.parametrize("chip", CHIPS)
def test_paged_attention_compiles(chip, form):
  tokens, max_q_len, kwargs = PAGED_FORMS[form]
  device = _device(chip)
  pages = _spec((2048, 16, 8, 128), jnp.bfloat16, device)
  specs = (_spec((tokens, 32, 128), jnp.bfloat16, device), pages, pages, _spec((32, 64), jnp.int32, device),
           _spec((tokens,), jnp.int32, device), _spec((tokens,), jnp.int32, device))
  attend = functools.partial(paged_attention, interpret=False, max_q_len=max_q_len, **kwargs)
  lowered, compiled = _compiled(attend, device, *specs)
  block_q = min(max_q_len, 128 // 4)
  estimate = tpu_vmem.paged_vmem_bytes(rows=block_q * 4, pages_per_step=8, block_size=16, kv_heads=8, head_dim=128,
                                       dtype=jnp.bfloat16)
  _check_memory(lowered, compiled, chip, inputs=specs, outputs=specs[:1], estimates={"paged_attention_tpu": estimate})


def test_the_same_blocks_are_rejected_for_a_v5e_and_compile_for_a_v6e():
  """Forward tiles of 2048 x 512 at head dim 128: about 16.5 MiB by the estimate, over a v5e's
  16 MiB scoped VMEM limit (Mosaic agrees: it fails them at 16.8 MiB) and under a v6e's 32 MiB."""
  blocks = BlockSizes(block_q=2048, block_kv=512)
  attend = functools.partial(flash_attention, block_sizes=blocks, interpret=False)
  v5e, v6e = _device("v5e"), _device("v6e")
  message = r"BlockSizes block_q=2048, block_kv=512 .* 16\.0 MiB scoped VMEM limit of a TPU v5e"
  with pytest.raises(ValueError, match=message):
    _traced(attend, v5e, *_flash_specs(v5e, 128, 8, 8)[:3])
  lowered, compiled = _compiled(attend, v6e, *_flash_specs(v6e, 128, 8, 8)[:3])
  assert _kernel_vmem(lowered, compiled)["flash_attention_forward_tpu"] <= 32 * MiB


@pytest.mark.parametrize("chip", CHIPS)
def test_blocks_over_vmem_are_rejected_before_compiling(chip):
  """Tracing fails, naming the BlockSizes keys, the need and the limit: nothing is lowered."""
  device = _device(chip)
  q, k, v, _ = _flash_specs(device, 128, 8, 8)
  limit_mib = tpu_vmem.CHIPS[device.device_kind].scoped_limit_bytes / MiB
  limit = rf"{limit_mib:.1f} MiB scoped VMEM limit of a TPU {chip}"
  forward = functools.partial(flash_attention, block_sizes=BlockSizes(block_q=2048, block_kv=2048), interpret=False)
  need = r"forward_tpu kernel needs about [\d.]+ MiB of VMEM"
  with pytest.raises(ValueError, match=rf"BlockSizes block_q=2048, block_kv=2048 .*{need}.*{limit}"):
    _traced(forward, device, q, k, v)
  # The forward's blocks fit; the backward's, set apart, do not.
  blocks = BlockSizes(block_q=128, block_kv=128, block_q_bwd=4096, block_kv_bwd=4096)
  grads = jax.grad(lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, interpret=False).sum(), (0, 1, 2))
  with pytest.raises(ValueError, match=rf"block_q_bwd=4096, block_kv_bwd=4096 .*dq_tpu kernel .*{limit}"):
    _traced(grads, device, q, k, v)
  # Paged attention: 256 pages of 16 positions a kv step, K = 8 heads of 128, double-buffered: 32 MiB.
  pages = _spec((512, 16, 8, 128), jnp.bfloat16, device)
  decode = functools.partial(paged_attention, interpret=False, max_q_len=1, pages_per_step=256)
  with pytest.raises(ValueError, match=rf"pages_per_step=256 .*paged_attention_tpu kernel .*{limit}"):
    _traced(decode, device, _spec((16, 32, 128), jnp.bfloat16, device), pages, pages,
            _spec((16, 256), jnp.int32, device), _spec((16,), jnp.int32, device), _spec((16,), jnp.int32, device))


def test_which_chip_is_checked():
  """The TPU being compiled for (mesh in context, else the default device); a v5e for TPU interpret
  mode off a TPU; nothing for the TPU branch that platform_dependent traces for CPU."""
  if jax.default_backend() == "tpu":
    pytest.skip("checks what happens off a TPU; the default backend here is one")
  assert tpu_vmem.target_chip() is None
  assert tpu_vmem.target_chip(interpret=pltpu.InterpretParams()).name == "v5e"
  with jax.default_device(_device("v6e")):
    assert tpu_vmem.target_chip().name == "v6e"
  with jax.set_mesh(jax.sharding.Mesh(np.array([_device("v5p")]), ("x",))):
    assert tpu_vmem.target_chip().name == "v5p"
  # On CPU the default path (CPU interpret mode; the TPU branch only traced) takes any blocks;
  # TPU interpret mode stands for a TPU: a v5e's limit.
  q = jax.ShapeDtypeStruct((1, 2048, 1, 128), jnp.float32)
  blocks = BlockSizes(block_q=2048, block_kv=2048)
  jax.jit(functools.partial(flash_attention, block_sizes=blocks)).trace(q, q, q)
  with pytest.raises(ValueError, match="limit of a TPU v5e"):
    jax.jit(functools.partial(flash_attention, block_sizes=blocks, interpret=pltpu.InterpretParams())).trace(q, q, q)


@pytest.mark.parametrize("chip", list(TOPOLOGIES))
def test_chip_table_matches_libtpu_and_jax(chip):
  """libtpu's device_kind for each topology names the chip in tpu_vmem.CHIPS; its VMEM is what
  jax's Pallas TPU hardware table says (the scoped limits are libtpu's own, checked by the compiles
  above: the compiler's figure within them, and v5e rejecting what a v6e compiles)."""
  entry = tpu_vmem.CHIPS[_device(chip).device_kind]
  assert entry.name == chip
  info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(chip), 1)
  assert entry.vmem_bytes == info.vmem_capacity_bytes
  assert entry.scoped_limit_bytes <= entry.vmem_bytes
