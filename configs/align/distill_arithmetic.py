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
from configs.align.rl_common import online_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=800, init="runs/quickstart_small", teacher="runs/sft", lr=3e-3, difficulty=2,
                         prompts=16, kind="forward_kl", on_policy=0.0, temperature=1.0)
  config = online_config("distill", arg)
  config.distill.teacher = arg.teacher
  config.distill.kind = arg.kind
  config.distill.on_policy_fraction = arg.on_policy
  config.distill.temperature = arg.temperature
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 20
  config.task.measure_kl = False  # the student starts from pre-training: its KL to that says little
  return config
