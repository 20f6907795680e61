"""Distill part 1's SFT model (the teacher) into a smaller pre-trained student, on the arithmetic task:

  python -m train --config=configs/pretrain/quickstart.py:size=small \
      --config.tokenizer.path=runs/quickstart/tokenizer.model --workdir=runs/quickstart_small
  python -m align --config=configs/align/sft_arithmetic.py:init=runs/quickstart_small,steps=800 --workdir=runs/student_sft
  python -m align --config=configs/align/distill_arithmetic.py --workdir=runs/distill

The last two give the student's accuracy without and with the teacher, for the same steps and learning rate.
Variants: `:kind=forward_kl|reverse_kl|jsd|sequence|step_by_step`, `:teacher=DIR`, `:init=DIR`,
`:steps=N`, `:lr=X`, `:on_policy=F` (GKD's on-policy fraction), `:temperature=T`.
"""

from configs import common
from configs.align import distill
from configs.align.experiments import on_arithmetic

DEFAULTS = {**distill.DEFAULTS, "reward": "solution", "init": "runs/quickstart_small", "teacher": "runs/sft",
            "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  config = on_arithmetic(distill.build(arg), arg)
  config.distill.teacher = arg.teacher
  return config
