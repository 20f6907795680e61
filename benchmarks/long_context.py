"""Train-step memory and time against sequence length T for the attention backends, with growth exponents.

    python benchmarks/long_context.py                          # T = 512 .. 32k, memory; time up to 4k
    python benchmarks/long_context.py --lengths=512,1024,2048 --time_max=2048

For each T, a tiny Llama (L=2, D=256, N=4, K=2, H=64, V=4096) and the gradient of its loss on one
row of T tokens:
  memory  the compiled step's bytes per device from `compiled.memory_analysis()`: arguments (the
          parameters), outputs (their gradients) and temporaries (activations and the rest):
          xla and pallas (our flash kernel) compiled for one TPU v5e chip with libtpu (bfloat16; a
          compiler figure, nothing runs: the CPU cannot run a Mosaic kernel except interpreted),
          and xla compiled for this CPU (float32).
  time    the CPU step (xla, float32), median of --repeats after a warm-up, for T <= --time_max.
Each column ends with its growth exponent: the least-squares slope of log(value) against log(T)
over the three longest lengths measured (2 for memory or time quadratic in T, 1 for linear; at
short T the parameters' constant bytes flatten it).
  ring    the same step with T sharded over --ring fake CPU devices (the mesh's `sequence` axis):
          each layer runs ring attention; bytes per device, compiled for this CPU (float32), with
          each chunk pair in jnp (`xla`, attention_impl='xla') and through the flash kernel
          (`flash`, attention_impl='pallas': Pallas interpret mode on CPU), as --ring_blocks says.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768")
  p.add_argument("--time_max", type=int, default=4096, help="time the CPU step up to this T")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tpu", type=int, default=1, choices=(0, 1), help="compile for a TPU v5e chip (needs libtpu)")
  p.add_argument("--ring", type=int, default=8, help="fake CPU devices on the sequence axis for the ring columns")
  p.add_argument("--ring_blocks", default="xla,flash", help="ring columns: pairs in jnp (xla), in the kernel (flash)")
  return p.parse_args(argv)


def step_fn(config):
  """(params, tokens [1, T + 1]) -> gradients of the next-token loss: the train step's work."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  import model  # noqa: PLC0415
  from train import losses  # noqa: PLC0415

  graphdef, state = nnx.split(nnx.eval_shape(lambda: model.Transformer(config, rngs=nnx.Rngs(0))))

  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    nll, _ = losses.token_cross_entropy(logits, tokens[:, 1:])
    return nll.mean()

  return jax.grad(loss), state


def compiled_step(config, length, device):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  grad, state = step_fn(config)
  placed = jax.sharding.SingleDeviceSharding(device)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), state)
  tokens = jax.ShapeDtypeStruct((1, length + 1), jnp.int32, sharding=placed)
  return jax.jit(grad).lower(params, tokens).compile()


def footprint(compiled) -> int:
  """Bytes per device: arguments + outputs + temporaries, less what the outputs alias (XLA:CPU
  reports no peak of its own; on a TPU this bounds the reported peak from above)."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def compiled_ring_step(config, length, mesh):
  """The step with the rows' T sharded over the mesh's `sequence` axis: each layer runs ring attention."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from model import sharding  # noqa: PLC0415

  grad, state = step_fn(config)
  shardings = sharding.state_shardings(state, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tokens = jax.ShapeDtypeStruct((1, length + 1), jnp.int32, sharding=replicated)
  with sharding.axis_rules(mesh, sharding.DEFAULT_RULES):
    return jax.jit(grad).lower(params, tokens).compile()


def tpu_bytes(config, length, chip) -> float:
  """The compiled step's bytes on the chip (footprint); past its HBM, the temporaries the compiler said it
  needed (negated, so the table can mark them: they exceed the chip)."""
  import jax  # noqa: PLC0415

  from train.aot import report  # noqa: PLC0415

  try:
    return footprint(compiled_step(config, length, chip))
  except jax.errors.JaxRuntimeError as e:
    needed = report.hbm_oom_temporaries(str(e))
    if needed is None:
      raise
    return -float(needed)


def exponent(lengths, values) -> float:
  pairs = [(t, abs(v)) for t, v in zip(lengths, values) if v][-3:]
  if len(pairs) < 2:
    return float("nan")
  x, y = np.log([t for t, _ in pairs]), np.log([v for _, v in pairs])
  return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
  args = parse_args(argv)
  lengths = [int(t) for t in args.lengths.split(",")]
  # The ring's devices: fake CPU devices, set before jax starts (the timed step still uses one).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.ring}")
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import model  # noqa: PLC0415

  base = model.get_preset("tiny", num_layers=2, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
                          mlp_dim=768, vocab_size=4096, scan_layers=True)
  columns = {}
  if args.tpu:
    from train.aot import topology  # noqa: PLC0415

    chip = topology.devices(topology.parse("v5e-1"))[0]
    for impl in ("xla", "pallas"):
      config = base.replace(attention_impl=impl, dtype="bfloat16", param_dtype="bfloat16")
      columns[f"v5e {impl} MiB"] = [tpu_bytes(config, t, chip) / 2**20 for t in lengths]
      print(f"compiled for v5e: {impl}", flush=True)
  cpu = jax.devices("cpu")[0]
  config = base.replace(attention_impl="xla", dtype="float32", param_dtype="float32")
  columns["cpu xla MiB"] = [footprint(compiled_step(config, t, cpu)) / 2**20 for t in lengths]
  from model import sharding  # noqa: PLC0415

  ring_mesh = sharding.make_mesh({"sequence": args.ring}, jax.devices("cpu")[:args.ring])
  # T + 1 tokens in, T positions attended: the ring needs T divisible by 2P (the zig-zag).
  for blocks in args.ring_blocks.split(","):
    impl = {"xla": "xla", "flash": "pallas"}[blocks]
    name = f"cpu ring P={args.ring} MiB" if blocks == "xla" else f"ring+{blocks} P={args.ring} MiB"
    columns[name] = [footprint(compiled_ring_step(config.replace(attention_impl=impl), t, ring_mesh)) / 2**20
                     for t in lengths]
    print(f"compiled the ring ({blocks} blocks)", flush=True)
  grad, _ = step_fn(config)
  from flax import nnx  # noqa: PLC0415

  state = nnx.state(model.Transformer(config, rngs=nnx.Rngs(0)))
  step = jax.jit(grad)
  times = []
  for t in lengths:
    if t > args.time_max:
      times.append(None)
      continue
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, t + 1)), jnp.int32)
    jax.block_until_ready(step(state, tokens))
    runs = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(state, tokens))
      runs.append(time.perf_counter() - start)
    times.append(statistics.median(runs))
    print(f"timed T={t}: {times[-1]:.3f} s", flush=True)
  columns["cpu xla step s"] = times

  names = list(columns)
  print(f"\njax {jax.__version__}; model: L=2 D=256 N=4 K=2 H=64 V=4096, one row; memory = compiled arguments + outputs + temporaries")
  print(f"{'T':>7} " + " ".join(f"{n:>16}" for n in names))
  for i, t in enumerate(lengths):
    cells = [columns[n][i] for n in names]
    print(f"{t:>7} " + " ".join(f"{'-':>16}" if c is None else f"{-c:>15.1f}*" if c < 0 else f"{c:>16.3f}"
                                for c in cells))
  print(f"{'exp':>7} " + " ".join(f"{exponent(lengths, columns[n]):>16.2f}" for n in names))
  print("*: over the chip's HBM; the temporaries the compiler said the step needs")


if __name__ == "__main__":
  main()
