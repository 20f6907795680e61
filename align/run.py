"""An alignment run: a method's loss and data on the one trainer loop of train/, with the task's
exact-match accuracy (and, optionally, the KL to the starting policy) measured before and after."""

import jax
import ml_collections

from align import distill, dpo, evaluation, grpo, ppo, rest, reward_model, sft
from align.tasks import arithmetic
from configs import validation
from configs.align import common as align_common
from train import trainer

# A method is a module with loss_fn(config) and make_dataset(config, tokenizer, *, split, **context),
# and optionally validate(config), wrap(decoder, ...) (the module it trains around the decoder) and
# eval_prompt(config, problem) (how its policy is asked at test time).
METHODS = {"sft": sft, "dpo": dpo, "reward": reward_model, "ppo": ppo, "grpo": grpo, "rest": rest, "distill": distill}


def _reference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return align_common.align_config(config.get("method", "sft"))


def validate(config: ml_collections.ConfigDict) -> None:
  trainer.validate(config, _reference(config))
  if config.method not in METHODS:
    raise validation.ConfigError(f"config.method={config.method!r} is not one of {sorted(METHODS)}")
  for block in ("sft", "dpo", "rl"):
    if config[block].on_error not in ("raise", "skip"):
      raise validation.ConfigError(f"config.{block}.on_error={config[block].on_error!r} must be 'raise' or 'skip'")
  if config.task.name not in ("", "arithmetic"):
    raise validation.ConfigError(f"config.task.name={config.task.name!r} must be '' or 'arithmetic'")
  if config.dpo.loss_type not in dpo.LOSS_TYPES:
    raise validation.ConfigError(f"config.dpo.loss_type={config.dpo.loss_type!r} is not one of {dpo.LOSS_TYPES}")
  if not 0 <= config.dpo.label_smoothing < 0.5:
    raise validation.ConfigError(f"config.dpo.label_smoothing={config.dpo.label_smoothing} must be in [0, 0.5)")
  if config.dpo.pairs not in ("data", "ai_feedback"):
    raise validation.ConfigError(f"config.dpo.pairs={config.dpo.pairs!r} must be 'data' or 'ai_feedback'")
  if config.dpo.beta <= 0:
    raise validation.ConfigError(f"config.dpo.beta={config.dpo.beta} must be > 0")
  if config.rl.reward not in (*arithmetic.REWARDS, "model"):
    raise validation.ConfigError(f"config.rl.reward={config.rl.reward!r} must be one of {(*arithmetic.REWARDS, 'model')}")
  for key in ("prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "epochs"):
    if config.rl[key] < 1:
      raise validation.ConfigError(f"config.rl.{key}={config.rl[key]} must be >= 1")
  if config.task.sampled_samples < 0 or config.task.sampled_temperature <= 0:
    raise validation.ConfigError(f"config.task.sampled_samples={config.task.sampled_samples} must be >= 0 and "
                                 f"config.task.sampled_temperature={config.task.sampled_temperature} > 0")
  if config.rl.shuffle_rewards and config.method not in ("ppo", "grpo"):
    raise validation.ConfigError(f"config.rl.shuffle_rewards is a control of the policy-gradient methods "
                                 f"(ppo, grpo); config.method={config.method!r} does not use it")
  if config.rl.temperature <= 0:
    raise validation.ConfigError(f"config.rl.temperature={config.rl.temperature} must be > 0 (the losses divide by it)")
  method = METHODS[config.method]
  if hasattr(method, "validate"):
    try:
      method.validate(config)
    except ValueError as e:
      raise validation.ConfigError(str(e)) from e


def _problems(config):
  return arithmetic.problems(config.task.accuracy_problems, difficulty=config.task.difficulty, seed=config.task.seed + 1)


def _scores(run: trainer.Run) -> dict[str, float]:
  """Greedy scores (accuracy = exact match, digits, solution) and, with task.sampled_samples, the
  sampled ones (sampled_exact, sampled_digits, sampled_solution, pass_at_k)."""
  c = run.config
  method = METHODS[c.method]
  prompt_of = (lambda p: method.eval_prompt(c, p)) if hasattr(method, "eval_prompt") else (lambda p: p.prompt)
  problems, policy = _problems(c), run.policy()
  scores = evaluation.task_scores(policy, run.tokenizer, problems, max_new_tokens=c.task.accuracy_tokens,
                                  rules=run.rules, prompt_of=prompt_of)
  scores["accuracy"] = scores.pop("exact")
  if c.task.sampled_samples > 0:
    sampled = evaluation.sampled_scores(policy, run.tokenizer, problems, samples=c.task.sampled_samples,
                                        temperature=c.task.sampled_temperature, max_new_tokens=c.task.accuracy_tokens,
                                        seed=c.seed + 1, rules=run.rules, prompt_of=prompt_of)
    scores.update({f"sampled_{k}": v for k, v in sampled.items() if k != "pass@k"}, pass_at_k=sampled["pass@k"])
  return scores


def _report(config, result: dict) -> None:
  """One line per score: before -> after, and the KL to the starting policy."""
  t = config.task
  names = {"accuracy": "exact-match accuracy (greedy)", "digits": "answer digits right (greedy)",
           "solution": "worked solution right (greedy)",
           "sampled_exact": f"exact match of one sample at T={t.sampled_temperature}",
           "sampled_solution": f"worked solution right, one sample at T={t.sampled_temperature}",
           "pass_at_k": f"pass@{t.sampled_samples} (exact) at T={t.sampled_temperature}"}
  print(f"on {t.accuracy_problems} held-out problems:")
  for key, name in names.items():
    if f"{key}_after" in result:
      before = result.get(f"{key}_before")
      print(f"  {name}: " + (f"{before:.3f} before, " if before is not None else "") + f"{result[key + '_after']:.3f} after")
  if "kl_to_start" in result:
    print(f"  KL to the starting policy: {result['kl_to_start']:.3f} nats per completion")


def _kl_to_start(run: trainer.Run) -> float:
  """KL(policy || the init_from policy) on the held-out problems' prompts (nats per completion)."""
  c = run.config
  start, _ = trainer.load_decoder(c.init_from, run.mesh, run.rules, {})
  prompts = [p.prompt for p in _problems(c)]
  return evaluation.kl_to_reference(run.policy(), start, run.tokenizer, prompts, max_new_tokens=c.task.accuracy_tokens,
                                    seed=c.seed, rules=run.rules)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.method` in `workdir`; returns the trainer's result plus, on the task, each score
  of _scores before and after (accuracy_before/after: greedy exact match; digits_*, solution_*,
  and with task.sampled_samples sampled_exact_*, sampled_solution_*, pass_at_k_*) and the KL to
  the starting policy (kl_to_start, when task.measure_kl)."""
  validate(config)
  method = METHODS[config.method]
  run_ = trainer.setup(config, workdir, loss_fn=method.loss_fn(config), make_dataset=method.make_dataset,
                       reference=_reference(config), wrap_model=getattr(method, "wrap", None))
  # Accuracy is measured by generating answers: a policy's business, not a reward model's.
  measure = config.task.accuracy_problems > 0 and config.task.name == "arithmetic" and config.method != "reward"
  result = {}
  if measure and int(run_.state["step"]) == 0:
    result.update({f"{key}_before": value for key, value in _scores(run_).items()})
  result.update(trainer.train_loop(run_))
  if measure:
    result.update({f"{key}_after": value for key, value in _scores(run_).items()})
    if config.task.measure_kl and config.init_from:
      result["kl_to_start"] = _kl_to_start(run_)
  if jax.process_index() == 0 and measure:
    _report(config, result)
  result["run"] = run_
  return result
