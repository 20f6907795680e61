"""Attention TFLOP/s: our Pallas flash attention against jax.nn.dot_product_attention (cuDNN and XLA).

    python benchmarks/attention.py            # on a GPU; on a CPU it says so and exits 0

Forward and forward+backward, head dims 64 and 128, sequence 1k to 16k, causal and not, bfloat16,
all in one run; prints a table with ratios to cuDNN, and for each shape the largest difference of
our forward output from cuDNN's (both bfloat16). FLOPs count the full T x S square
(4 * B * N * T * S * H forward; forward+backward 3.5x that: the backward pass is five T x S
matmuls to the forward's two), halved when causal. XLA's attention stores the B x N x T x S
logits, so it is skipped where one float32 copy of them would pass --xla-limit-gib.
The GPU lowering of ours is Pallas's Triton backend (see pallas_kernels/flash_attention.py).
`bash benchmarks/gpu_check.sh` runs the kernel tests compiled on the GPU and then this.
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])  # this checkout, not an installed copy
from pallas_kernels import flash_attention  # noqa: E402


def _time(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
  parser.add_argument("--head-dims", default="64,128")
  parser.add_argument("--xla-limit-gib", type=float, default=8.0)
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    print(f"no GPU present (backend {jax.default_backend()!r}); this benchmark runs on a GPU")
    return
  impls = {
      "ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
      "cudnn": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
      "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
  }
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, bfloat16, B={args.batch}, N=K={args.heads}")
  print(f"{'H':>4} {'S':>6} {'causal':>6} {'pass':>8} " + " ".join(f"{n + ' TF/s':>11}" for n in impls)
        + "  ours/cudnn  max|ours-cudnn|")
  for head_dim in map(int, args.head_dims.split(",")):
    for seq in map(int, args.seqs.split(",")):
      keys = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(key, (args.batch, seq, args.heads, head_dim), jnp.bfloat16) for key in keys)
      xla_fits = args.batch * args.heads * seq * seq * 4 <= args.xla_limit_gib * 2**30
      for causal in (False, True):
        flops = 4 * args.batch * args.heads * seq * seq * head_dim / (2 if causal else 1)
        try:
          ours = jax.jit(impls["ours"], static_argnums=3)(q, k, v, causal)
          cudnn = jax.jit(impls["cudnn"], static_argnums=3)(q, k, v, causal)
          error = f"{float(jnp.max(jnp.abs(ours.astype(jnp.float32) - cudnn.astype(jnp.float32)))):.2e}"
        except Exception as e:  # noqa: BLE001 (report what failed and go on)
          error = f"failed: {type(e).__name__}"
        for name, multiplier in (("fwd", 1.0), ("fwd+bwd", 3.5)):
          row = {}
          for impl, fn in impls.items():
            if impl == "xla" and not xla_fits:
              row[impl] = float("nan")
              continue
            if name == "fwd":
              step = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, causal))
            else:
              step = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v, causal).astype(jnp.float32).sum(),
                                      argnums=(0, 1, 2)))
            try:
              row[impl] = flops * multiplier / _time(step, q, k, v) / 1e12
            except Exception as e:  # noqa: BLE001 (report what failed and go on)
              row[impl] = float("nan")
              print(f"  {impl} failed at H={head_dim} S={seq}: {type(e).__name__}: {str(e)[:120]}")
          ratio = row["ours"] / row["cudnn"] if row["cudnn"] == row["cudnn"] else float("nan")
          print(f"{head_dim:>4} {seq:>6} {str(causal):>6} {name:>8} "
                + " ".join(f"{row[n]:>11.1f}" for n in impls) + f"  {ratio:>10.2f}  {error if name == 'fwd' else ''}")


if __name__ == "__main__":
  main()
