"""What the online methods share: their prompts, their reward, and sampling from the live policy.

`config.rl` (configs/align/common.py) holds these settings for every method that learns from its own
samples (PPO, GRPO/RLOO, ReST, RAFT, rejection sampling, STaR, on-policy distillation).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

import infer
from align import data, rewards, rollout
from model import peft
from align.method import check_choice
from align.tasks import Task, split_problems
from train import flops as flops_lib


def reference_policy(module):
  """The frozen reference policy of a trained module: the copy under `frozen`, or, with adapters
  (config.peft), the policy itself with its adapters switched off (one copy of the base)."""
  frozen = getattr(module, "frozen", None)
  if frozen is not None:
    return frozen
  policy = getattr(module, "decoder", module)
  if not peft.has_adapters(policy):
    raise ValueError("the module has no frozen reference and no adapters to switch off")
  return peft.without_adapters(policy)


def validate_rl(config: ml_collections.ConfigDict, task: Task | None, *, reward: bool = True) -> None:
  """The checks of config.rl, which every online method reads (config.rl.reward only where
  `reward`: ReST's self-consistency mode reads no reward)."""
  rl = config.rl
  check_choice(config, "rl.on_error", data.ON_ERROR)
  known = (*(task.rewards if task is not None else ()), "model")
  if reward and rl.reward not in known:
    whose = f"task {task.name!r}'s verifiers and" if task is not None else "(no task, so only)"
    raise ValueError(f"config.rl.reward={rl.reward!r} is not one of {whose} a reward model: {known}")
  for key in ("prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "epochs"):
    if rl[key] < 1:
      raise ValueError(f"config.rl.{key}={rl[key]} must be >= 1")
  if rl.temperature <= 0:
    raise ValueError(f"config.rl.temperature={rl.temperature} must be > 0 (the losses divide by it)")
  if rl.shuffle_rewards and config.method not in ("ppo", "grpo"):
    raise ValueError(f"config.rl.shuffle_rewards is a control of the policy-gradient methods "
                     f"(ppo, grpo); config.method={config.method!r} does not use it")
  if task is None and not rl.prompts_path:
    raise ValueError("config.rl.prompts_path is empty and config.task.name is '': give one of them")


def prompts(config: ml_collections.ConfigDict, task: Task | None, split: str = "train") -> list[str]:
  """The prompts to sample for: the task's problems of `split` or the JSONL file config.rl.prompts_path
  ({"prompt": ...})."""
  if task is not None:
    return [p.prompt for p in split_problems(task, config.task, split)]
  if not config.rl.prompts_path:
    raise ValueError("config.rl.prompts_path is empty and config.task.name is ''")
  return [r["prompt"] for r in data.read_jsonl(config.rl.prompts_path, "prompt", on_error=config.rl.on_error)]


def prompt_batch(pool: list[str], iteration: int, size: int, *, seed: int) -> list[str]:
  """Iteration i's `size` prompts: consecutive slices of a permutation of the pool, reshuffled per pass."""
  if not pool:
    raise ValueError("there are no prompts to sample for")
  out, start = [], iteration * size
  while len(out) < size:
    epoch, offset = divmod(start + len(out), len(pool))
    order = np.random.default_rng([seed, epoch]).permutation(len(pool))
    out += [pool[i] for i in order[offset: offset + size - len(out)]]
  return out


def reward_fn(config: ml_collections.ConfigDict, task: Task | None, tokenizer, *, mesh=None, rules=None,
              meter: flops_lib.Meter | None = None) -> rewards.RewardFn:
  """config.rl.reward: a reward model's score (its forwards counted on `meter`), or the task's
  verifier of that name for the train problems (asked plainly or with their hint)."""
  c = config.rl
  if c.reward == "model":
    if not c.reward_model:
      raise ValueError("config.rl.reward='model' needs config.rl.reward_model (a reward-model run's workdir)")
    return rewards.model_reward(c.reward_model, tokenizer, seq_len=config.seq_len, mesh=mesh, rules=rules,
                                meter=meter)
  if task is None:
    raise ValueError(f"config.rl.reward={c.reward!r} is a task's verifier, but config.task.name is ''; "
                     "use reward='model'")
  return rewards.task_reward(task, c.reward, split_problems(task, config.task, "train"))


@dataclasses.dataclass
class Sampler:
  """Samples of iteration i from whatever policy `policy()` returns at that moment, their generation
  FLOPs counted on `meter` (train.flops.generated)."""

  policy: Callable[[], Any]
  tokenizer: Any
  config: ml_collections.ConfigDict
  rules: Any = None
  meter: flops_lib.Meter = dataclasses.field(default_factory=flops_lib.Meter)

  def __call__(self, prompts: list[str], iteration: int, *, n: int | None = None,
               temperature: float | None = None) -> rollout.Samples:
    c = self.config.rl
    temperature = c.temperature if temperature is None else temperature
    policy = self.policy()
    samples = rollout.sample(
        policy, self.tokenizer, prompts, n=c.samples_per_prompt if n is None else n,
        max_new_tokens=c.max_new_tokens, sampling=infer.Sampling(temperature=temperature),
        seed=self.config.seed * 7919 + iteration, rules=self.rules,
    )
    self.meter.add(flops_lib.generated(policy.config, samples.prompt_ids, samples.completion_ids))
    return samples


def scored_rollout(sampler: Sampler, reward: rewards.RewardFn, pool: list[str], iteration: int,
                   config: ml_collections.ConfigDict, *, num_prompts: int | None = None,
                   ) -> tuple[rollout.Samples, dict[str, np.ndarray], np.ndarray]:
  """Iteration i's samples from the live policy (rl.samples_per_prompt to each of num_prompts,
  default rl.prompts_per_iteration, prompts: the pool's i-th slice of that size), as trainer rows
  (tokens/targets/mask [R, T]), and their scores [R]: the reward minus rl.missing_eos_penalty for
  each sample that never ended (with rl.shuffle_rewards, permuted across the iteration's samples: no
  signal, same statistics)."""
  rl = config.rl
  num_prompts = rl.prompts_per_iteration if num_prompts is None else num_prompts
  prompts = prompt_batch(pool, iteration, num_prompts, seed=config.seed)
  samples = sampler(prompts, iteration)
  rows = rollout.token_rows(samples.prompt_ids, samples.completion_ids, seq_len=config.seq_len)
  repeated = [p for p in prompts for _ in range(rl.samples_per_prompt)]
  scores = np.asarray(reward(repeated, samples.texts), np.float32) - rl.missing_eos_penalty * ~samples.finished
  if rl.shuffle_rewards:  # a control: the same reward values, dealt to the samples at random
    scores = np.random.default_rng([config.seed, iteration, 1]).permutation(scores)
  return samples, rows, scores
