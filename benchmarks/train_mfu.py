"""Train-step MFU: the project's real train step on the llama3.2-1b preset, on one GPU.

    python benchmarks/train_mfu.py                             # llama3.2-1b, T=2048, B=8, cudnn, remat dots
    python benchmarks/train_mfu.py --batch=4 --attention_impl=pallas --remat_policy=full
    JAX_PLATFORMS=cpu python benchmarks/train_mfu.py --tiny --seq=128 --batch=2 --steps=2 --warmup=1 \
        --attention_impl=xla                                   # CPU smoke run of the tiny preset

One full update (forward, backward, AdamW with the project's default optimizer config, clipping
included) in bfloat16 compute with float32 parameters, scanned layers, on a random [B, T] token
batch. The step is `train.step.make_train_step` with `train.losses.next_token_loss`, jitted with
donation and compiled ahead of time, so compilation is timed apart. Model FLOPs per token are
`model.flops_per_token` (PaLM's count: the full T x T attention square, no remat recompute), and
MFU is their rate over the device's peak dense bfloat16 TFLOP/s, looked up from its device kind
(or given with --peak_tflops).
"""

import argparse
import os
import statistics
import sys
import time

# Benchmark this checkout, not whatever copy of the package is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import model  # noqa: E402
from configs import common as configs_common  # noqa: E402
from train import losses  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import step as step_lib  # noqa: E402

# Peak dense (no sparsity) bfloat16 tensor-core TFLOP/s, from NVIDIA's datasheets; the first
# pattern that all of a row's words are in the device kind wins.
PEAK_BF16_TFLOPS = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), None),  # not in this table: give --peak_tflops
    (("H100",), 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), 989.4),
    (("A100",), 312.0),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="the 'tiny' preset instead of llama3.2-1b (CPU smoke run)")
  p.add_argument("--layers", type=int, default=0, help="L; 0 keeps the preset's")
  p.add_argument("--seq", type=int, default=2048)  # T
  p.add_argument("--batch", type=int, default=8)  # B
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps, after compilation")
  p.add_argument("--attention_impl", default="cudnn", choices=model.config.ATTENTION_IMPLS)
  p.add_argument("--remat_policy", default="dots", choices=model.config.REMAT_POLICIES)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="peak TFLOP/s for MFU; 0 looks it up")
  return p.parse_args(argv)


def peak_tflops(device_kind: str) -> tuple[float | None, str]:
  """(peak dense bfloat16 TFLOP/s, where it came from); None when the device is not in the table."""
  for words, peak in PEAK_BF16_TFLOPS:
    if all(w.lower() in device_kind.lower() for w in words):
      if peak is None:
        break
      return peak, f"{' '.join(words)} datasheet"
  return None, f"device kind {device_kind!r} is not in the peak table (give --peak_tflops)"


def main(argv=None):
  args = parse_args(argv)
  overrides = dict(dtype="bfloat16", param_dtype="float32", attention_impl=args.attention_impl,
                   remat_policy=args.remat_policy, scan_layers=True)
  if args.layers:
    overrides["num_layers"] = args.layers
  preset = "tiny" if args.tiny else "llama3.2-1b"
  cfg = model.get_preset(preset, **overrides)
  device = jax.devices()[0]
  print(f"jax {jax.__version__} ({jax.default_backend()}), device: {device.device_kind} x{jax.device_count()}")
  print(f"preset {preset}: L={cfg.num_layers} D={cfg.embed_dim} N={cfg.num_heads} K={cfg.num_kv_heads} "
        f"H={cfg.head_dim} F={cfg.mlp_dim} V={cfg.vocab_size} tied={cfg.tie_embeddings}; T={args.seq} B={args.batch}; "
        f"dtype={cfg.dtype} param_dtype={cfg.param_dtype} attention_impl={cfg.attention_impl} "
        f"remat_policy={cfg.remat_policy} scan_layers={cfg.scan_layers}", flush=True)

  module = model.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  del module
  num_params = sum(x.size for x in jax.tree.leaves(params))
  tx, schedule = optimizer_lib.make_optimizer(configs_common.optimizer_config(), total_steps=1000)
  state = step_lib.init_state(params, tx, seed=0)
  train_step = jax.jit(step_lib.make_train_step(graphdef, losses.next_token_loss, tx, schedule), donate_argnums=0)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)  # [B, T]
  b, t = tokens.shape
  batch = {
      "tokens": jnp.asarray(tokens),
      "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),  # random data: only the shapes matter
      "loss_mask": jnp.ones((b, t), jnp.int32),
      "segment_ids": jnp.ones((b, t), jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
  }
  start = time.perf_counter()
  compiled = train_step.lower(state, rest, batch).compile()
  print(f"params {num_params:,}; compile (lower + compile, excluded from step times): "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  try:
    mem = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001  (not every backend implements it)
    mem, why = None, f"{type(e).__name__}: {e}"
  else:
    why = "the backend returned none"
  if mem is not None:
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    print(f"memory_analysis: arguments {gib(mem.argument_size_in_bytes)}, outputs {gib(mem.output_size_in_bytes)}, "
          f"aliased (donated) {gib(mem.alias_size_in_bytes)}, temporaries {gib(mem.temp_size_in_bytes)}; "
          f"arguments + outputs - aliased + temporaries = {gib(total)}", flush=True)
  else:
    print(f"memory_analysis: n/a ({why})")

  def run():
    nonlocal state
    start = time.perf_counter()
    state, metrics = compiled(state, rest, batch)
    jax.block_until_ready(state)  # dispatch is asynchronous: wait for the update itself
    return time.perf_counter() - start, float(metrics["loss"]), float(metrics["tokens"])

  for _ in range(args.warmup):
    run()
  results = [run() for _ in range(args.steps)]
  times = [r[0] for r in results]
  _, loss, step_tokens = results[-1]
  median = statistics.median(times)
  tokens_per_s = step_tokens / median
  flops_per_token = model.flops_per_token(cfg, args.seq)
  achieved = flops_per_token * tokens_per_s / 1e12
  print(f"step times (s): {', '.join(f'{s:.4f}' for s in times)}")
  print(f"median step {median:.4f} s (min {min(times):.4f}); {step_tokens:.0f} tokens/step; loss {loss:.4f}")
  print(f"tokens/s {tokens_per_s:,.0f}; model FLOPs/token {flops_per_token / 1e9:.4g} GFLOP; "
        f"achieved {achieved:.4g} TFLOP/s")
  peak, source = (args.peak_tflops, "--peak_tflops") if args.peak_tflops else peak_tflops(device.device_kind)
  if peak:
    print(f"MFU {100 * achieved / peak:.1f}% (peak {peak} bf16 dense TFLOP/s, {source})")
  else:
    print(f"MFU n/a: {source}")
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    print(f"device memory: peak in use {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
          + (f" of {stats['bytes_limit'] / 2**30:.2f} GiB allocator limit" if "bytes_limit" in stats else ""))


if __name__ == "__main__":
  main()
