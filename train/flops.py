"""What a run computes, in FLOPs: the counts behind the trainer's `flops_seen`.

A run's FLOPs are those of its train steps plus those computed between steps to make its batches
(an online method's rollouts: generation, reward-model and reference forwards). A step's are
constant: batch_size x a method's FLOPs per batch row (`trained` sequences, forward and backward,
plus `frozen` ones, forward only); the rest is counted as it is computed (`Meter`) and reaches the
trainer with the batch it made (train.trainer.FLOPS).

Conventions, model.flops_per_token's (PaLM's): every matmul, attention over the full T x T square
(a frozen forward over a whole row is a third of training's: no backward); a generated sequence is
model.forward_flops of its prompt and completion read with a KV cache (the causal triangle: each
token attends to the keys before it), as an ideal engine would, so padding, finished rows still in
a decode batch and a prompt's padded prefill are not counted. Norms, softmax and the sampling itself
are left out.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

import model as model_lib


def trained(config: model_lib.ModelConfig, seq_len: int, sequences: float = 1.0) -> float:
  """Forward and backward over `sequences` rows of seq_len tokens."""
  return sequences * seq_len * model_lib.flops_per_token(config, seq_len)


def frozen(config: model_lib.ModelConfig, seq_len: int, sequences: float = 1.0) -> float:
  """A forward only (a reference, teacher or reward model, or scoring samples) over `sequences` rows
  of seq_len tokens: a third of `trained`."""
  return trained(config, seq_len, sequences) / 3.0


def sample_flops(config: model_lib.ModelConfig, prompt_lengths, completion_lengths) -> np.ndarray:
  """Forward FLOPs of each (prompt, completion) [R], all of its tokens read once with a KV cache by a
  model of `config` (model.forward_flops), the completion's last token included (it is sampled,
  never read: one token per sample over)."""
  return model_lib.forward_flops(config, np.asarray(prompt_lengths, np.float64) + np.asarray(completion_lengths))


def generated(config: model_lib.ModelConfig, prompt_ids: Sequence[Sequence[int]],
              completion_ids: Sequence[Sequence[int]]) -> float:
  """Sampling completions [R] after prompts [R] with a KV cache: the sum of their sample_flops."""
  return float(np.sum(sample_flops(config, [len(p) for p in prompt_ids], [len(c) for c in completion_ids])))


@dataclasses.dataclass
class Meter:
  """FLOPs counted where they are computed outside the train step; `take` hands over what was
  counted since the last take (an online method's ExperienceSource stamps each experience with it)."""

  counted: float = 0.0

  def add(self, flops: float) -> None:
    self.counted += float(flops)

  def take(self) -> float:
    counted, self.counted = self.counted, 0.0
    return counted
