"""SFT on the synthetic arithmetic task, from the pre-training quickstart's checkpoint:

  python -m train --config=configs/pretrain/quickstart.py --workdir=runs/quickstart
  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft

Variants: `:steps=N`, `:init=DIR` (another run or a Hugging Face directory), `:difficulty=D`, `:lr=X`.
Reports exact-match accuracy of greedy answers on held-out problems before and after.
"""

from configs import common
from configs.align import sft
from configs.align.experiments import on_arithmetic

DEFAULTS = {**sft.DEFAULTS, "init": "runs/quickstart", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  return on_arithmetic(sft.build(arg), arg)
