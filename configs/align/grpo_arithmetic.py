"""GRPO (or RLOO) on the arithmetic task from part 1's SFT checkpoint: 8 samples per prompt,
group-relative advantages from the exact-match reward, no value model:

  python -m align --config=configs/align/grpo_arithmetic.py --workdir=runs/grpo
  python -m align --config=configs/align/grpo_arithmetic.py:advantage=rloo --workdir=runs/rloo

One trainer step per rollout of 64 prompts x 8 samples (batch 512, in 4 micro-batches), so each
step is exactly on-policy and fewer, larger steps carry the signal: at the SFT checkpoint the policy
gradient's noise scale is 5,000-20,000 samples (`benchmarks/gradient_noise.py`), so a minibatch of
16 is far below 1% signal, and Adam's normalized steps then walk the weights at random (the
README's alignment results: at lr 1e-4, 200 steps of 16 took held-out accuracy from 0.205 to
0.115; 24 steps of 512 to 0.215, against 0.055 for the same run with shuffled rewards).

Variants: `:steps=N`, `:init=DIR`, `:lr=X`, `:prompts=P`, `:group=G`, `:batch=B` (rows per step;
prompts x group = one step per rollout), `:accum=A` (micro-batches), `:reward=exact|digits|solution`,
`:kl=C` (k3 KL to the reference in the loss), `:aggregation=sequence_mean|token_mean|fixed_length`,
`:clip_high=E` (DAPO's clip-higher), `:dynamic=1` with `:sampling_prompts=N` (DAPO's dynamic sampling).
"""

from configs import common
from configs.align import grpo
from configs.align.experiments import on_arithmetic

DEFAULTS = {**grpo.DEFAULTS, "init": "runs/sft", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  return on_arithmetic(grpo.build(arg), arg)
