"""SFT on any task's worked solutions, from any checkpoint:

  python -m align --config=configs/align/sft.py --config.task.name=jsonl --config.task.path=FILE.jsonl \
      --config.init_from=RUN_OR_HF_DIR --workdir=runs/sft_mine

(or `--config.task.name=my_package.my_module:make_task`; with `--config.task.name=''`, the JSONL
examples of `--config.sft.train_path`). Reports the task's held-out scores before and after.
Variants: `:steps=N`, `:lr=X`, `:peft=lora|dora|vera|qlora|qa_lora` (adapters of `:rank=R` on all seven
projections, alpha = 2 R; the base stays frozen; see model/peft.py).
"""

from configs import common
from configs.align.experiments import offline_config

DEFAULTS = dict(steps=1500, lr=3e-3, peft="none", rank=16)


def build(arg):
  config = offline_config("sft", arg, warmup_steps=20)
  config.peft = common.peft_config(method=arg.peft, rank=arg.rank, alpha=2.0 * arg.rank, targets="all")
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
