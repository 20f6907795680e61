"""PPO RLHF (InstructGPT, Ouyang et al. 2022; the recipe of Ziegler et al. 2019 as TRL runs it).

Per iteration (align/rollout.py's ExperienceSource calls `collect`): sample a completion for each
of rl.prompts_per_iteration prompts from the live policy; score it (a reward function or a reward
model), minus rl.missing_eos_penalty when it never ended; compute under the rollout policy its
per-token log-probs and values, and under the frozen reference its log-probs; per-token rewards
-kl_coef * KL_t (estimator k1 or k3) with the score added at the last token; GAE(gamma, lambda) on
device; whitened advantages. Then rl.epochs passes of shuffled minibatches, one trainer step each,
on the clipped policy loss plus vf_coef times the clipped value loss. The KL coefficient is fixed
or adaptive (target KL and horizon) and rides in the data iterator's state.

The trained module is `PolicyValue`: the policy decoder, a value function (a scalar head on the
policy's own features, or a separate decoder with a head, initialized from the starting policy or
from a reward model as InstructGPT does), and the frozen reference under `frozen` (not trained,
not saved: it is rebuilt from init_from on resume).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import rundir
from align import online, reward_model, rl_losses, rollout
from align.method import Method, check_choice
from align.tasks import Task
from model import sharding
from train import flops as flops_lib
from train import losses as train_losses

VALUES = ("head", "model")
KL_ESTIMATORS = ("k1", "k3")


class PolicyValue(nnx.Module):
  """`model(tokens [B, T]) -> (logits [B, T, V], values [B, T])`; values[:, j] is the value of the
  state after tokens[:, :j + 1], before target j is emitted."""

  def __init__(self, decoder, head: jax.Array, reference, value_decoder=None):
    self.decoder = decoder  # the policy: what generates and what the run's checkpoints export
    self.config = decoder.config
    self.value_head = nnx.Param(head, out_sharding=("embed",), eager_sharding=False)  # [D]
    self.value_decoder = value_decoder  # None: the head reads the policy's features
    self.frozen = reference  # the reference policy (not trained); None with adapters (online.reference_policy)

  def values(self, features: jax.Array) -> jax.Array:
    return jnp.einsum("BTD,D->BT", features.astype(jnp.float32), self.value_head[...].astype(jnp.float32))

  def __call__(self, tokens: jax.Array):
    features, _ = self.decoder.features(tokens)
    logits = self.decoder.logits(features)
    value_features = features if self.value_decoder is None else self.value_decoder.features(tokens)[0]
    return logits, self.values(value_features)


def wrap(decoder, *, mesh, rules, seed: int, config: ml_collections.ConfigDict, load) -> PolicyValue:
  """The policy plus its value function and frozen reference. `load(path)` is the trainer's
  init_from loader (a fresh copy of a run's or Hugging Face directory's decoder)."""
  del seed
  c = config.ppo
  # With adapters (config.peft) the reference is the policy with its adapters off: no second copy.
  reference = None if rundir.loading.peft_on(config) else load(config.init_from)
  d = decoder.config.embed_dim
  head_sharding = NamedSharding(mesh, sharding.logical_to_spec(("embed",), (d,), mesh, rules))
  head, value_decoder = jnp.zeros((d,), jnp.float32), None
  if c.value == "model":
    if c.value_init:  # a reward model: InstructGPT initializes the value function from it
      rm = reward_model.load(c.value_init, mesh=mesh, rules=rules)
      value_decoder, head = rm.decoder, rm.head[...]
    else:
      value_decoder = load(config.init_from)
  return PolicyValue(decoder, jax.device_put(head, head_sharding), reference, value_decoder)


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  online.validate_rl(config, task)
  c = config.ppo
  if not config.init_from:
    raise ValueError("config.init_from is empty: PPO needs the starting policy (also the frozen reference)")
  check_choice(config, "ppo.value", VALUES)
  check_choice(config, "ppo.kl_estimator", KL_ESTIMATORS)
  if not (0 <= c.gamma <= 1 and 0 <= c.lam <= 1):
    raise ValueError(f"config.ppo.gamma={c.gamma} and config.ppo.lam={c.lam} must be in [0, 1]")
  if c.value_init and c.value != "model":
    raise ValueError(f"config.ppo.value_init={c.value_init!r} needs config.ppo.value='model'")


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _policy_and_values(graphdef, state, tokens, targets, *, temperature: float):
  logits, values = nnx.merge(graphdef, state)(tokens)
  nll, _ = train_losses.token_cross_entropy(logits / temperature, targets)
  return -nll, values


def _decoders(module: PolicyValue) -> list[nnx.Module]:
  """What a forward of `module` runs: the policy, and the value model if separate (the value head's
  D FLOPs per token are left out of the counts)."""
  return [module.decoder] + ([module.value_decoder] if module.value_decoder is not None else [])


def row_flops(config: ml_collections.ConfigDict, module: PolicyValue) -> float:
  """A train step's row: one sequence through the policy and the value model, forward and backward."""
  return sum(flops_lib.trained(m.config, config.seq_len) for m in _decoders(module))


def _logprobs_and_values(module: PolicyValue, tokens, targets, *, temperature, batch_size):
  graphdef, state = nnx.split(module)
  fn = functools.partial(_policy_and_values, graphdef, state, temperature=float(temperature))
  return rollout.in_chunks(fn, tokens, targets, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("estimator", "gamma", "lam"))
def _advantages(old_logprobs, ref_logprobs, values, scores, mask, kl_coef, *, estimator, gamma, lam):
  """Per-token rewards (-kl_coef * KL_t, plus the score at the last completion token), GAE, whitening."""
  mask = mask.astype(jnp.float32)
  kl = jnp.where(mask > 0, rl_losses.kl_penalty(old_logprobs, ref_logprobs, estimator), 0.0)  # [R, T]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1]), -1), axis=1)  # [R]
  at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32)
  rewards = -kl_coef * kl + at_last * scores[:, None]
  advantages, returns = rl_losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
  return rl_losses.whiten(advantages, mask), returns, jnp.sum(kl, axis=1)


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  live, rules = context.live, context.rules
  if split != "train":
    raise ValueError("PPO has no held-out loss (set config.eval_every=0); it is measured by generation")
  c, rl = config.ppo, config.rl
  pool = online.prompts(config, task)
  meter = flops_lib.Meter()
  reward_fn = online.reward_fn(config, task, tokenizer, mesh=context.mesh, rules=rules, meter=meter)
  sampler = online.Sampler(lambda: live().decoder, tokenizer, config, rules, meter=meter)
  rows_per_iteration = rl.prompts_per_iteration * rl.samples_per_prompt

  def collect(iteration: int, state: dict):
    module = live()
    samples, rows, scores = online.scored_rollout(sampler, reward_fn, pool, iteration, config)
    old_logprobs, values = _logprobs_and_values(module, rows["tokens"], rows["targets"], temperature=rl.temperature,
                                                batch_size=config.batch_size)
    reference = online.reference_policy(module)
    ref_logprobs = rollout.token_logprobs(reference, rows["tokens"], rows["targets"],
                                          temperature=rl.temperature, batch_size=config.batch_size)
    for scored in (*_decoders(module), reference):
      meter.add(flops_lib.frozen(scored.config, config.seq_len, rows_per_iteration))
    kl_coef = float(state.get("kl_coef", c.kl_coef))
    advantages, returns, kl = _advantages(old_logprobs, ref_logprobs, values, jnp.asarray(scores, jnp.float32),
                                          rows["mask"], kl_coef, estimator=c.kl_estimator, gamma=c.gamma, lam=c.lam)
    advantages, returns, kl = (sharding.to_host(x) for x in (advantages, returns, kl))
    if c.adaptive_kl:
      state["kl_coef"] = float(rl_losses.adaptive_kl_coef(kl_coef, float(kl.mean()), rows_per_iteration,
                                                          target=c.target_kl, horizon=c.kl_horizon))
    logging.info("PPO iteration %d: reward %.3f, KL %.3f, kl_coef %.4f, finished %.2f", iteration, scores.mean(),
                 kl.mean(), kl_coef, samples.finished.mean())
    rows.update(old_logprobs=old_logprobs, old_values=values, advantages=advantages, returns=returns,
                score=scores.astype(np.float32), kl=kl.astype(np.float32),
                kl_coef=np.full(rows_per_iteration, kl_coef, np.float32))
    schedule = rollout.epoch_schedule(rows_per_iteration, config.batch_size, epochs=rl.epochs,
                                      seed=config.seed * 1_000_003 + iteration)
    return rollout.Experience(rows, schedule), state

  return rollout.ExperienceSource(collect, workdir=context.workdir, batch_size=config.batch_size,
                                  initial_state={"kl_coef": float(c.kl_coef)}, meter=meter)


def ppo_loss_fn(model: PolicyValue, batch, rng, *, temperature: float, clip: float, value_clip: float,
                vf_coef: float, whole_batch=None):
  """Clipped surrogate + vf_coef * clipped value loss (token means over the minibatch's completions,
  counted on the whole batch: train.step.LossFn)."""
  del rng
  mask = batch["mask"].astype(jnp.float32)
  whole_mask = train_losses.whole(batch, whole_batch)["mask"]
  logits, values = model(batch["tokens"])
  logits = logits / temperature
  nll, _ = train_losses.token_cross_entropy(logits, batch["targets"])
  policy_loss, metrics = rl_losses.clipped_policy_loss(-nll, batch["old_logprobs"], batch["advantages"], mask,
                                                       clip_low=clip, clip_high=clip, aggregation="token_mean",
                                                       whole_mask=whole_mask)
  value_loss, value_metrics = rl_losses.clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                           clip=value_clip, whole_mask=whole_mask)
  entropy = rl_losses.masked_mean(rl_losses.entropy_from_logits(jax.lax.stop_gradient(logits)), mask)
  metrics.update(value_metrics)
  metrics.update({
      "policy/entropy": entropy, "reward/mean": jnp.mean(batch["score"]), "kl/reference": jnp.mean(batch["kl"]),
      "kl/coef": jnp.mean(batch["kl_coef"]), "weight": jnp.sum(mask), "tokens": jnp.sum(mask),
  })
  return policy_loss + vf_coef * value_loss, metrics


def loss_fn(config: ml_collections.ConfigDict):
  c = config.ppo
  return functools.partial(ppo_loss_fn, temperature=config.rl.temperature, clip=c.clip, value_clip=c.value_clip,
                           vf_coef=c.vf_coef)


METHOD = Method(name="ppo", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, wrap=wrap,
                row_flops=row_flops)
