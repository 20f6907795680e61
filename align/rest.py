"""Sample, filter, fine-tune: ReST, RAFT, rejection-sampling fine-tuning and STaR on one machinery.

Each iteration grows a set of the live policy's samples (rl.prompts_per_iteration prompts x
rl.samples_per_prompt samples, scored by the reward), keeps some by the method's rule, and
fine-tunes on them with the SFT loss (completion tokens only), one trainer step per minibatch:

  rest   ReST (Gulcehre et al. 2023): Grow, then one Improve step per threshold in rest.thresholds
         (rising): Improve step k fine-tunes rest.improve_steps steps (or rest.improve_epochs
         passes) on the samples whose reward is >= thresholds[k]; iterations of Grow and Improve.
  raft   RAFT (Dong et al. 2023): keep the top rest.keep_fraction of the iteration's samples by
         reward (a sample below rest.min_reward never), fine-tune rest.improve_steps steps (or
         rest.improve_epochs passes over what was kept, as for the modes below).
  rejection_sampling   best-of-N per prompt (kept when its reward >= rest.min_reward), then SFT.
  star   STaR (Zelikman et al. 2022): keep the rationales that reach the right answer; for each
         prompt that failed, sample again with the answer given as a hint (rationalization) and keep
         those that reach it, trained *without* the hint; fine-tune; repeat. One difference from
         the paper: it restarts fine-tuning from the base model at every outer iteration (on that
         iteration's rationales, with a growing number of steps), which bounds how far the model
         drifts; here, as in ReST, fine-tuning continues from the live policy, and
         rest.improve_epochs (a few passes over what each grow kept) is what bounds overfitting.

An iteration whose filter keeps nothing grows again on the next prompts (a warning says so).
"""

import functools
import logging

import ml_collections
import numpy as np

from align import online, rollout
from align.method import Method, check_choice
from align.tasks import Task, split_problems
from train import losses as train_losses

MODES = ("rest", "raft", "rejection_sampling", "star")
_MAX_EMPTY_GROWS = 8


def select_rest(scores: np.ndarray, thresholds) -> list[np.ndarray]:
  """ReST's Improve steps: for each threshold (in order), the indices of samples scoring >= it."""
  return [np.flatnonzero(scores >= t) for t in thresholds]


def select_raft(scores: np.ndarray, keep_fraction: float, min_reward: float) -> np.ndarray:
  """The top ceil(keep_fraction * R) samples by score (earlier rows first among ties), those >= min_reward."""
  keep = int(np.ceil(keep_fraction * len(scores)))
  top = np.argsort(-scores, kind="stable")[:keep]
  return np.sort(top[scores[top] >= min_reward])


def select_best_of_n(scores: np.ndarray, n: int, min_reward: float) -> np.ndarray:
  """Per group of n consecutive samples, the best (the first among ties) when it scores >= min_reward."""
  groups = scores.reshape(-1, n)
  best = np.argmax(groups, axis=1) + n * np.arange(len(groups))
  return best[scores[best] >= min_reward]


def improve_schedule(phase_sizes: list[int], batch_size: int, *, steps: int, seed: int,
                     epochs: float = 0.0) -> np.ndarray:
  """[S, batch_size] row indices: per non-empty phase, in phase order, minibatches drawn from that
  phase's rows (the rows are laid out phase after phase). ReST's Improve steps, rising.

  epochs = 0: `steps` minibatches per phase; epochs > 0: ceil(epochs * size / batch_size) of them,
  so a phase that kept few samples is not passed over many times (which overfits them)."""
  schedule, start = [], 0
  for k, size in enumerate(phase_sizes):
    if size:
      n = max(1, int(np.ceil(epochs * size / batch_size))) if epochs > 0 else steps
      schedule.append(rollout.cycle_schedule(np.arange(start, start + size), batch_size, steps=n, seed=seed * 31 + k))
    start += size
  return np.concatenate(schedule)


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  online.validate_rl(config, task)
  c = config.rest
  check_choice(config, "rest.mode", MODES)
  thresholds = list(c.thresholds)
  if c.mode == "rest" and (not thresholds or thresholds != sorted(thresholds)):
    raise ValueError(f"config.rest.thresholds={tuple(c.thresholds)} must be a non-empty, non-decreasing sequence")
  if not 0 < c.keep_fraction <= 1:
    raise ValueError(f"config.rest.keep_fraction={c.keep_fraction} must be in (0, 1]")
  if c.improve_steps < 1:
    raise ValueError(f"config.rest.improve_steps={c.improve_steps} must be >= 1")
  if c.improve_epochs < 0:
    raise ValueError(f"config.rest.improve_epochs={c.improve_epochs} must be >= 0 (0: improve_steps per Improve step)")
  if c.mode == "star" and task is None:
    raise ValueError("config.rest.mode='star' needs a task that can give its answer as a hint (config.task.name)")


def _star_samples(sampler, tokenizer, prompts, iteration, reward_fn, min_reward, hint):
  """STaR's two passes: rationales, then rationalizations (hinted) for the prompts that failed.
  Returns training (prompt ids, completion ids) pairs (the plain prompt always) and counts."""
  first = sampler(prompts, iteration, n=1)
  scores = reward_fn(prompts, first.texts)
  keep = [(first.prompt_ids[i], first.completion_ids[i]) for i in np.flatnonzero(scores >= min_reward)]
  failed = [prompts[i] for i in np.flatnonzero(scores < min_reward)]
  rationalized = 0
  if failed:
    hinted = [hint(p) for p in failed]
    second = sampler(hinted, iteration + 1_000_000, n=1)
    again = reward_fn(failed, second.texts)
    for i in np.flatnonzero(again >= min_reward):
      keep.append((rollout.encode_prompt(tokenizer, failed[i]), second.completion_ids[i]))
      rationalized += 1
  return keep, {"reward": float(scores.mean()), "rationalized": rationalized, "failed": len(failed)}


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  live, rules = context.live, context.rules
  if split != "train":
    raise ValueError(f"{config.rest.mode} has no held-out loss (set config.eval_every=0)")
  c, rl = config.rest, config.rl
  pool = online.prompts(config, task)
  reward_fn = online.reward_fn(config, task, tokenizer, mesh=context.mesh, rules=rules)
  hints = {p.prompt: p.hint() for p in split_problems(task, config.task, "train")} if c.mode == "star" else {}
  sampler = online.Sampler(live, tokenizer, config, rules)

  def grow(iteration: int):
    """(prompt ids, completion ids) to train on, as [phase][pair], and a summary."""
    prompts = online.prompt_batch(pool, iteration, rl.prompts_per_iteration, seed=config.seed)
    if c.mode == "star":
      keep, summary = _star_samples(sampler, tokenizer, prompts, iteration, reward_fn, c.min_reward, hints.__getitem__)
      return [keep], summary
    samples = sampler(prompts, iteration)
    repeated = [p for p in prompts for _ in range(rl.samples_per_prompt)]
    scores = reward_fn(repeated, samples.texts)
    if c.mode == "rest":
      phases = select_rest(scores, c.thresholds)
    elif c.mode == "raft":
      phases = [select_raft(scores, c.keep_fraction, c.min_reward)]
    else:
      phases = [select_best_of_n(scores, rl.samples_per_prompt, c.min_reward)]
    pairs = [[(samples.prompt_ids[i], samples.completion_ids[i]) for i in phase] for phase in phases]
    return pairs, {"reward": float(scores.mean()), "kept": [len(p) for p in phases]}

  def collect(iteration: int, state: dict):
    grown = int(state.get("grown", iteration))
    for _ in range(_MAX_EMPTY_GROWS):
      phases, summary = grow(grown)
      grown += 1
      logging.info("%s grow %d: %s", c.mode, grown - 1, summary)
      if any(phases):
        break
      logging.warning("%s grow %d kept no sample; growing again on the next prompts", c.mode, grown - 1)
    else:
      raise RuntimeError(f"{c.mode}: {_MAX_EMPTY_GROWS} grows in a row kept no sample (reward threshold "
                         f"{c.min_reward if c.mode != 'rest' else tuple(c.thresholds)}); is the starting policy "
                         "able to solve any prompt at all?")
    pairs = [p for phase in phases for p in phase]
    rows = rollout.sft_rows([p for p, _ in pairs], [q for _, q in pairs], seq_len=config.seq_len)
    schedule = improve_schedule([len(phase) for phase in phases], config.batch_size, steps=c.improve_steps,
                                epochs=c.improve_epochs,
                                seed=config.seed * 1_000_003 + grown)
    return rollout.Experience(rows, schedule), {**state, "grown": grown}

  return rollout.ExperienceSource(collect, workdir=context.workdir, batch_size=config.batch_size)


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(train_losses.next_token_loss, z_loss=config.z_loss)


METHOD = Method(name="rest", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate)
