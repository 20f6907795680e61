"""DPO on the arithmetic task's preference pairs (correct versus wrong worked solutions), from SFT:

  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft
  python -m align --config=configs/align/dpo_arithmetic.py --workdir=runs/dpo

Variants: `:steps=N`, `:init=DIR`, `:difficulty=D`, `:loss=sigmoid|robust|ipo|hinge|simpo|orpo`, `:beta=B`,
`:sft=A` (RPO: + A * NLL of chosen), `:lr=X`, `:pairs=ai_feedback` (RLAIF / dDPO: the starting policy's own samples, best versus worst by the
exact-match judge, instead of the task's correct-versus-wrong pairs).
The reference log-probs are the starting model's, computed once into the workdir.
The task's pairs are far off-policy (the SFT model already puts the rejected ~33 nats below the
chosen), so DPO is met by pushing both down: at lr 2e-4 the chosen log-prob fell from -4.7 to -21
and accuracy collapsed (0.205 -> 0.010); hence lr 1e-5 by default, and `:sft=1.0` (RPO) holds the
chosen up (README, Alignment).
"""

from configs import common
from configs.align import dpo
from configs.align.experiments import on_arithmetic

DEFAULTS = {**dpo.DEFAULTS, "init": "runs/sft", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  return on_arithmetic(dpo.build(arg), arg)
