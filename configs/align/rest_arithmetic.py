"""Sample, filter, fine-tune on the arithmetic task from part 1's SFT checkpoint:

  python -m align --config=configs/align/rest_arithmetic.py --workdir=runs/rest
  python -m align --config=configs/align/rest_arithmetic.py:mode=raft --workdir=runs/raft
  python -m align --config=configs/align/rest_arithmetic.py:mode=rejection_sampling --workdir=runs/rs
  python -m align --config=configs/align/rest_arithmetic.py:mode=star --workdir=runs/star
  python -m align --config=configs/align/rest_arithmetic.py:mode=star,restart=1,steps=146 --workdir=runs/star_restart
  python -m align --config=configs/align/rest_arithmetic.py:mode=self_consistency,samples=8 --workdir=runs/lmsi

Every mode but self-consistency scores samples by the task's process reward 'solution' (the share
of the worked solution's parts written right): the answer-only reward also rewards right answers
reached by wrong working, which are common in this model's temperature-1 samples, and fine-tuning
on those made every mode worse (RAFT 0.205 -> 0.205, rejection sampling -> 0.180, STaR -> 0.120 held-out
accuracy). ReST grows 4 samples per prompt and improves on thresholds 0.7 then 1.0 (one Improve
step of 8 trainer steps each); RAFT keeps the top quarter of each grow; rejection sampling keeps
each prompt's best of 4; STaR keeps right rationales and rationalizes failures with the answer as
a hint; all keep only fully right solutions (min_reward 1.0) except ReST's first Improve step.
A small learning rate and two passes over what each Improve step kept (`rest.improve_epochs`): the
kept samples are few (~10% of a grow), and a fixed number of steps per grow passes over them many
times and overfits (STaR with 8 steps per grow: 0.205 -> 0.125 held-out accuracy; with 2 passes:
0.215; at lr 1e-4 and 10 steps per Improve step ReST fell to 0.095).
STaR with `:restart=1` runs as the paper does: each outer iteration fine-tunes the SFT checkpoint
afresh on every rationale kept so far, 40 steps and 20% more per outer iteration (146 steps: three
outer iterations). Self-consistency (`:mode=self_consistency`, Huang et al. 2022) reads no answer and
no reward: it keeps each prompt's paths that state the majority of its `samples` answers (`:agree=A`:
only where a share A of them agree); the log's kept_right says how many of those are right.
Variants: `:steps=N`, `:init=DIR`, `:lr=X`, `:samples=N`, `:epochs=E` (passes over what each
Improve step kept), `:epochs=0,improve=S` (instead, S steps per Improve step), `:agree=A`, `:restart=1`.
"""

from configs import common
from configs.align import rest
from configs.align.experiments import on_arithmetic

DEFAULTS = {**rest.DEFAULTS, "reward": "solution", "init": "runs/sft", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  return on_arithmetic(rest.build(arg), arg)
