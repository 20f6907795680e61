"""Sample, filter, fine-tune: ReST, RAFT, rejection-sampling fine-tuning, STaR and self-improvement
by self-consistency on one machinery.

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
         those that reach it, trained *without* the hint; fine-tune; repeat. By default fine-tuning
         continues from the live policy, as in ReST, and rest.improve_epochs (a few passes over what
         each grow kept) bounds overfitting. With rest.star_restart, as the paper runs it, every
         outer iteration samples from the live policy, then fine-tunes from the *starting* policy
         (parameters and optimizer state: train.trainer.restart) on every rationale kept so far,
         for rest.restart_steps * (1 + rest.restart_growth)^k steps at outer iteration k (40 and
         +20% in the paper), which bounds how far the model drifts. The paper's outer iteration
         samples the whole train set; here each samples rl.prompts_per_iteration prompts, so the
         set grows across iterations instead.
  self_consistency   LMSI (Huang et al. 2022, "Large Language Models Can Self-Improve"): no label
         and no reward. Per prompt, rl.samples_per_prompt reasoning paths; each path's final answer
         read by the task's extractor (align/tasks; without a task, align/tasks/answers.py's
         default); the majority answer wins (select_majority) and the paths stating it are kept
         when its votes are at least rest.min_agreement of the prompt's paths. The reward function
         is never built. Where a task knows the gold answers, the share of kept paths that are
         right is logged (kept_right), a diagnostic that selects nothing.

An iteration whose filter keeps nothing grows again on the next prompts (a warning says so).
"""

import functools
import logging
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from align import online, rollout
from align.method import Method, check_choice
from align.tasks import Task, answers, split_problems
from infer import test_time
from train import flops as flops_lib
from train import losses as train_losses

MODES = ("rest", "raft", "rejection_sampling", "star", "self_consistency")
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


def select_majority(stated: Sequence[str | None], n: int, min_agreement: float) -> tuple[np.ndarray, list[str | None]]:
  """Self-consistency's filter on the answers the samples state, per group of n consecutive
  samples (one prompt's; None: the sample states no answer).

  The group's majority answer among the samples that state one (infer.test_time.majority_vote:
  among tied answers, the one stated first, by the lowest sample index), kept when its votes are
  at least min_agreement of all n samples: a sample without an answer never votes and never is
  kept, but counts against the agreement (one answer among n unreadable paths is no consensus).
  Returns the indices of the samples kept [K] (ascending) and each group's majority answer (None
  where the group kept nothing)."""
  if len(stated) % n:
    raise ValueError(f"{len(stated)} answers do not split into groups of n={n}")
  kept, majority = [], []
  for start in range(0, len(stated), n):
    group = stated[start: start + n]
    answer, votes, _ = test_time.majority_vote(group)
    if answer is None or votes / n < min_agreement:
      majority.append(None)
      continue
    majority.append(answer)
    kept += [start + i for i, a in enumerate(group) if a == answer]
  return np.asarray(kept, np.int64), majority


def restart_steps(iteration: int, start: int, growth: float) -> int:
  """STaR's fine-tuning length at outer iteration k (from 0): floor(start * (1 + growth)^k + 1/2),
  the paper's 40 steps growing by 20% per outer iteration (start=40, growth=0.2: 40, 48, 58, 69...)."""
  return int(np.floor(start * (1.0 + growth) ** iteration + 0.5))


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
  c = config.rest
  check_choice(config, "rest.mode", MODES)
  online.validate_rl(config, task, reward=c.mode != "self_consistency")
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
  if not 0 <= c.min_agreement <= 1:
    raise ValueError(f"config.rest.min_agreement={c.min_agreement} is out of [0, 1]")
  if c.mode == "self_consistency" and config.rl.samples_per_prompt < 2:
    raise ValueError(f"config.rl.samples_per_prompt={config.rl.samples_per_prompt}: rest.mode='self_consistency' "
                     "votes among several samples per prompt (>= 2)")
  _validate_restart(config)


def _validate_restart(config: ml_collections.ConfigDict) -> None:
  c, o = config.rest, config.optimizer
  if c.restart_steps < 1:
    raise ValueError(f"config.rest.restart_steps={c.restart_steps} must be >= 1")
  if c.restart_growth < 0:
    raise ValueError(f"config.rest.restart_growth={c.restart_growth} must be >= 0")
  if not c.star_restart:
    return
  if c.mode != "star":
    raise ValueError(f"config.rest.star_restart is STaR's (rest.mode='star'); config.rest.mode={c.mode!r}")
  # Each restart starts a new fine-tuning run's optimizer, whose schedule starts over: only a flat
  # one without warmup keeps the logged learning rate (the run's step's) the one applied.
  if o.schedule != "constant" or o.warmup_steps:
    raise ValueError(f"config.optimizer.schedule={o.schedule!r} with warmup_steps={o.warmup_steps}: "
                     "config.rest.star_restart restarts the optimizer each outer iteration and needs "
                     "schedule='constant' and warmup_steps=0")


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


def _self_consistent_samples(sampler, prompts, iteration, extract: Callable[[str], str | None], n: int,
                             min_agreement: float, gold: dict[str, str] | None):
  """Self-consistency's pass: n paths per prompt, kept by select_majority on their extracted
  answers alone. Returns training (prompt ids, completion ids) pairs and counts; with `gold`
  (prompt -> the task's answer), read only after the selection, the share of kept paths that are right."""
  samples = sampler(prompts, iteration)
  stated = [extract(text) for text in samples.texts]
  kept, majority = select_majority(stated, n, min_agreement)
  summary = {"kept": len(kept), "prompts_kept": sum(m is not None for m in majority),
             "unparsed": sum(a is None for a in stated)}
  if gold is not None and len(kept):
    summary["kept_right"] = float(np.mean([stated[i] == gold[prompts[i // n]] for i in kept]))
  return [(samples.prompt_ids[i], samples.completion_ids[i]) for i in kept], summary


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  live, rules = context.live, context.rules
  if split != "train":
    raise ValueError(f"{config.rest.mode} has no held-out loss (set config.eval_every=0)")
  c, rl = config.rest, config.rl
  pool = online.prompts(config, task)
  train_problems = split_problems(task, config.task, "train") if task is not None else []
  # Self-consistency reads no reward: none is built (a reward model is never even loaded).
  meter = flops_lib.Meter()
  reward_fn = (None if c.mode == "self_consistency" else
               online.reward_fn(config, task, tokenizer, mesh=context.mesh, rules=rules, meter=meter))
  hints = {p.prompt: p.hint() for p in train_problems} if c.mode == "star" else {}
  extract = task.extract_answer if task is not None else answers.extract
  gold = {p.prompt: p.answer for p in train_problems} if task is not None else None
  sampler = online.Sampler(live, tokenizer, config, rules, meter=meter)
  if c.star_restart:
    _warn_partial_restart(config)
  accumulated: dict[int, dict[str, np.ndarray]] = {}  # STaR restart: the last experience's rows

  def grow(iteration: int):
    """(prompt ids, completion ids) to train on, as [phase][pair], and a summary."""
    prompts = online.prompt_batch(pool, iteration, rl.prompts_per_iteration, seed=config.seed)
    if c.mode == "star":
      keep, summary = _star_samples(sampler, tokenizer, prompts, iteration, reward_fn, c.min_reward, hints.__getitem__)
      return [keep], summary
    if c.mode == "self_consistency":
      keep, summary = _self_consistent_samples(sampler, prompts, iteration, extract, rl.samples_per_prompt,
                                               c.min_agreement, gold)
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

  def previous_rows(iteration: int) -> dict[str, np.ndarray]:
    """The rows of the experience before `iteration`: kept from the last collect, or, in a resumed
    run, read back from the workdir (the very arrays the straight run trained on)."""
    if iteration - 1 in accumulated:
      return accumulated[iteration - 1]
    path = rollout.experience_path(context.workdir, iteration - 1)
    if not path.exists():
      raise FileNotFoundError(f"config.rest.star_restart: iteration {iteration} trains on every rationale kept "
                              f"so far, which iteration {iteration - 1} saved in {path}; it is missing")
    return rollout.load_experience(path)[0].rows

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
      rule = {"rest": f"reward thresholds {tuple(c.thresholds)}",
              "self_consistency": f"min_agreement {c.min_agreement}"}.get(c.mode, f"min_reward {c.min_reward}")
      raise RuntimeError(f"{c.mode}: {_MAX_EMPTY_GROWS} grows in a row kept no sample ({rule}); is the starting "
                         "policy able to solve any prompt at all?")
    pairs = [p for phase in phases for p in phase]
    rows = rollout.sft_rows([p for p, _ in pairs], [q for _, q in pairs], seq_len=config.seq_len)
    seed = config.seed * 1_000_003 + grown
    if not c.star_restart:
      schedule = improve_schedule([len(phase) for phase in phases], config.batch_size, steps=c.improve_steps,
                                  epochs=c.improve_epochs, seed=seed)
      return rollout.Experience(rows, schedule), {**state, "grown": grown}
    # STaR as the paper runs it: every rationale kept so far, from the starting policy.
    if iteration > 0:
      rows = {k: np.concatenate([v, rows[k]]) for k, v in previous_rows(iteration).items()}
    accumulated.clear()
    accumulated[iteration] = rows
    steps = restart_steps(iteration, c.restart_steps, c.restart_growth)
    logging.info("star outer iteration %d: %d rationales kept so far, %d steps from the start", iteration,
                 len(rows["tokens"]), steps)
    schedule = rollout.cycle_schedule(np.arange(len(rows["tokens"])), config.batch_size, steps=steps, seed=seed)
    # Iteration 0 already starts from the start: no restart to ask for.
    return rollout.Experience(rows, schedule, restart=iteration > 0), {**state, "grown": grown}

  return rollout.ExperienceSource(collect, workdir=context.workdir, batch_size=config.batch_size, meter=meter)


def _warn_partial_restart(config: ml_collections.ConfigDict) -> None:
  """A warning when total_steps ends an outer iteration's fine-tuning part way: the final policy is then a
  fine-tune from the start cut short, not the last iteration's whole one."""
  c, ends = config.rest, [0]
  while ends[-1] < config.total_steps:
    ends.append(ends[-1] + restart_steps(len(ends) - 1, c.restart_steps, c.restart_growth))
  if ends[-1] != config.total_steps:
    logging.warning("config.total_steps=%d ends STaR's outer iteration %d after %d of its %d steps (whole "
                    "iterations end at %s)", config.total_steps, len(ends) - 2, config.total_steps - ends[-2],
                    ends[-1] - ends[-2], ends[1:])


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(train_losses.next_token_loss, z_loss=config.z_loss)


METHOD = Method(name="rest", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate)
