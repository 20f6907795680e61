"""Train-step throughput: our jitted train step against Hugging Face `LlamaForCausalLM` (PyTorch).

    python benchmarks/train_throughput.py                      # the default: 1-3 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --layers=2 --seq=256 --steps=3

Both sides run one full update (forward, backward, AdamW) on the same Llama configuration and
the same [B, T] batch, in float32, on the CPU, in one process. Defaults: L=4, D=512, N=K=8, H=64,
F=1376 (4 * D * 2/3 = 1365, rounded up to a multiple of 32), V=32000, T=512, B=4.

Ours is the project's real step (`train.step.make_train_step` with `train.losses.next_token_loss`
and `train.optimizer.make_optimizer`), jitted with donation; its compile time is timed apart.
Theirs is eager PyTorch with SDPA attention and `torch.optim.AdamW`. Both use lr 1e-4,
b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on the same parameters (not norms or the input
embedding), no clipping, and a mean cross-entropy over all B * T targets computed the same way
(HF's `labels=` shifts internally and would count B * (T - 1)). Steps alternate between the two
sides, so a noisy machine slows both alike, and each side reports its median step time.
GFLOP/s is `model.flops_per_token` (PaLM's count) times tokens/s, the same formula for both.
On a shared VM the ratio still moves with the load (torch's OpenMP threads suffer more from a
busy neighbour than XLA's thread pool), so compare runs taken on a quiet machine.

torch and transformers are not dependencies of ingredients; this script pip-installs them for
itself when they are missing.
"""

import argparse
import importlib.util
import os
import statistics
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
from train import losses  # noqa: E402
from configs import common as configs_common  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import step as step_lib  # noqa: E402

LEARNING_RATE, B1, B2, EPS, WEIGHT_DECAY = 1e-4, 0.9, 0.95, 1e-8, 0.1


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)  # L
  p.add_argument("--width", type=int, default=512)  # D
  p.add_argument("--heads", type=int, default=8)  # N
  p.add_argument("--kv_heads", type=int, default=8)  # K
  p.add_argument("--head_dim", type=int, default=64)  # H
  p.add_argument("--mlp", type=int, default=1376)  # F
  p.add_argument("--vocab", type=int, default=32000)  # V
  p.add_argument("--seq", type=int, default=512)  # T
  p.add_argument("--batch", type=int, default=4)  # B
  p.add_argument("--steps", type=int, default=5, help="timed steps per side")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per side, after compilation")
  # Our model's own knobs, for finding where time goes; the defaults are the project's.
  p.add_argument("--scan_layers", type=int, default=1, choices=(0, 1))
  p.add_argument("--remat_policy", default="none", choices=("none", "full", "dots", "dots_no_batch"))
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
# Ours.
# ----------------------------------------------------------------------------------------------
def make_ours(args, tokens, targets):
  cfg = model.get_preset(
      "tiny", vocab_size=args.vocab, embed_dim=args.width, num_layers=args.layers, num_heads=args.heads,
      num_kv_heads=args.kv_heads, head_dim=args.head_dim, mlp_dim=args.mlp, rope_theta=10000.0, norm_eps=1e-5,
      max_position_embeddings=args.seq, scan_layers=bool(args.scan_layers), remat_policy=args.remat_policy,
  )
  module = model.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  num_params = sum(x.size for x in jax.tree.leaves(params))

  opt_cfg = configs_common.optimizer_config()
  opt_cfg.update(schedule="constant", warmup_steps=0, grad_clip_norm=0.0,  # torch's AdamW does not clip
                 learning_rate=LEARNING_RATE, b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY)
  tx, schedule = optimizer_lib.make_optimizer(opt_cfg, total_steps=1000)
  state = step_lib.init_state(params, tx, seed=0)
  train_step = jax.jit(step_lib.make_train_step(graphdef, losses.next_token_loss, tx, schedule), donate_argnums=0)

  b, t = tokens.shape
  batch = {
      "tokens": jnp.asarray(tokens, jnp.int32),
      "targets": jnp.asarray(targets, jnp.int32),
      "loss_mask": jnp.ones((b, t), jnp.int32),
      "segment_ids": jnp.ones((b, t), jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
  }
  # Compiled ahead of time so that compilation is timed apart from every step.
  start = time.perf_counter()
  compiled = train_step.lower(state, rest, batch).compile()
  compile_s = time.perf_counter() - start

  def run():
    nonlocal state
    state, metrics = compiled(state, rest, batch)
    jax.block_until_ready(state)  # dispatch is asynchronous: wait for the update itself
    return float(metrics["loss"]), float(metrics["tokens"])

  return cfg, num_params, compile_s, run


# ----------------------------------------------------------------------------------------------
# Theirs.
# ----------------------------------------------------------------------------------------------
def make_theirs(args, tokens, targets):
  torch, transformers = ensure_torch()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
      max_position_embeddings=args.seq, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
      attn_implementation="sdpa",
  )
  net = transformers.LlamaForCausalLM(config).float().train()
  num_params = sum(p.numel() for p in net.parameters())
  # The same decay mask as train.optimizer's defaults: norms and the input embedding are not decayed.
  no_decay = lambda name: "norm" in name or "embed_tokens" in name  # noqa: E731
  groups = [
      {"params": [p for n, p in net.named_parameters() if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
      {"params": [p for n, p in net.named_parameters() if no_decay(n)], "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(B1, B2), eps=EPS)
  input_ids = torch.from_numpy(tokens).long()
  labels = torch.from_numpy(targets).long()

  def run():
    logits = net(input_ids=input_ids).logits  # [B, T, V] float32
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), float(labels.numel())  # CPU torch is synchronous: the step is done here

  return torch.__version__, transformers.__version__, num_params, run


def timed(run):
  start = time.perf_counter()
  loss, tokens = run()
  return time.perf_counter() - start, loss, tokens


def main(argv=None):
  args = parse_args(argv)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, (args.batch, args.seq), dtype=np.int32)  # [B, T]
  targets = np.roll(tokens, -1, axis=1)  # next-token targets; random data, so only the shapes matter

  cfg, our_params, compile_s, ours = make_ours(args, tokens, targets)
  torch_version, hf_version, their_params, theirs = make_theirs(args, tokens, targets)
  print(f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs), torch {torch_version}, "
        f"transformers {hf_version}; float32 on both sides")
  print(f"L={args.layers} D={args.width} N={args.heads} K={args.kv_heads} H={args.head_dim} F={args.mlp} "
        f"V={args.vocab} T={args.seq} B={args.batch}; scan_layers={bool(args.scan_layers)} "
        f"remat_policy={args.remat_policy}")
  print(f"jax compile (lower + compile, excluded from step times): {compile_s:.1f} s")
  if our_params != their_params:
    print(f"WARNING: parameter counts differ: ours {our_params:,} vs transformers {their_params:,}")

  sides = {"ours": ours, "transformers": theirs}
  for _ in range(args.warmup):
    for run in sides.values():
      run()
  times = {name: [] for name in sides}
  last = {}
  for i in range(args.steps):
    # Alternate which side goes first, so neither always follows the other's cache pollution.
    for name in (("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")):
      seconds, loss, step_tokens = timed(sides[name])
      times[name].append(seconds)
      last[name] = (loss, step_tokens)

  flops_per_token = model.flops_per_token(cfg, args.seq)
  # min is the least-disturbed step: on a shared machine it is steadier than the median.
  header = ("params", "median step s", "min step s", "tokens/s", "GFLOP/s", "loss", "tokens")
  print("\n" + f"{'side':<14}" + "".join(f"{h:>{w}}" for h, w in zip(header, (12, 15, 12, 10, 9, 9, 8))))
  tokens_per_s = {}
  for name, count in (("ours", our_params), ("transformers", their_params)):
    median = statistics.median(times[name])
    loss, step_tokens = last[name]
    tokens_per_s[name] = step_tokens / median
    print(f"{name:<14}{count:>12,}{median:>15.3f}{min(times[name]):>12.3f}{tokens_per_s[name]:>10,.0f}"
          f"{flops_per_token * tokens_per_s[name] / 1e9:>9.1f}{loss:>9.4f}{step_tokens:>8.0f}")
  for name in sides:
    print(f"{name} step times (s): {', '.join(f'{t:.3f}' for t in times[name])}")
  print(f"ratio (ours / transformers): {tokens_per_s['ours'] / tokens_per_s['transformers']:.2f}x")


if __name__ == "__main__":
  main()
