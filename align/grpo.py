"""GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024): no value model; the
baseline comes from the other samples of the same prompt.

Per iteration: G = rl.samples_per_prompt samples for each of rl.prompts_per_iteration prompts from
the live policy, scored; one advantage per sample, broadcast over its tokens:
  grpo  (r - mean of its group) / (std of its group + eps)  (grpo.normalize='none': Dr. GRPO's r - mean)
  rloo  r - mean of the *other* G - 1 samples of its group
The loss is PPO's clipped surrogate with separate low/high epsilons (DAPO's clip-higher), plus
grpo.kl_coef times the k3 estimate of KL(policy || reference) per token when kl_coef > 0 (the
reference is then kept frozen beside the policy), aggregated per grpo.aggregation:
'sequence_mean' (GRPO's), 'token_mean' (DAPO) or 'fixed_length' (Dr. GRPO). rl.epochs > 1 reuses
each iteration's samples, with the rollout policy's log-probs as the ratio's denominator (scored
apart only when the iteration is more than one optimizer step: `on_policy`).

grpo.dynamic_sampling (DAPO, Yu et al. 2025): a group whose samples all score alike has advantage 0
on every token, so (without the KL term) it adds nothing to the gradient but its cost and a share
of the normalizer. With it, an iteration samples rounds of grpo.sampling_prompts prompts and keeps
only the groups whose rewards differ until it has rl.prompts_per_iteration of them, so every row
trained carries signal; after grpo.max_sampling_rounds rounds, flat groups fill what is missing.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import rundir
from align import online, rl_losses, rollout
from align.method import Method, check_choice
from align.tasks import Task
from model import sharding
from train import flops as flops_lib
from train import losses as train_losses

ADVANTAGES = ("grpo", "rloo")
NORMALIZE = ("std", "none")
AGGREGATIONS = ("sequence_mean", "token_mean", "fixed_length")


class PolicyWithReference(nnx.Module):
  """The policy (`decoder`, trained) and the frozen reference (under `frozen`, not trained)."""

  def __init__(self, decoder, reference):
    self.decoder = decoder
    self.config = decoder.config
    self.frozen = reference

  def __call__(self, tokens):
    return self.decoder(tokens)


def wrap(decoder, *, mesh, rules, seed: int, config: ml_collections.ConfigDict, load):
  """A frozen reference beside the policy only when the loss needs it (grpo.kl_coef > 0)."""
  del mesh, rules, seed
  if config.grpo.kl_coef <= 0 or rundir.loading.peft_on(config):  # with adapters: the base is the reference
    return decoder
  return PolicyWithReference(decoder, load(config.init_from))


def policy_of(module):
  return getattr(module, "decoder", module)


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  online.validate_rl(config, task)
  c = config.grpo
  check_choice(config, "grpo.advantage", ADVANTAGES)
  check_choice(config, "grpo.normalize", NORMALIZE)
  check_choice(config, "grpo.aggregation", AGGREGATIONS)
  if config.rl.samples_per_prompt < 2:
    raise ValueError(f"config.rl.samples_per_prompt={config.rl.samples_per_prompt} must be >= 2: "
                     "a group needs other samples for its baseline")
  if c.kl_coef > 0 and not config.init_from:
    raise ValueError(f"config.grpo.kl_coef={c.kl_coef} needs config.init_from (the reference policy)")
  if c.dynamic_sampling:
    if c.sampling_prompts < 0:
      raise ValueError(f"config.grpo.sampling_prompts={c.sampling_prompts} must be >= 0 "
                       "(0: rl.prompts_per_iteration)")
    if c.max_sampling_rounds * sampling_prompts(config) < config.rl.prompts_per_iteration:
      raise ValueError(f"config.grpo.max_sampling_rounds={c.max_sampling_rounds} rounds of "
                       f"{sampling_prompts(config)} prompts cannot fill rl.prompts_per_iteration="
                       f"{config.rl.prompts_per_iteration} groups")


def sampling_prompts(config: ml_collections.ConfigDict) -> int:
  """The prompts one rollout samples for: rl.prompts_per_iteration, or with dynamic sampling a
  round's grpo.sampling_prompts."""
  c = config.grpo
  return (c.sampling_prompts or config.rl.prompts_per_iteration) if c.dynamic_sampling else config.rl.prompts_per_iteration


def signal_groups(scores: np.ndarray, group: int) -> np.ndarray:
  """[R / group] bool: which groups of `group` consecutive scores differ (carry a learning signal)."""
  return scores.reshape(-1, group).std(axis=1) > 0


def groups_with_signal(sample_round, config: ml_collections.ConfigDict, state: dict,
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, dict, dict]:
  """DAPO's dynamic sampling: rows [P * G, ...] and scores [P * G] of the first P =
  rl.prompts_per_iteration groups whose scores differ, over rounds `sample_round(k)` -> (rows, scores)
  for k = state["sampling_rounds"], +1, ... (a run-long count, so every round samples new prompts
  and resumes exactly); when grpo.max_sampling_rounds rounds find fewer, the first flat groups fill
  the rest. Returns the state with the count advanced and a summary of the rounds."""
  group, want = config.rl.samples_per_prompt, config.rl.prompts_per_iteration
  signal_rows, flat_rows, all_scores = [], [], []
  found, rounds, first = 0, 0, int(state.get("sampling_rounds", 0))
  while found < want and rounds < config.grpo.max_sampling_rounds:
    rows, scores = sample_round(first + rounds)
    rounds += 1
    all_scores.append(scores)
    signal = np.repeat(signal_groups(scores, group), group)  # [R] per row, by its group
    signal_rows.append(({k: v[signal] for k, v in rows.items()}, scores[signal]))
    flat_rows.append(({k: v[~signal] for k, v in rows.items()}, scores[~signal]))
    found += int(signal.sum()) // group
  parts = signal_rows + flat_rows
  rows = {k: np.concatenate([p[0][k] for p in parts])[: want * group] for k in parts[0][0]}
  scores = np.concatenate([p[1] for p in parts])[: want * group]
  summary = {"rounds": rounds, "groups_with_signal": found, "sampled_reward": float(np.concatenate(all_scores).mean())}
  return rows, scores, {**state, "sampling_rounds": first + rounds}, summary


def on_policy(config: ml_collections.ConfigDict) -> bool:
  """One optimizer step per rollout (rl.epochs 1, an iteration's rows one batch, its micro-batches
  all on the parameters that sampled it): the ratio's denominator is then the step's own
  log-probabilities, held constant, and the rollout needs no scoring forward (TRL does the same)."""
  rl = config.rl
  return rl.epochs == 1 and rl.prompts_per_iteration * rl.samples_per_prompt == config.batch_size


def advantages(scores: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """[R] per-sample advantages of rows grouped G at a time."""
  c, group = config.grpo, config.rl.samples_per_prompt
  if c.advantage == "rloo":
    return sharding.to_host(rl_losses.rloo_advantages(jnp.asarray(scores, jnp.float32), group))
  return sharding.to_host(rl_losses.group_advantages(jnp.asarray(scores, jnp.float32), group, normalize=c.normalize))


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  live, rules = context.live, context.rules
  if split != "train":
    raise ValueError("GRPO has no held-out loss (set config.eval_every=0); it is measured by generation")
  rl = config.rl
  pool = online.prompts(config, task)
  meter = flops_lib.Meter()
  reward_fn = online.reward_fn(config, task, tokenizer, mesh=context.mesh, rules=rules, meter=meter)
  sampler = online.Sampler(lambda: policy_of(live()), tokenizer, config, rules, meter=meter)
  num_rows = rl.prompts_per_iteration * rl.samples_per_prompt

  def score(model, rows):
    meter.add(flops_lib.frozen(model.config, config.seq_len, len(rows["tokens"])))
    return rollout.token_logprobs(model, rows["tokens"], rows["targets"], temperature=rl.temperature,
                                  batch_size=config.batch_size)

  def sample_round(index: int):
    _, rows, scores = online.scored_rollout(sampler, reward_fn, pool, index, config,
                                            num_prompts=sampling_prompts(config))
    return rows, scores

  def collect(iteration: int, state: dict):
    module = live()
    if config.grpo.dynamic_sampling:
      rows, scores, state, summary = groups_with_signal(sample_round, config, state)
      logging.info("%s iteration %d: %d sampling rounds, reward %.3f, %d of %d groups trained on carry a "
                   "learning signal", config.grpo.advantage, iteration, summary["rounds"], summary["sampled_reward"],
                   min(summary["groups_with_signal"], rl.prompts_per_iteration), rl.prompts_per_iteration)
    else:
      rows, scores = sample_round(iteration)
      logging.info("%s iteration %d: reward %.3f, %.0f%% of groups with a learning signal", config.grpo.advantage,
                   iteration, scores.mean(), 100 * signal_groups(scores, rl.samples_per_prompt).mean())
    if not on_policy(config):  # on-policy, the loss takes the ratio's denominator from its own forward
      rows["old_logprobs"] = score(policy_of(module), rows)
    if config.grpo.kl_coef > 0:
      rows["ref_logprobs"] = score(online.reference_policy(module), rows)
    rows["advantages"] = advantages(scores, config).astype(np.float32)
    rows["score"] = scores.astype(np.float32)
    schedule = rollout.epoch_schedule(num_rows, config.batch_size, epochs=rl.epochs,
                                      seed=config.seed * 1_000_003 + iteration)
    return rollout.Experience(rows, schedule), state

  return rollout.ExperienceSource(collect, workdir=context.workdir, batch_size=config.batch_size, meter=meter)


def grpo_loss_fn(model, batch, rng, *, temperature: float, clip_low: float, clip_high: float, kl_coef: float,
                 aggregation: str, max_length: int, whole_batch=None):
  """The clipped surrogate (+ kl_coef * k3 KL), aggregated with its normalizer counted on the whole
  batch (train.step.LossFn)."""
  del rng
  mask = batch["mask"].astype(jnp.float32)
  logits = policy_of(model)(batch["tokens"]) / temperature
  nll, _ = train_losses.token_cross_entropy(logits, batch["targets"])
  logprobs = -nll
  advantages = jnp.broadcast_to(batch["advantages"][:, None], mask.shape)
  # Without old_logprobs the batch is on-policy (`on_policy`): the ratio is 1 with the policy's gradient.
  old_logprobs = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logprobs)
  per_token, metrics = rl_losses.clipped_surrogate(logprobs, old_logprobs, advantages, mask,
                                                   clip_low=clip_low, clip_high=clip_high)
  if kl_coef > 0:  # DeepSeekMath eq. 4: the k3 estimate in the loss, not in the reward
    kl = rl_losses.kl_penalty(logprobs, batch["ref_logprobs"], "k3", mask=mask)
    per_token = per_token + kl_coef * kl
    metrics["kl/reference"] = rl_losses.masked_mean(kl, mask)
  loss = rl_losses.aggregate(per_token, mask, aggregation, max_length=max_length,
                             whole_mask=train_losses.whole(batch, whole_batch)["mask"])
  metrics.update({
      "policy/entropy": rl_losses.masked_mean(rl_losses.entropy_from_logits(jax.lax.stop_gradient(logits)), mask),
      "reward/mean": jnp.mean(batch["score"]), "tokens": jnp.sum(mask),
      "weight": rl_losses.normalizer(mask, aggregation, max_length=max_length),
  })
  return loss, metrics


def loss_fn(config: ml_collections.ConfigDict):
  c = config.grpo
  return functools.partial(grpo_loss_fn, temperature=config.rl.temperature, clip_low=c.clip_low,
                           clip_high=c.clip_high, kl_coef=c.kl_coef, aggregation=c.aggregation,
                           max_length=config.rl.max_new_tokens)


METHOD = Method(name="grpo", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, wrap=wrap)
