"""Memory of fine-tuning: full fine-tuning against LoRA, DoRA, VeRA, QLoRA and QA-LoRA (issue 16).

    python benchmarks/peft_memory.py                        # 4.8 min on a 2-core VM at load 8; less when quiet
    python benchmarks/peft_memory.py --skip_measure         # parts 1 and 1b only: about 15 s
    python benchmarks/peft_memory.py --base_dtype=float32 --rank=64 --compute_dtype=bfloat16

Part 1 (shapes only, nothing allocated): for each preset (default llama3.1-8b and llama3.2-1b) and
method, the module is built under `nnx.eval_shape` (model.Transformer, then model.peft.add_adapters
with targets='all' at `--rank`) and split with the trainer's filter (rundir.loading.trainable):
every parameter for full fine-tuning and, with PEFT, only the adapter weights
(model.peft.is_adapter_param); everything else is the frozen base. Columns:
  trainable   parameters the optimizer updates (and % of the model's parameters)
  base        frozen base bytes: float weights in `--base_dtype` (embeddings, LM head, norms, and
              for LoRA/DoRA/VeRA the projections too), plus for QLoRA/QA-LoRA the codes and scales
              exactly as model.quant.QuantizedWeight stores them (their own dtypes and shapes)
  params      trainable parameter bytes (the adapters are float32)
  grads       gradient bytes: the trainable parameters' shapes and dtype
  AdamW       optimizer state bytes, `jax.eval_shape(optimizer.init, params)` on the project's
              optimizer (train.optimizer.make_optimizer with configs.common's defaults: adamw with
              two moments in the parameters' dtype, weight-decay mask, global-norm clipping)
  total       base + params + grads + AdamW: weights plus trainable state, in GiB and GB
  bits/w      bits per quantized base weight (codes and scales over the projection weights'
              elements) as stored (and, were 4-bit codes stored one per byte, with them packed two per byte)
Full fine-tuning trains every parameter in `--full_dtype` (float32: float32 params, float32 grads,
two float32 AdamW moments, 16 bytes per parameter); `--base_dtype` (bfloat16, as QLoRA keeps its
non-quantized weights) is the frozen base's dtype for the PEFT methods.

Part 1b (shapes only): what a train step holds beyond part 1, the residuals the backward pass keeps
from the forward (activations, and anything computed from the weights, such as a dequantized or
cast copy of them), by the config's remat_policy, at `--batch` x `--seq` in `--compute_dtype`.

Part 2 (measured on this CPU): a smaller model (`--measure_preset`, `--measure_layers`,
`--measure_vocab`; default llama3.2-1b cut to 4 layers and a 32000-token vocabulary, whose
embeddings are 21% of its parameters as in the whole llama3.2-1b) runs the project's jitted train
step (train.step.make_train_step with train.losses.next_token_loss and the same optimizer, the
state donated) in one subprocess per `--measure_methods` entry (`method` or `method:remat_policy`).
The module is initialized under jit, as model.sharding.create_sharded does. Per method, as growth of
the process's resident set over its size once jax is imported and its CPU backend started
(/proc/self/status; jax's CPU backend has no memory stats):
  state       part 1's base + params + AdamW for this model (eval_shape): what lives between steps
  live        bytes of the jax arrays alive after a step (the state above plus the batch)
  resident    RSS growth before the measured steps: the state, the compiled program, allocator slack
  grads+res   part 1's grads plus part 1b's residuals for this model: what a step adds (eval_shape)
  XLA temp    the compiled step's temporary buffers (`compiled.memory_analysis()`): XLA's own count of
              what a step allocates besides its arguments and outputs (grads, residuals, scratch)
  step peak   the RSS high-water mark during `--steps` steps (reset after a warm-up step through
              /proc/self/clear_refs), as growth over the baseline
  run peak    ru_maxrss growth over the whole subprocess: init, quantization and compilation too
"""

import argparse
import gc
import json
import os
import resource
import subprocess
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
from model import peft, quant  # noqa: E402
from rundir import loading  # noqa: E402
from train import losses  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import step as step_lib  # noqa: E402

METHODS = ("full", "lora", "dora", "vera", "qlora", "qa_lora")  # full: model.peft's method 'none'
GB, GIB = 1e9, 2.0**30
TARGET_GB = 6.0
POLICIES = ("none", "full")  # remat policies compared in part 1b


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", default="llama3.1-8b,llama3.2-1b")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--base_dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                 help="the frozen base's float weights, for the PEFT methods")
  p.add_argument("--full_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="full fine-tuning's parameter dtype (its grads and AdamW moments follow it)")
  p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="activations' dtype in parts 1b and 2 (the model's default; XLA's CPU bf16 matmuls are slow)")
  p.add_argument("--batch", type=int, default=1, help="B of parts 1b and 2")
  p.add_argument("--seq", type=int, default=128, help="T of parts 1b and 2")
  p.add_argument("--skip_measure", action="store_true", help="parts 1 and 1b only")
  p.add_argument("--measure_methods", default="full,lora,qlora,qlora:full",
                 help="method or method:remat_policy (the default policy is the preset's, 'none')")
  p.add_argument("--measure_preset", default="llama3.2-1b")
  p.add_argument("--measure_layers", type=int, default=4)
  p.add_argument("--measure_vocab", type=int, default=32000, help="0: the preset's")
  p.add_argument("--steps", type=int, default=1, help="measured steps, after one warm-up step")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # in a measuring subprocess: its method
  return p.parse_args(argv)


def trainable_filter(method: str):
  """What the optimizer updates, the trainer's filter: every parameter; with PEFT, the adapters."""
  return loading.trainable(method != "full")


def model_config(preset: str, method: str, args, **overrides) -> model.ModelConfig:
  dtype = args.full_dtype if method == "full" else args.base_dtype
  return model.get_preset(preset, param_dtype=dtype, **overrides)


def make_module(cfg: model.ModelConfig, method: str, rank: int) -> nnx.Module:
  """method: one of METHODS, or 'qlora+head' (QLoRA with config.peft.quant_head: the untied output
  head in NF4 too)."""
  module = model.Transformer(cfg, rngs=nnx.Rngs(0))
  config = dict(method="none" if method == "full" else method, targets="all", rank=rank)
  if method == "qlora+head":
    config.update(method="qlora", quant_head=True)
  return peft.add_adapters(module, config, rngs=nnx.Rngs(1))


def split_abstract(cfg: model.ModelConfig, method: str, rank: int):
  """(module, graphdef, params, rest) of shapes only: nothing is allocated."""
  module = nnx.eval_shape(lambda: make_module(cfg, method, rank))
  return (module, *nnx.split(module, trainable_filter(method), ...))


def make_optimizer():
  return optimizer_lib.make_optimizer(configs_common.optimizer_config(), total_steps=1000)


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def numel(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def row_text(cells, widths) -> str:
  return "".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


# ----------------------------------------------------------------------------------------------
# Part 1: weights and trainable state, from shapes.
# ----------------------------------------------------------------------------------------------
def abstract_row(preset: str, method: str, args, **overrides) -> dict:
  cfg = model_config(preset, method, args, **overrides)
  module, _, params, rest = split_abstract(cfg, method, args.rank)
  optimizer, _ = make_optimizer()
  quant_bytes = nbytes(nnx.state(module, quant.Quantized))
  weights = packed = 0  # the quantized weights' elements; their bytes with 4-bit codes two per byte
  for _, m in nnx.iter_modules(module):
    if isinstance(m, quant.QuantizedWeight):
      codes = m.codes.get_value()
      count = int(np.prod(m.shape)) * (codes.shape[0] if m.stacked else 1)
      bits = 4 if m.scheme in ("int4", "nf4") else 8
      weights += count
      packed += nbytes(nnx.state(m, quant.Quantized)) - nbytes(codes) + count * bits // 8
  row = dict(preset=preset, method=method, model_params=model.param_count(cfg), trainable=numel(params),
             base=nbytes(rest), params=nbytes(params), grads=nbytes(params),
             adam=nbytes(jax.eval_shape(optimizer.init, params)), quant_bytes=quant_bytes)
  row["total"] = row["base"] + row["params"] + row["grads"] + row["adam"]
  if weights:
    row.update(bits=8 * quant_bytes / weights, bits_packed=8 * packed / weights,
               total_packed=row["total"] - quant_bytes + packed)
  return row


def print_abstract(rows: list[dict], args) -> None:
  print(f"Part 1: bytes from jax.eval_shape (nothing allocated); rank {args.rank} on all seven projections; "
        f"PEFT: frozen base {args.base_dtype}, adapters float32; full fine-tuning: {args.full_dtype} params + "
        f"{args.full_dtype} grads + 2 AdamW moments. Weights plus trainable state; activations are not counted.")
  unpacked = any(r.get("total_packed", r["total"]) != r["total"] for r in rows)  # codes one per byte
  header = ("method", "trainable", "%", "base GiB", "params GiB", "grads GiB", "AdamW GiB", "total GiB",
            "total GB", "vs full", "bits/w", "packed")[:12 if unpacked else 11]
  widths = (9, 15, 8, 10, 11, 10, 10, 10, 10, 9, 8, 8)
  for preset in dict.fromkeys(r["preset"] for r in rows):
    group = [r for r in rows if r["preset"] == preset]
    full = next((r for r in group if r["method"] == "full"), None)
    print(f"\n{preset}: {group[0]['model_params']:,} parameters")
    print(row_text(header, widths))
    for r in group:
      bits = ((f"{r['bits']:.3f}", f"{r['bits_packed']:.3f}") if "bits" in r else ("-", "-"))[:2 if unpacked else 1]
      print(row_text((r["method"], f"{r['trainable']:,}", f"{100 * r['trainable'] / r['model_params']:.3f}",
                      *(f"{r[k] / GIB:.3f}" for k in ("base", "params", "grads", "adam", "total")),
                      f"{r['total'] / GB:.3f}", f"{r['total'] / full['total']:.3f}x" if full else "-", *bits), widths))
  print("(%: trainable / all parameters; bits/w: bits of the quantized projections' codes and scales, as stored, per "
        "weight" + ("; packed: the same with two 4-bit codes per byte)" if unpacked else ")"))


# ----------------------------------------------------------------------------------------------
# Part 1b: what the backward pass keeps, from shapes.
# ----------------------------------------------------------------------------------------------
def abstract_batch(batch_size: int, seq: int) -> dict:
  spec = jax.ShapeDtypeStruct((batch_size, seq), jnp.int32)
  return {k: spec for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}


def residual_bytes(cfg: model.ModelConfig, method: str, rank: int, batch_size: int, seq: int) -> int:
  """Bytes of the arrays the backward pass keeps from the forward (the residuals of jax.vjp of the
  next-token loss), other than the inputs themselves (the parameters, the frozen base, the batch):
  activations, and whatever is computed from the weights. As in train.step, the frozen base is
  differentiated too (nnx's layer scan needs it at the parameters' trace level); XLA prunes the
  residuals only its dropped gradient would use, which are activations, small next to weights."""
  _, graphdef, params, rest = split_abstract(cfg, method, rank)

  def residuals(params, rest, batch):
    loss = lambda p, r: losses.next_token_loss(nnx.merge(graphdef, p, r), batch, None)[0]  # noqa: E731
    return jax.vjp(loss, params, rest)[1]  # a pytree whose leaves are the residuals

  closed = jax.make_jaxpr(residuals)(params, rest, abstract_batch(batch_size, seq))
  inputs = set(closed.jaxpr.invars)
  saved = {v for v in closed.jaxpr.outvars if not hasattr(v, "val") and v not in inputs}  # no literals, no inputs
  return sum(int(np.prod(v.aval.shape)) * np.dtype(v.aval.dtype).itemsize for v in saved)


def print_residuals(args) -> dict:
  methods = args.methods.split(",")
  print(f"\nPart 1b: backward residuals in GiB (what a train step keeps for its backward pass beyond part 1's "
        f"total), B={args.batch} T={args.seq}, compute dtype {args.compute_dtype}, by remat_policy "
        f"{' / '.join(POLICIES)}")
  widths = (13, *(max(len(m) + 2, 8) * 2 + 1 for m in methods))
  print(row_text(("preset", *methods), widths))
  out = {}
  for preset in args.presets.split(","):
    cells = []
    for method in methods:
      for policy in POLICIES:
        cfg = model_config(preset, method, args, remat_policy=policy, dtype=args.compute_dtype)
        out[preset, method, policy] = residual_bytes(cfg, method, args.rank, args.batch, args.seq)
      cells.append(" / ".join(f"{out[preset, method, p] / GIB:.3f}" for p in POLICIES))
    print(row_text((preset, *cells), widths))
  return out


def print_goal(rows: list[dict], args) -> None:
  row = next((r for r in rows if r["preset"] == "llama3.1-8b" and r["method"] == "qlora"), None)
  if row is None:
    return
  print(f"\nGoal: QLoRA on llama3.1-8b under {TARGET_GB:g} GB for weights plus trainable state (part 1's total).")
  totals = [("as stored", row["total"])]
  if row["total_packed"] != row["total"]:
    totals.append(("codes packed 2 per byte", row["total_packed"]))
  for label, total in totals:
    gb, gib = total / GB, total / GIB
    verdict = ("met in both units" if gb < TARGET_GB else
               f"NOT met in GB (1e9 bytes); under {TARGET_GB:g} only in GiB (2^30 bytes)" if gib < TARGET_GB else
               "NOT met in either unit")
    print(f"  {label:<24} {gb:6.3f} GB = {gib:6.3f} GiB: {verdict}")
  print(f"  of which, as stored: quantized projections {row['quant_bytes'] / GB:.3f} GB ({row['bits']:.3f} bits per "
        f"weight), float base (embeddings, "
        f"LM head, norms) {(row['base'] - row['quant_bytes']) / GB:.3f} GB, LoRA params + grads + AdamW "
        f"{(row['params'] + row['grads'] + row['adam']) / GB:.3f} GB")
  head = abstract_row("llama3.1-8b", "qlora+head", args)
  print(f"  with the output head in NF4 too (config.peft.quant_head=True): {head['total'] / GB:.3f} GB = "
        f"{head['total'] / GIB:.3f} GiB ({head['bits']:.3f} bits per quantized weight)")
  cfg = model_config("llama3.1-8b", "qlora", args)
  parts = []
  for dtype in ("float32", "bfloat16"):
    for policy in POLICIES:
      cfg_ = cfg.replace(dtype=dtype, remat_policy=policy)
      parts.append(f"{dtype} {policy}: {residual_bytes(cfg_, 'qlora', args.rank, args.batch, args.seq) / GB:.3f} GB")
  print(f"  a train step keeps besides, at B={args.batch} T={args.seq} (compute dtype, remat_policy): " + ", ".join(parts))


# ----------------------------------------------------------------------------------------------
# Part 2: measured on this CPU, one subprocess per method.
# ----------------------------------------------------------------------------------------------
def memory_kib() -> dict[str, int]:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("VmRSS:", "VmHWM:")):
        key, value = line.split(":")
        out[key] = int(value.split()[0])
  return out


def reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def measure_overrides(args, policy: str = "") -> dict:
  overrides = dict(num_layers=args.measure_layers, dtype=args.compute_dtype, max_position_embeddings=args.seq)
  if args.measure_vocab:
    overrides["vocab_size"] = args.measure_vocab
  if policy:
    overrides["remat_policy"] = policy
  return overrides


def parse_spec(spec: str) -> tuple[str, str]:
  method, _, policy = spec.partition(":")
  return method, policy


def child(args) -> None:
  """In the subprocess: builds the model, takes train steps, prints one JSON line."""
  method, policy = parse_spec(args.child)
  jnp.zeros(8).block_until_ready()  # start the backend before the baseline
  gc.collect()
  base_kib = memory_kib()["VmRSS"]
  t0 = time.perf_counter()
  cfg = model_config(args.measure_preset, method, args, **measure_overrides(args, policy))
  _, graphdef, params, rest = split_abstract(cfg, method, args.rank)
  make = lambda: nnx.split(make_module(cfg, method, args.rank), trainable_filter(method), ...)[1:]  # noqa: E731
  params, rest = jax.jit(make)()  # init (and quantize) in one program, as model.sharding.create_sharded
  optimizer, schedule = make_optimizer()
  state = jax.jit(lambda p: step_lib.init_state(p, optimizer, seed=0), donate_argnums=0)(params)
  del params
  setup_s = time.perf_counter() - t0

  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
  ones = jnp.ones((args.batch, args.seq), jnp.int32)
  batch = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, axis=1)), "loss_mask": ones,
           "segment_ids": ones, "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), tokens.shape)}
  t0 = time.perf_counter()
  train_step = jax.jit(step_lib.make_train_step(graphdef, losses.next_token_loss, optimizer, schedule),
                       donate_argnums=0)
  compiled = train_step.lower(state, rest, batch).compile()
  compile_s = time.perf_counter() - t0
  stats = compiled.memory_analysis()  # XLA's buffer assignment for the step (None if unsupported)
  xla_temp = getattr(stats, "temp_size_in_bytes", None)
  state, metrics = compiled(state, rest, batch)  # warm-up: first-call allocations
  jax.block_until_ready((state, metrics))
  gc.collect()
  live = sum(x.nbytes for x in jax.live_arrays())
  before_kib = memory_kib()["VmRSS"]
  peak_reset = reset_peak()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, rest, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_peak_kib = memory_kib()["VmHWM"]
  run_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  print(json.dumps(dict(
      spec=args.child, params=model.param_count(cfg), trainable=numel(state["params"]), live=live,
      resident=(before_kib - base_kib) * 1024, step_peak=(step_peak_kib - base_kib) * 1024 if peak_reset else None,
      run_peak=(run_peak_kib - base_kib) * 1024, baseline=base_kib * 1024, xla_temp=xla_temp, setup_s=setup_s,
      compile_s=compile_s,
      step_s=min(times), loss=float(metrics["loss"]),
  )))


def measure(args, argv) -> list[dict]:
  results = []
  argv = [a for a in argv if not a.startswith("--child")]
  for spec in args.measure_methods.split(","):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--child={spec}"],
                          capture_output=True, text=True)
    if proc.returncode:
      sys.stderr.write(proc.stderr)
      raise RuntimeError(f"the {spec} subprocess failed (exit {proc.returncode})")
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return results


def print_measured(results: list[dict], args) -> None:
  overrides = measure_overrides(args)
  print(f"\nPart 2: measured on this CPU ({os.cpu_count()} cores, jax {jax.__version__}): {args.measure_preset} with "
        f"{', '.join(f'{k}={v}' for k, v in overrides.items())}: {results[0]['params']:,} parameters; "
        f"B={args.batch} T={args.seq}; the jitted train step, one subprocess each; RSS growth over the process "
        f"after starting jax ({results[0]['baseline'] / GIB:.2f} GiB)")
  header = ("method", "trainable", "state GiB", "live GiB", "resident GiB", "grads+res GiB", "XLA temp GiB",
            "step peak GiB", "run peak GiB", "step s")
  widths = (11, 13, 11, 10, 14, 15, 14, 15, 14, 8)
  print(row_text(header, widths))

  def gib(value):
    return "-" if value is None else f"{value / GIB:.3f}"

  for r in results:
    method, policy = parse_spec(r["spec"])
    row = abstract_row(args.measure_preset, method, args, **measure_overrides(args, policy))
    cfg = model_config(args.measure_preset, method, args, **measure_overrides(args, policy))
    r["state"] = row["total"] - row["grads"]
    r["step_adds"] = row["grads"] + residual_bytes(cfg, method, args.rank, args.batch, args.seq)
    print(row_text((r["spec"], f"{r['trainable']:,}", gib(r["state"]), gib(r["live"]), gib(r["resident"]),
                    gib(r["step_adds"]), gib(r["xla_temp"]), gib(r["step_peak"]), gib(r["run_peak"]),
                    f"{r['step_s']:.2f}"), widths))
  full = next((r for r in results if r["spec"] == "full"), None)
  if full:
    for key, label in (("state", "state (eval_shape)"), ("live", "live"), ("resident", "resident"),
                       ("xla_temp", "XLA temp"), ("step_peak", "step peak"), ("run_peak", "run peak")):
      if all(r[key] for r in results):
        print(f"ratio to full fine-tuning, {label}: " + ", ".join(
            f"{r['spec']} {r[key] / full[key]:.3f}x" for r in results if r is not full))
  print("(a method:policy row sets the config's remat_policy, the others keep the preset's 'none'; compile s: "
        + ", ".join(f"{r['spec']} {r['compile_s']:.1f}" for r in results) + ")")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.child:
    child(args)
    return
  start = time.perf_counter()
  rows = [abstract_row(preset, method, args) for preset in args.presets.split(",") for method in args.methods.split(",")]
  print_abstract(rows, args)
  print_residuals(args)
  print_goal(rows, args)
  if not args.skip_measure:
    print_measured(measure(args, argv), args)
  print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
