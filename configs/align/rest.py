"""Sample, filter, fine-tune (ReST, RAFT, rejection sampling, STaR) on any task, from any policy:

  python -m align --config=configs/align/rest.py:mode=raft --config.task.name=jsonl \
      --config.task.path=FILE.jsonl --config.init_from=RUN_OR_HF_DIR --workdir=runs/raft_mine

ReST grows `samples` per prompt and improves on thresholds 0.7 then 1.0; RAFT keeps the top quarter
of each grow; rejection sampling keeps each prompt's best; STaR keeps right rationales and
rationalizes failures with the answer as a hint; all keep only fully right samples (min_reward 1.0)
except ReST's first Improve step. Two passes over what each Improve step kept (`rest.improve_epochs`).
Variants: `:mode=rest|raft|rejection_sampling|star`, `:steps=N`, `:lr=X`, `:samples=N`, `:epochs=E`,
`:epochs=0,improve=S` (instead, S steps per Improve step), `:reward=NAME`.
"""

from configs import common
from configs.align.experiments import online_config

DEFAULTS = dict(steps=96, lr=3e-5, prompts=64, mode="rest", samples=4, improve=8, epochs=2.0, reward="exact")


def build(arg):
  config = online_config("rest", arg)
  config.rest.mode = arg.mode
  config.rest.improve_steps = arg.improve
  config.rest.improve_epochs = arg.epochs
  config.rl.samples_per_prompt = 1 if arg.mode == "star" else arg.samples
  config.rest.thresholds = (0.7, 1.0)
  config.rest.keep_fraction = 0.25
  config.rest.min_reward = 1.0
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
