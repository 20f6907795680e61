"""Weight-only quantization (model/quant.py): the logit error against float32, the bytes of the
projection weights, and the forward time on this CPU.

    python benchmarks/quant_logits.py                      # the tiny HF fixture and llama3.2-1b (L=2)
    python benchmarks/quant_logits.py --run=runs/quickstart  # a trained run instead, when there is one

Models: a training run's workdir given by --run (default runs/quickstart) when it exists; otherwise
the tiny Hugging Face fixture tests/fixtures/hf/llama (transformers' random init, D=64, L=2) and a
random-init `llama3.2-1b` cut to --layers=2 layers (D=2048, F=8192, V=128256; seed 0). For a run the
inputs are --batch sequences of --seq tokens sampled from the float model itself (temperature 1,
from bos), so the error is measured on text the model finds likely; for a random-init model they
are uniform random token ids.

Each scheme quantizes the seven projection weights (q/k/v/o, gate/up/down) of a copy of the float
model with `model.quant.quantize`; embeddings, the LM head and norms stay float32. Against the
float32 logits over all B x T positions:
  max|d|, mean|d|  the largest and the mean absolute logit difference (and mean|d| / std of the
                   float32 logits, to compare models);
  KL               mean over positions of KL(p_float32 || p_quantized) of the next-token
                   distributions, in nats;
  top-1            the fraction of positions whose argmax token is the same.
Bytes: of the projection weights, float32 as loaded and quantized as stored (codes, 4-bit ones two
per byte, and scales; for nf4 with double quantization the 8-bit absmax codes, their steps and means).
Time: a jitted forward of the [B, T] tokens and of one token per row ([B, 1], the shape of a decode
step, no cache); float32 and quantized calls alternate, --repeats of each after one warm-up; the
ratios are quantized / float32 of the medians and, in parentheses, of the fastest calls (on a busy
machine the fastest call is the least disturbed one). The same for one projection alone (x [B, D] and
[B * T, D] times a 2048 x 8192 weight): in the whole model the float LM head and embedding weigh in
as well (llama3.2-1b: 262 M of its weights against 61 M per layer in the projections).
XLA:CPU dequantizes each weight to float32 in memory before the matmul (no fusion), so on CPU a
quantized forward is slower, not faster: the point of weight-only quantization is memory here, and
speed only where the chip multiplies int8 (TPU/GPU), which this does not measure.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

# Benchmark this checkout, not whatever copy of the package is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import infer  # noqa: E402
import model as model_lib  # noqa: E402
import rundir  # noqa: E402
from infer import cli  # noqa: E402
from model import hf, quant  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf", "llama")
# (label, scheme, block_size, double_quant)
VARIANTS = [
    ("int8", "int8", 64, False),
    ("int4 b64", "int4", 64, False),
    ("int4 b32", "int4", 32, False),
    ("nf4 b64", "nf4", 64, False),
    ("nf4 b64 dq", "nf4", 64, True),
]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", default="runs/quickstart", help="a training run's workdir; used when it exists")
  p.add_argument("--layers", type=int, default=2, help="layers of the random-init llama3.2-1b")
  p.add_argument("--batch", type=int, default=2, help="sequences (B)")
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence (T)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per forward time (median and min)")
  return p.parse_args(argv)


def forward_fn(module):
  """A jitted forward of `module` (the graph closed over: only the arrays are arguments, so XLA
  cannot fold the dequantization into constants), and its arrays."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens)), state


def timed_pair(a, b, tokens, repeats):
  """Median and fastest seconds of calls of a = (fn, state) and b, alternating call by call after one
  warm-up (compile) each, so a busy machine slows both alike."""
  for fn, state in (a, b):
    fn(state, tokens).block_until_ready()
  times = ([], [])
  for _ in range(repeats):
    for (fn, state), out in zip((a, b), times):
      start = time.perf_counter()
      fn(state, tokens).block_until_ready()
      out.append(time.perf_counter() - start)
  return [(statistics.median(t), min(t)) for t in times]


def errors(exact, approx):
  exact, approx = exact.astype(np.float64), approx.astype(np.float64)
  diff = np.abs(approx - exact)
  p, q = jax.nn.log_softmax(exact, axis=-1), jax.nn.log_softmax(approx, axis=-1)
  kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))
  top1 = float(np.mean(exact.argmax(-1) == approx.argmax(-1)))
  return dict(max=float(diff.max()), mean=float(diff.mean()), rel=float(diff.mean() / exact.std()), kl=kl, top1=top1)


def fmt_bytes(n: float) -> str:
  return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def measure(name, module, tokens, repeats):
  """Prints the table of one model."""
  config = module.config
  float_bytes = cli.projection_bytes(module)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  print(f"\n{name}: L={config.num_layers} D={config.embed_dim} N={config.num_heads} K={config.num_kv_heads} "
        f"H={config.head_dim} F={config.mlp_dim} V={config.vocab_size}, {n_params:,} params, projections "
        f"{float_bytes // 4:,} weights ({fmt_bytes(float_bytes)} float32); tokens [B={tokens.shape[0]}, T={tokens.shape[1]}]")
  fn, state = forward_fn(module)
  exact = np.asarray(fn(state, tokens))
  one = tokens[:, :1]
  print(f"float32 logits: std {exact.std():.3f}")
  header = (f"{'scheme':<11} {'max|d|':>8} {'mean|d|':>8} {'/std':>6} {'KL nats':>9} {'top-1':>6} "
            f"{'bytes':>11} {'smaller':>7} {'t ratio':>7} {'(min)':>6} {'t1 ratio':>8} {'(min)':>6}  float32 ms: t, t1")
  print(header)
  for label, scheme, block_size, double_quant in VARIANTS:
    start = time.perf_counter()
    quantized = quant.quantize(module, scheme, block_size=block_size, double_quant=double_quant)
    quantize_s = time.perf_counter() - start
    qfn, qstate = forward_fn(quantized)
    e = errors(exact, np.asarray(qfn(qstate, tokens)))
    stored = cli.projection_bytes(quantized)
    (t_float, min_float), (t_quant, min_quant) = timed_pair((fn, state), (qfn, qstate), tokens, repeats)
    (t_float_1, min_float_1), (t_quant_1, min_quant_1) = timed_pair((fn, state), (qfn, qstate), one, repeats)
    print(f"{label:<11} {e['max']:>8.4f} {e['mean']:>8.5f} {e['rel']:>6.4f} {e['kl']:>9.2e} {e['top1']:>6.3f} "
          f"{fmt_bytes(stored):>11} {float_bytes / stored:>6.2f}x {t_quant / t_float:>6.2f}x {min_quant / min_float:>5.2f}x "
          f"{t_quant_1 / t_float_1:>7.2f}x {min_quant_1 / min_float_1:>5.2f}x  {t_float * 1e3:.1f}, {t_float_1 * 1e3:.1f}"
          f"  (quantize {quantize_s:.1f} s)")
    del quantized, qfn, qstate


def matmul(rows_list, repeats, d=2048, f=8192):
  """One projection alone: x [rows, D] times a D x F weight (llama3.2-1b's gate/up shape), float32
  against each scheme's QuantizedWeight (dequantize, then the float32 matmul, as the model does)."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(d, f)) * 0.02, jnp.float32)
  float_fn = jax.jit(lambda w, x: jnp.einsum("BTD,DF->BTF", x, w))
  print(f"\none projection, D={d} -> F={f} ({d * f:,} weights), quantized / float32 time of the medians (and of the "
        "fastest calls), float32 ms in brackets:")
  for rows in rows_list:
    x = jnp.asarray(rng.normal(size=(1, rows, d)), jnp.float32)
    cells = []
    for label, scheme, block_size, double_quant in VARIANTS:
      weight = quant.QuantizedWeight(w, None, in_rank=1, stacked=False, scheme=scheme, block_size=block_size,
                                     double_quant=double_quant)
      graphdef, state = nnx.split(weight)
      quant_fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)("BTD,DF->BTF", x, jnp.float32))
      (t_float, min_float), (t_quant, min_quant) = timed_pair((float_fn, w), (quant_fn, state), x, repeats)
      cells.append(f"{label} {t_quant / t_float:.2f}x ({min_quant / min_float:.2f}x) [{t_float * 1e3:.1f}]")
    print(f"  x [{rows}, {d}]: " + "; ".join(cells))


def main(argv=None):
  args = parse_args(argv)
  begin = time.perf_counter()
  print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.machine()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device); float32; "
        f"{args.repeats} timed calls after 1 warm-up")
  print("columns: max|d|, mean|d| logit error vs float32 (/std: mean|d| over the std of the float32 logits); KL(float32 || "
        "quantized) per position; top-1 agreement; bytes of the projection weights quantized, and float32 bytes / "
        "them; t ratio / t1 ratio: quantized / float32 forward time, [B, T] and [B, 1], of the medians "
        "(and of the fastest calls); float32 ms: the float32 medians")
  rng = np.random.default_rng(0)
  if os.path.isdir(args.run):
    module, tokenizer = rundir.load(args.run)
    bos = tokenizer.bos_id if tokenizer.bos_id >= 0 else 0
    sampled = infer.generate(module, [[bos]] * args.batch, max_new_tokens=args.seq - 1,
                             sampling=infer.Sampling(temperature=1.0), rng=0)
    tokens = jnp.asarray([[bos, *row] for row in sampled.tokens], jnp.int32)
    measure(f"run {args.run} (tokens sampled from it)", module, tokens, args.repeats)
  else:
    print(f"(no run at {args.run}: the HF fixture and a random-init llama3.2-1b)")
    module = hf.from_pretrained(FIXTURE)
    tokens = jnp.asarray(rng.integers(0, module.config.vocab_size, (args.batch, args.seq)), jnp.int32)
    measure(f"HF fixture {os.path.relpath(FIXTURE)} (random tokens)", module, tokens, args.repeats)
    config = model_lib.get_preset("llama3.2-1b").replace(num_layers=args.layers)
    module = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    measure(f"llama3.2-1b, random init, {args.layers} layers (random tokens)", module, tokens, args.repeats)
  matmul(sorted({args.batch, args.batch * args.seq}), args.repeats)
  print(f"\ntotal {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
  main()
