"""How much of an online method's minibatch gradient is signal: the gradient noise scale of GRPO's
loss against SFT's, at the same parameters (not a speed benchmark: a diagnostic that explains
measured training curves, printed as a ratio against a peer measured in the same run).

    python benchmarks/gradient_noise.py --init=runs/sft                  # about 3 minutes on 2 CPU cores
    python benchmarks/gradient_noise.py --init=runs/sft --minibatches=64 --reward=solution

The simple noise scale B_noise = tr(Sigma) / |G|^2 (train/noise_scale.py; McCandlish et al. 2018),
with G the true gradient and Sigma the per-example gradient covariance: a minibatch of B examples
is mostly noise when B << B_noise, and Adam, which normalizes the update's size, then takes
full-sized steps in noise directions. Both terms are estimated without bias from K disjoint
minibatches of b rows (|g_b|^2 averaged over them, and |g_Kb|^2 of their mean); the mean cosine
between two minibatch gradients is printed too.

The GRPO side is one rollout of the policy (K * b / `--group` prompts x `--group` samples at
temperature 1, group-normalized advantages, the exact-match or process reward), cut into K
minibatches of b = `--batch` rows made of whole groups (a group's advantages sum to zero, so its
samples are correlated; the estimator counts groups as the independent units and reports B_noise
in samples); it is exactly on-policy, so the clipped objective's gradient is the policy gradient.
The SFT side is the gold worked solutions of as many training problems, tokenized as the SFT data
is, the next-token loss on their completion tokens, in minibatches of the same size.
"""

import argparse
import functools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align import data, grpo, rollout
from align import run as align_run
from align.tasks import arithmetic
from configs.align import grpo_arithmetic
from train import losses as train_losses
from train import trainer
from train.noise_scale import noise_scale


def _flat_grad(graphdef, rest, loss_fn):
  def loss_of(params, batch):
    return loss_fn(nnx.merge(graphdef, params, rest), batch, jax.random.key(0))[0]

  @jax.jit
  def grad(params, batch):
    g = jax.grad(loss_of)(params, batch)
    return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(g)])

  return grad


def _minibatches(rows: dict[str, np.ndarray], b: int, k: int) -> list[dict[str, np.ndarray]]:
  """The first k consecutive minibatches of b rows."""
  return [{name: v[i * b: (i + 1) * b] for name, v in rows.items()} for i in range(k)]


def _measure(grad, params, batches, units: int, rows_per_unit: int = 1) -> dict[str, float]:
  """Noise scale from minibatches of `units` independent units (an example, or a GRPO group of
  rows_per_unit samples), B_noise reported in rows."""
  grads = [np.asarray(grad(params, {k: jnp.asarray(v) for k, v in b.items()}), np.float64) for b in batches]
  sq = np.array([g @ g for g in grads])
  mean = np.mean(grads, axis=0)
  out = noise_scale(sq, float(mean @ mean), units)
  out["B_noise"] *= rows_per_unit
  unit = [g / np.linalg.norm(g) for g in grads if np.linalg.norm(g) > 0]  # a minibatch of zero advantages has none
  out["cosine"] = float(np.mean([unit[i] @ unit[j] for i in range(len(unit)) for j in range(i)]))
  out["zero"] = len(grads) - len(unit)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--init", default="runs/sft", help="the SFT run (or HF directory) both sides start from")
  parser.add_argument("--reward", default="exact", choices=sorted(arithmetic.REWARDS))
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--batch", type=int, default=16, help="rows per minibatch (a multiple of --group)")
  parser.add_argument("--minibatches", type=int, default=32, help="K disjoint minibatches per side")
  args = parser.parse_args()

  b = args.batch
  if b % args.group:
    raise ValueError(f"--batch={b} must be a multiple of --group={args.group} (minibatches of whole groups)")
  config = grpo_arithmetic.get_config(f"init={args.init},group={args.group},batch={b},accum=1,reward={args.reward}")
  config.rl.prompts_per_iteration = args.minibatches * b // args.group  # one rollout = K minibatches
  with tempfile.TemporaryDirectory() as workdir:
    run, _, _ = align_run.setup(config, workdir)
    t = time.perf_counter()
    next(run.train_iter)  # samples and scores the first rollout, saved prompt-major in the workdir
    sample_seconds = time.perf_counter() - t
    experience, _ = rollout.load_experience(Path(workdir) / rollout.ROLLOUT_DIR / "0.npz")
    # Minibatches of whole groups: a group's advantages sum to zero, so its samples are not
    # independent; groups (different prompts, independent samples) are.
    grpo_batches = _minibatches(experience.rows, b, args.minibatches)
    params = run.state["params"]
    rl_side = _measure(_flat_grad(run.graphdef, run.rest, grpo.loss_fn(config)), params, grpo_batches,
                       b // args.group, rows_per_unit=args.group)

    examples = arithmetic.sft_examples(args.minibatches * b, difficulty=config.task.difficulty, seed=config.task.seed)
    prompts, completions = zip(*(data.prompt_completion_ids(r, run.tokenizer) for r in examples))
    sft_batches = _minibatches(rollout.sft_rows(prompts, completions, seq_len=config.seq_len), b, args.minibatches)
    sft_loss = functools.partial(train_losses.next_token_loss, z_loss=0.0)
    sft_side = _measure(_flat_grad(run.graphdef, run.rest, sft_loss), params, sft_batches, b)

  rewards = np.concatenate([x["score"] for x in grpo_batches])
  print(f"start: {args.init}; GRPO rollout: {config.rl.prompts_per_iteration} prompts x {args.group} samples, "
        f"reward {args.reward!r} mean {rewards.mean():.3f} ({sample_seconds:.0f} s); "
        f"K={args.minibatches} minibatches of b={b} rows per side")
  print(f"{'':6s} {'|G|^2':>11s} {'tr(Sigma)':>11s} {'B_noise':>10s} {'|g_b|^2/|G|^2':>14s} {'cos(g_i,g_j)':>13s}")
  for name, r in (("SFT", sft_side), ("GRPO", rl_side)):
    print(f"{name:6s} {r['|G|^2']:11.3e} {r['tr(Sigma)']:11.3e} {r['B_noise']:10.1f} "
          f"{r['|g_b|^2'] / r['|G|^2']:14.1f} {r['cosine']:13.3f}")
  if rl_side["zero"]:
    print(f"({rl_side['zero']} of the GRPO minibatches had no learning signal at all: every group in them scored alike)")
  print(f"GRPO / SFT noise scale: {rl_side['B_noise'] / sft_side['B_noise']:.1f}x; at b={b}, the fraction of a "
        f"minibatch gradient's squared norm that is signal: SFT {sft_side['|G|^2'] / sft_side['|g_b|^2']:.2f}, "
        f"GRPO {rl_side['|G|^2'] / rl_side['|g_b|^2']:.2f}")


if __name__ == "__main__":
  main()
