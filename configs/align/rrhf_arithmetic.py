"""RRHF on the arithmetic task from part 1's SFT checkpoint: per prompt, the SFT policy's 4 samples
and the task's worked solution, ranked by the task's process reward 'solution' (the share of the
worked solution's parts written right, so wrong samples are ranked among themselves too):

  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft
  python -m align --config=configs/align/rrhf_arithmetic.py --workdir=runs/rrhf

Variants: `:steps=N`, `:init=DIR`, `:difficulty=D`, `:lr=X`, `:samples=N`, `:solutions=False`
(the policy's samples alone), `:source=data` (the task's right versus wrong worked solutions, two
responses a prompt), `:sft=W`, `:reward=exact|digits|solution`.
"""

from configs import common
from configs.align import rrhf
from configs.align.experiments import on_arithmetic

DEFAULTS = {**rrhf.DEFAULTS, "reward": "solution", "init": "runs/sft", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  return on_arithmetic(rrhf.build(arg), arg)
