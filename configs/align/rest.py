"""Sample, filter, fine-tune (ReST, RAFT, rejection sampling, STaR, self-consistency) on any task, from any policy:

  python -m align --config=configs/align/rest.py:mode=raft --config.task.name=jsonl \
      --config.task.path=FILE.jsonl --config.init_from=RUN_OR_HF_DIR --workdir=runs/raft_mine
  python -m align --config=configs/align/rest.py:mode=self_consistency,samples=8 \
      --config.rl.prompts_path=PROMPTS.jsonl --config.init_from=RUN_OR_HF_DIR --workdir=runs/lmsi_mine

ReST grows `samples` per prompt and improves on thresholds 0.7 then 1.0; RAFT keeps the top quarter
of each grow; rejection sampling keeps each prompt's best; STaR keeps right rationales and
rationalizes failures with the answer as a hint; all keep only fully right samples (min_reward 1.0)
except ReST's first Improve step. Self-consistency needs no answers, only prompts: it keeps the
paths that state each prompt's majority answer (`:agree=A`: only where at least a share A of the
`samples` agree). Two passes over what each Improve step kept (`rest.improve_epochs`).
`:restart=1` runs STaR as the paper does: each outer iteration fine-tunes the starting policy on every
rationale kept so far, 40 steps then 20% more per outer iteration (whole iterations end at steps 40,
88, 146, 215, 298: give one of them as `:steps=N`), without warmup (the optimizer restarts too).
Variants: `:mode=rest|raft|rejection_sampling|star|self_consistency`, `:steps=N`, `:lr=X`,
`:samples=N`, `:epochs=E`, `:epochs=0,improve=S` (instead, S steps per Improve step),
`:reward=NAME`, `:agree=A`, `:restart=1`.
"""

from configs import common
from configs.align.experiments import online_config

DEFAULTS = dict(steps=96, lr=3e-5, prompts=64, mode="rest", samples=4, improve=8, epochs=2.0, reward="exact",
                agree=0.0, restart=False)


def build(arg):
  config = online_config("rest", arg)
  config.rest.mode = arg.mode
  config.rest.improve_steps = arg.improve
  config.rest.improve_epochs = arg.epochs
  config.rest.min_agreement = arg.agree
  config.rest.star_restart = arg.restart
  if arg.restart:
    config.optimizer.warmup_steps = 0  # every outer iteration restarts the optimizer, schedule included
  config.rl.samples_per_prompt = 1 if arg.mode == "star" else arg.samples
  config.rest.thresholds = (0.7, 1.0)
  config.rest.keep_fraction = 0.25
  config.rest.min_reward = 1.0
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
