"""TPO on the arithmetic task from part 1's SFT checkpoint:

  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft
  python -m align --config=configs/align/tpo_arithmetic.py --workdir=runs/tpo

The SFT policy already writes a thought, its column-by-column working, then a response on the next
line, "Answer: N"; so the prompt is the task's own (template '{prompt}') and the response is what
follows the first newline (the marker is a newline): the judge, the task's 'digits' reward (partial
credit per answer character, so fewer prompts have all samples alike), sees the answer line alone,
never the working. A sample with no newline scores lowest.
Variants: `:steps=N`, `:init=DIR`, `:difficulty=D`, `:lr=X`, `:prompts=P`, `:samples=K`, `:epochs=E`,
`:beta=B`, `:reward=exact|digits`.
"""

from configs import common
from configs.align import tpo
from configs.align.experiments import on_arithmetic

DEFAULTS = {**tpo.DEFAULTS, "reward": "digits", "init": "runs/sft", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  config = on_arithmetic(tpo.build(arg), arg)
  config.tpo.template = "{prompt}"
  config.tpo.marker = "\n"
  return config
