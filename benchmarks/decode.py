"""Decode throughput: `infer.generate` against Hugging Face `generate()` (PyTorch), and speculative decoding.

    python benchmarks/decode.py                           # the default: 4-7 minutes on 2 CPU cores
    python benchmarks/decode.py --layers=4 --batches=1 --repeats=2

Part 1. Both sides greedily decode N new tokens after the same [B, T] random prompts, on the CPU, in
float32, from identical weights: a seeded `transformers.LlamaForCausalLM` is saved with
`save_pretrained` (safetensors) and ours is `model.hf.from_pretrained` of that directory. Defaults:
L=8, D=512, N=8, K=4, H=64, F=1408, V=32000, T=128 prompt tokens, 64 new tokens, B in {1, 8}.
HF runs `generate(do_sample=False, use_cache=True, min_new_tokens=max_new_tokens)` with no EOS token,
so neither side stops early; ours runs `infer.generate` with the default (greedy) `infer.Sampling`.

  prefill: the time to the first token, i.e. a whole generate call with max_new_tokens=1
           (prompt pass + first token + the call's fixed overhead); tokens/s = B * T / that time.
  decode:  tokens/s = B * (N - 1) / (time(N tokens) - time(1 token)).
  bound:   the weight-streaming bound of a decode step: the bytes it must read (every weight but
           the input embedding table, and each row's keys and values at the mean context) over
           the read bandwidth measured at the start of the run (a jitted jnp.sum and numpy's sum
           over 512 MiB; the faster); each side's ms/step is printed over it.

Each time is the median of --repeats timed calls after one untimed warm-up call of the exact same
shapes (ours compiles there: its compile time is the warm-up minus the median, printed apart).
The two sides alternate call by call, so a noisy machine slows both alike. Random-init models
have near-ties in their logits, so greedy agreement is reported as the fraction of matching
tokens (and of rows that match entirely) rather than asserted; the first disagreement in a row
makes the rest of that row differ.

Part 2. `infer.speculative_generate(target, draft)` against plain `infer.generate(target)` with the
same N, greedy, at each batch size. The draft is a truncated copy of the part-1 target: its first
L // 4 layers plus its embedding, final norm and LM head, copied in the HF state dict and loaded
the same way. Nothing is trained, and in a randomly initialized Llama every layer moves the
residual stream more than the embedding does, so the truncated copy almost never picks the
target's argmax (acceptance ~0): that row measures the pure overhead of speculation. For a
meaningful acceptance rate a second target is built from the first by multiplying the output
projections (o_proj, down_proj) of its layers L // 4 .. L - 1 by --deep_scale, so the deep layers
only nudge what the shared first layers decide, as in self-speculative / early-exit drafting
(0.1 on the default config: the draft's next token is the target's about half the time when
both read the same context, so about a quarter of the proposals are accepted, since a round's
proposals count only up to the first rejection). It has the same shapes and costs the same
per call; its plain-decoding time is the baseline for both rows. With V=32000 and D=512 the
draft shares the target's 16M-weight LM head, which every draft step reads in full, so on a
memory-bound CPU a draft step costs a large fraction (~40%) of a target step.

torch.set_num_threads(os.cpu_count()) is set for PyTorch; XLA's CPU client uses every core by
default. torch and transformers are not dependencies of ingredients; this script pip-installs
them for itself when they are missing.
"""

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Benchmark this checkout, not whatever copy of the package is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import infer  # noqa: E402
from model import hf as model_hf  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=8)  # L
  p.add_argument("--width", type=int, default=512)  # D
  p.add_argument("--heads", type=int, default=8)  # N
  p.add_argument("--kv_heads", type=int, default=4)  # K
  p.add_argument("--head_dim", type=int, default=64)  # H
  p.add_argument("--mlp", type=int, default=1408)  # F
  p.add_argument("--vocab", type=int, default=32000)  # V
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (T)")
  p.add_argument("--new", type=int, default=64, help="new tokens per row (N)")
  p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
  p.add_argument("--draft_layers", type=int, default=0, help="draft depth; 0 means max(1, L // 4)")
  p.add_argument("--num_draft_tokens", type=int, default=4)
  p.add_argument("--deep_scale", type=float, default=0.1,
                 help="o_proj/down_proj scale of the second target's layers past the draft's")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def ensure_torch():
  """Imports torch and transformers, installing them first if this environment lacks them."""
  missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
  if missing:
    print(f"{', '.join(missing)} not found; installing torch==2.13.0 and transformers for this benchmark only "
          "(they are not dependencies of ingredients).", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "torch==2.13.0", "transformers"])
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  return torch, transformers


# ----------------------------------------------------------------------------------------------
# The same weights on both sides.
# ----------------------------------------------------------------------------------------------
def make_models(args, workdir):
  """HF target, our target and our draft, all from one seeded HF model saved as safetensors."""
  torch, transformers = ensure_torch()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(args.seed)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
      max_position_embeddings=max(2048, args.prompt + args.new + 64), rms_norm_eps=1e-5, rope_theta=10000.0,
      tie_word_embeddings=False, attn_implementation="sdpa",
  )
  theirs = transformers.LlamaForCausalLM(config).float().eval()
  target_dir, draft_dir = os.path.join(workdir, "target"), os.path.join(workdir, "draft")
  theirs.save_pretrained(target_dir, safe_serialization=True)

  # The draft: the target's first draft_layers blocks with its embedding, final norm and LM head.
  draft_layers = args.draft_layers or max(1, args.layers // 4)
  draft_config = transformers.LlamaConfig(**{**config.to_dict(), "num_hidden_layers": draft_layers})
  draft = transformers.LlamaForCausalLM(draft_config).float().eval()
  kept = {
      name: value for name, value in theirs.state_dict().items()
      if not name.startswith("model.layers.") or int(name.split(".")[2]) < draft_layers
  }
  draft.load_state_dict(kept, strict=True)
  draft.save_pretrained(draft_dir, safe_serialization=True)
  del draft

  # The second target: the same model with its deep layers' residual contributions scaled down.
  def deep_projection(name):  # model.layers.{i}.self_attn.o_proj.weight, model.layers.{i}.mlp.down_proj.weight
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) >= draft_layers and parts[4] in ("o_proj", "down_proj")

  scaled = transformers.LlamaForCausalLM(config).float().eval()
  scaled.load_state_dict(
      {name: value * args.deep_scale if deep_projection(name) else value
       for name, value in theirs.state_dict().items()},
      strict=True,
  )
  scaled_dir = os.path.join(workdir, "scaled")
  scaled.save_pretrained(scaled_dir, safe_serialization=True)
  del scaled

  ours = model_hf.from_pretrained(target_dir)
  our_scaled = model_hf.from_pretrained(scaled_dir)
  our_draft = model_hf.from_pretrained(draft_dir)
  return torch, transformers, theirs, ours, our_scaled, our_draft, draft_layers


def count(module) -> int:
  from flax import nnx  # noqa: PLC0415

  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------
def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def measure(calls: dict, repeats: int):
  """calls: name -> zero-arg callable. One warm-up each, then `repeats` rounds with the order alternating.

  Returns name -> (median s, all timed s, warm-up s, the last output).
  """
  warm, last, times = {}, {}, {name: [] for name in calls}
  for name, fn in calls.items():
    warm[name], last[name] = timed(fn)
  names = list(calls)
  for i in range(repeats):
    for name in (names if i % 2 == 0 else names[::-1]):
      seconds, last[name] = timed(calls[name])
      times[name].append(seconds)
  return {name: (statistics.median(times[name]), times[name], warm[name], last[name]) for name in calls}


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> dict[str, float]:
  """Bytes/s at which this machine streams a buffer far larger than its caches: a jitted jnp.sum
  (XLA's threads) and numpy's sum (one core), each the fastest of `repeats` after a warm-up."""
  import jax.numpy as jnp  # noqa: PLC0415

  host = np.ones(nbytes // 4, np.float32)
  device = jnp.asarray(host)
  total = jax.jit(jnp.sum)
  rates = {}
  for name, fn in (("jax", lambda: total(device).block_until_ready()), ("numpy", lambda: host.sum())):
    fn()
    rates[name] = nbytes / min(timed(fn)[0] for _ in range(repeats))
  return rates


def bytes_per_step(module, batch: int, context: float) -> tuple[int, int]:
  """(weight bytes, KV-cache bytes) a decode step must read at least: every parameter but the input
  embedding table (a step gathers B of its rows; a tied table is read whole as the LM head), and
  each row's keys and values for `context` positions."""
  from flax import nnx  # noqa: PLC0415

  c = module.config
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  if not c.tie_embeddings:
    weights -= module.embedding[...].size * module.embedding[...].dtype.itemsize
  kv = 2 * c.num_layers * batch * context * c.num_kv_heads * c.head_dim * np.dtype(c.compute_dtype).itemsize
  return weights, int(kv)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """(fraction of equal tokens, fraction of fully equal rows, mean length of the common prefix) of [B, N] arrays."""
  equal = a == b
  prefix = np.where(equal.all(axis=1), a.shape[1], np.argmin(equal, axis=1))
  return float(equal.mean()), float(equal.all(axis=1).mean()), float(prefix.mean())


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------
def main(argv=None):
  args = parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  if args.new < 2:
    raise ValueError(f"--new={args.new} must be at least 2 (decode time is time(N) - time(1))")
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    torch, transformers, theirs, ours, scaled, draft, draft_layers = make_models(args, workdir)
  rng = np.random.default_rng(args.seed)
  n, t = args.new, args.prompt

  print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
        f"torch {torch.__version__} (set_num_threads({os.cpu_count()}), {torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; float32 on both sides", flush=True)
  print(f"target: L={args.layers} D={args.width} N={args.heads} K={args.kv_heads} H={args.head_dim} F={args.mlp} "
        f"V={args.vocab}, {count(ours):,} params (HF {sum(p.numel() for p in theirs.parameters()):,}); "
        f"draft: L={draft_layers}, {count(draft):,} params; T={t} prompt tokens, {n} new tokens, "
        f"median of {args.repeats} after 1 warm-up", flush=True)

  bandwidth = read_bandwidth()
  best_rate = max(bandwidth.values())
  print("read bandwidth: " + ", ".join(f"{name} {rate / 1e9:.1f} GB/s" for name, rate in bandwidth.items())
        + f"; the bound below uses the faster, {best_rate / 1e9:.1f} GB/s", flush=True)

  decode_rows, spec_rows, notes = [], [], []
  for b in batches:
    prompts = rng.integers(0, args.vocab, (b, t)).astype(np.int64)  # [B, T]
    prompt_list = prompts.tolist()
    input_ids = torch.from_numpy(prompts)
    attention_mask = torch.ones_like(input_ids)

    def ours_call(new, target=ours, prompt_list=prompt_list):
      return lambda: np.asarray(infer.generate(target, prompt_list, max_new_tokens=new).tokens)  # [B, new]

    def hf_call(new, input_ids=input_ids, attention_mask=attention_mask):
      def run():
        with torch.inference_mode():
          out = theirs.generate(
              input_ids, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              use_cache=True, eos_token_id=None, pad_token_id=0,
          )
        return out[:, t:].numpy()  # [B, new]

      return run

    # ---- Part 1: ours vs HF, prefill (1 token) and N tokens.
    r = measure({"ours_1": ours_call(1), "hf_1": hf_call(1), "ours_n": ours_call(n), "hf_n": hf_call(n)},
                args.repeats)
    ours_tokens, hf_tokens = r["ours_n"][3], r["hf_n"][3]
    if ours_tokens.shape != (b, n) or hf_tokens.shape != (b, n):
      raise RuntimeError(f"expected [B={b}, N={n}] tokens, got ours {ours_tokens.shape}, HF {hf_tokens.shape}")
    match = agreement(ours_tokens, hf_tokens)
    for side in ("ours", "hf"):
      t1, tn = r[f"{side}_1"][0], r[f"{side}_n"][0]
      decode_s = max(tn - t1, 1e-9)  # noise can make a tiny model's difference <= 0
      # From the fastest calls too: on a shared machine the least-disturbed call is the steadier number.
      min_decode_s = max(min(r[f"{side}_n"][1]) - min(r[f"{side}_1"][1]), 1e-9)
      decode_rows.append(dict(
          b=b, side=side, t1=t1, tn=tn, prefill_tps=b * t / t1, decode_tps=b * (n - 1) / decode_s,
          step_ms=1e3 * decode_s / (n - 1), min_prefill_tps=b * t / min(r[f"{side}_1"][1]),
          min_decode_tps=b * (n - 1) / min_decode_s, match=match,
      ))
    notes.append(f"B={b} ours compile (warm-up minus median): 1 token {r['ours_1'][2] - r['ours_1'][0]:.1f} s, "
                 f"{n} tokens {r['ours_n'][2] - r['ours_n'][0]:.1f} s")
    for name, (_, times, _, _) in r.items():
      notes.append(f"B={b} {name} times (s): {', '.join(f'{x:.3f}' for x in times)}")
    print(f"B={b}: part 1 done ({time.perf_counter() - started:.0f} s)", flush=True)

    # ---- Part 2: speculative vs plain (ours, greedy, same N).
    def spec_call(target, prompt_list=prompt_list):
      return lambda: infer.speculative_generate(target, draft, prompt_list, max_new_tokens=n,
                                                num_draft_tokens=args.num_draft_tokens)

    # `plain` decodes the scaled target: the same shapes and cost as the part-1 target.
    r2 = measure({"plain": ours_call(n, scaled), "spec_truncated": spec_call(ours), "spec_scaled": spec_call(scaled)},
                 args.repeats)
    for name, plain_tokens in (("spec_truncated", ours_tokens), ("spec_scaled", r2["plain"][3])):
      spec = r2[name][3]
      spec_rows.append(dict(
          b=b, target="as is" if name == "spec_truncated" else f"deep x{args.deep_scale:g}", plain=r2["plain"][0],
          spec=r2[name][0], stats=spec.stats, match=agreement(np.asarray(spec.tokens), plain_tokens),
      ))
      notes.append(f"B={b} {name} compile (warm-up minus median): {r2[name][2] - r2[name][0]:.1f} s")
    for name, (_, times, _, _) in r2.items():
      notes.append(f"B={b} {name} times (s): {', '.join(f'{x:.3f}' for x in times)}")
    print(f"B={b}: part 2 done ({time.perf_counter() - started:.0f} s)", flush=True)

  # ---- The table.
  print(f"\nPart 1: greedy generate, T={t} prompt + {n} new tokens (ratio = ours / HF; higher is better for ours)")
  print("(medians; the last two columns use each side's fastest call instead)")
  print(f"{'B':>3} {'side':<6}{'t(1) s':>9}{'t(N) s':>9}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}"
        f"{'min: prefill':>14}{'decode':>9}")
  for row in decode_rows:
    print(f"{row['b']:>3} {row['side']:<6}{row['t1']:>9.3f}{row['tn']:>9.3f}{row['prefill_tps']:>15,.0f}"
          f"{row['decode_tps']:>14,.1f}{row['step_ms']:>9.1f}{row['min_prefill_tps']:>14,.0f}"
          f"{row['min_decode_tps']:>9,.1f}")
    if row["side"] == "hf":
      o = next(x for x in decode_rows if x["b"] == row["b"] and x["side"] == "ours")
      weights, kv = bytes_per_step(ours, row["b"], t + n / 2)
      bound_ms = 1e3 * (weights + kv) / best_rate
      print(f"{row['b']:>3} {'bound':<6} {bound_ms:.1f} ms/step = ({weights / 1e6:.0f} MB weights + {kv / 1e6:.1f} MB "
            f"of KV at the mean context {t + n / 2:.0f}) / {best_rate / 1e9:.1f} GB/s; ms/step over it: ours "
            f"{o['step_ms'] / bound_ms:.2f}x, HF {row['step_ms'] / bound_ms:.2f}x (fastest calls: ours "
            f"{1e3 * row['b'] / o['min_decode_tps'] / bound_ms:.2f}x, HF "
            f"{1e3 * row['b'] / row['min_decode_tps'] / bound_ms:.2f}x)")
      ratio = lambda key: o[key] / row[key]  # noqa: E731
      print(f"{row['b']:>3} {'ratio':<6}{'':>18}{ratio('prefill_tps'):>14.2f}x{ratio('decode_tps'):>13.2f}x"
            f"{'':>9}{ratio('min_prefill_tps'):>13.2f}x{ratio('min_decode_tps'):>8.2f}x")
      tokens, rows, prefix = row["match"]
      print(f"{'':>4}greedy tokens ours vs HF: {tokens:.1%} equal, {rows:.0%} of rows equal, "
            f"mean common prefix {prefix:.1f} / {n}")

  print(f"\nPart 2: speculative (draft L={draft_layers} of {args.layers}, k={args.num_draft_tokens}) vs plain "
        f"greedy, {n} new tokens, ours")
  print(f"{'B':>3} {'target':<11}{'plain s':>9}{'spec s':>9}{'speed-up':>10}{'accept':>8}{'tok/call':>10}"
        f"{'calls':>7}{'= plain':>9}")
  for row in spec_rows:
    s = row["stats"]
    print(f"{row['b']:>3} {row['target']:<11}{row['plain']:>9.3f}{row['spec']:>9.3f}{row['plain'] / row['spec']:>9.2f}x"
          f"{s['acceptance_rate']:>8.2f}{s['tokens_per_target_call']:>10.2f}{s['target_calls']:>7}"
          f"{row['match'][0]:>9.1%}")
  print("(target: the part-1 model as is, or its layers past the draft's with o_proj/down_proj scaled; "
        "accept: accepted / proposed draft tokens; tok/call: new tokens per target pass, summed over rows; "
        "calls: target passes summed over rows; = plain: tokens equal to the same target's plain greedy ones)")
  print()
  for note in notes:
    print(note)
  print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
