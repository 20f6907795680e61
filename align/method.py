"""The Method contract: what a post-training method gives the one trainer of train/.

A method is its loss and its data. Each module in align/ that is a method ends with
`METHOD = Method(...)`, and align/registry.py lists them all. `config.<block>` for each block the
method reads is declared in configs/align/common.py (METHOD_BLOCKS), and `align_config(method)`
holds only those blocks.

A method's data may ask the trainer to restart: a batch carrying the key train.trainer.RESTART is
trained on from the run's starting parameters and a new run's optimizer state (train.trainer.restart:
init_from's weights or the seed's init, rebuilt; the step count and rng go on). An online method asks
through its experience (align.rollout.Experience(restart=True): its first minibatch carries the key),
so a resumed run restarts at the same step as a straight one (STaR's restarts: align/rest.py).

What a method computes is counted in FLOPs (train/flops.py): its train step's through `row_flops`,
and what an online method computes between steps through the train.flops.Meter its
ExperienceSource stamps each experience with (align/rollout.py).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

from align.tasks import Problem, Task
from train import step as step_lib
from train import trainer


def _no_checks(config: ml_collections.ConfigDict, task: Task | None) -> None:
  del config, task


@dataclasses.dataclass(frozen=True)
class Method:
  """name: config.method's value.
  loss_fn(config) -> the trainer's loss_fn(model, batch, rng, *, whole_batch=None) -> (loss, metrics)
    (train.step.LossFn).
  make_dataset(config, tokenizer, *, split, context: train.trainer.DataContext, task: Task | None)
    -> a grain IterDataset of this process's batches ('train' and, where it has a held-out loss, 'eval').
  validate(config, task): raises ValueError naming the key of the method's own blocks that is wrong.
  wrap(decoder, *, mesh, rules, seed, config, load) -> the module trained around the decoder (a
    reward or value head, a frozen reference or teacher), keeping the decoder at `.decoder`; None:
    the decoder itself.
  eval_prompt(config, problem) -> how the trained policy is asked at test time (default: the prompt).
  eval_response(config, completion) -> the part of a held-out completion the task's rewards score
    (default: all of it; TPO: the response after its thought).
  generates: its result is a policy, measured by generating answers to the task's held-out
    problems (a reward model is not).
  row_flops(config, module) -> the train step's FLOPs per batch row of the trained module (the
    wrapper, if any): its trained sequences' forward and backward and its frozen forwards
    (train/flops.py). Default: one sequence of config.seq_len tokens, trained.
  flops_note: what the method's FLOP count leaves out or spreads over the steps (summary.json)."""

  name: str
  loss_fn: Callable[[ml_collections.ConfigDict], step_lib.LossFn]
  make_dataset: Callable[..., Any]
  validate: Callable[[ml_collections.ConfigDict, Task | None], None] = _no_checks
  wrap: Callable[..., nnx.Module] | None = None
  eval_prompt: Callable[[ml_collections.ConfigDict, Problem], str] | None = None
  eval_response: Callable[[ml_collections.ConfigDict, str], str] | None = None
  generates: bool = True
  row_flops: trainer.RowFlopsFn = trainer.one_sequence
  flops_note: str = ""

  def prompt_of(self, config: ml_collections.ConfigDict) -> Callable[[Problem], str]:
    if self.eval_prompt is None:
      return lambda problem: problem.prompt
    return lambda problem: self.eval_prompt(config, problem)

  def response_of(self, config: ml_collections.ConfigDict) -> Callable[[str], str]:
    if self.eval_response is None:
      return lambda text: text
    return lambda text: self.eval_response(config, text)


def check_choice(config: ml_collections.ConfigDict, key: str, choices) -> None:
  """ValueError unless config.<key> (dotted) is one of `choices`."""
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in choices:
    raise ValueError(f"config.{key}={value!r} is not one of {tuple(choices)}")
