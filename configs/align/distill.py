"""Distillation of a teacher into a student that shares its tokenizer, on any task:

  python -m align --config=configs/align/distill.py --config.task.name=jsonl --config.task.path=FILE.jsonl \
      --config.init_from=STUDENT_DIR --config.distill.teacher=TEACHER_DIR --workdir=runs/distill_mine

Variants: `:kind=forward_kl|reverse_kl|jsd|sequence|step_by_step`, `:steps=N`, `:lr=X`,
`:on_policy=F` (GKD's on-policy fraction), `:temperature=T`, `:prompts=P`.
"""

from configs import common
from configs.align.experiments import online_config

DEFAULTS = dict(steps=800, lr=3e-3, prompts=16, kind="forward_kl", on_policy=0.0, temperature=1.0, reward="exact")


def build(arg):
  config = online_config("distill", arg)
  config.distill.kind = arg.kind
  config.distill.on_policy_fraction = arg.on_policy
  config.distill.temperature = arg.temperature
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 20
  config.task.measure_kl = False  # a student that starts from pre-training: its KL to that says little
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
