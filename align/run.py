"""An alignment run: a method's loss and data on the one trainer loop of train/, with the task's
held-out scores (and, optionally, the KL to the starting policy) measured before and after."""

import functools

import jax
import ml_collections

import rundir
from align import evaluation, registry
from align.method import Method
from align.tasks import Task, get_task
from configs import validation
from configs.align import common as align_common
from model import peft
from train import trainer


def _reference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return align_common.align_config(config.get("method", "sft"))


def _check_task_block(config: ml_collections.ConfigDict) -> None:
  t = config.task
  if t.sampled_samples < 0 or t.sampled_temperature <= 0:
    raise validation.ConfigError(f"config.task.sampled_samples={t.sampled_samples} must be >= 0 and "
                                 f"config.task.sampled_temperature={t.sampled_temperature} > 0")
  for key in ("accuracy_problems", "accuracy_tokens", "train_size", "eval_size", "score_every"):
    if t[key] < 0:
      raise validation.ConfigError(f"config.task.{key}={t[key]} must be >= 0")


def validate(config: ml_collections.ConfigDict) -> tuple[Method, Task | None]:
  """Start-up checks of the whole config, before anything trains; returns the method and the task
  (the task's files are read here, so a bad one is named now)."""
  try:
    method = registry.get_method(config.get("method"))
  except ValueError as e:
    raise validation.ConfigError(str(e)) from e
  trainer.validate(config, _reference(config))
  _check_task_block(config)
  try:
    task = get_task(config.task)
    method.validate(config, task)
  except (ValueError, FileNotFoundError) as e:
    raise validation.ConfigError(str(e)) from e
  return method, task


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[trainer.Run, Method, Task | None]:
  """The trainer's Run for `config.method`, after validate; a notebook can step it itself."""
  method, task = validate(config)
  run = trainer.setup(config, workdir, loss_fn=method.loss_fn(config),
                      make_dataset=functools.partial(method.make_dataset, task=task),
                      reference=_reference(config), wrap_model=method.wrap, row_flops=method.row_flops,
                      flops_note=method.flops_note)
  return run, method, task


def _problems(config: ml_collections.ConfigDict, task: Task):
  return task.split("eval", config.task.accuracy_problems, config.task.seed)


def _scores(run: trainer.Run, method: Method, task: Task) -> dict[str, float]:
  """Greedy scores (accuracy = exact match, and each other reward of the task) and, with
  task.sampled_samples, the sampled ones (sampled_<reward>, pass_at_k, best_of_n, self_consistency)."""
  c = run.config
  problems, policy = _problems(c, task), run.policy()
  asked = dict(prompt_of=method.prompt_of(c), response_of=method.response_of(c))
  scores = evaluation.task_scores(policy, run.tokenizer, problems, task, max_new_tokens=c.task.accuracy_tokens,
                                  rules=run.rules, **asked)
  scores["accuracy"] = scores.pop("exact")
  if c.task.sampled_samples > 0:
    sampled = evaluation.sampled_scores(policy, run.tokenizer, problems, task, samples=c.task.sampled_samples,
                                        temperature=c.task.sampled_temperature, max_new_tokens=c.task.accuracy_tokens,
                                        seed=c.seed + 1, rules=run.rules, **asked)
    pass_at_k, best, consistent = sampled.pop("pass@k"), sampled.pop("best_of_n"), sampled.pop("self_consistency")
    scores.update({f"sampled_{k}": v for k, v in sampled.items()}, pass_at_k=pass_at_k, best_of_n=best,
                  self_consistency=consistent)
  return scores


def _report(config, result: dict) -> None:
  """One line per score: before -> after, and the KL to the starting policy."""
  t = config.task
  k, temp = t.sampled_samples, t.sampled_temperature
  names = {"accuracy": "exact-match accuracy (greedy)", "digits": "answer digits right (greedy)",
           "solution": "worked solution right (greedy)", "sampled_exact": f"exact match of one sample at T={temp}",
           "sampled_solution": f"worked solution right, one sample at T={temp}",
           "pass_at_k": f"pass@{k} (exact) at T={temp}", "best_of_n": f"best-of-{k} (exact) at T={temp}",
           "self_consistency": f"self-consistency over {k} samples (exact) at T={temp}"}
  measured = [key[: -len("_after")] for key in result if key.endswith("_after")]
  # The names above in their order, then a task's own rewards (greedy, then sampled).
  keys = [k for k in names if k in measured] + sorted(k for k in measured if k not in names)
  print(f"on {t.accuracy_problems} held-out problems of task {t.name!r}:")
  for key in keys:
    name = names.get(key) or (f"{key[len('sampled_'):]}, one sample at T={temp}" if key.startswith("sampled_")
                              else f"{key} (greedy)")
    before = result.get(f"{key}_before")
    print(f"  {name}: " + (f"{before:.3f} before, " if before is not None else "") + f"{result[key + '_after']:.3f} after")
  if "kl_to_start" in result:
    print(f"  KL to the starting policy: {result['kl_to_start']:.3f} nats per completion")


def _kl_to_start(run: trainer.Run, task: Task) -> float:
  """KL(policy || the init_from policy) on the held-out problems' prompts (nats per completion)."""
  c = run.config
  if rundir.loading.peft_on(c):  # the starting policy is the base: the policy with its adapters off
    start = peft.without_adapters(run.policy())
  else:
    start, _ = rundir.load_decoder(c.init_from, mesh=run.mesh, rules=run.rules, key="config.init_from")
  prompts = [p.prompt for p in _problems(c, task)]
  return evaluation.kl_to_reference(run.policy(), start, run.tokenizer, prompts, max_new_tokens=c.task.accuracy_tokens,
                                    seed=c.seed, rules=run.rules)


def _measured(run_: trainer.Run, method: Method, task: Task) -> dict[str, float]:
  """_scores, and the KL to the starting policy when task.measure_kl (0 at step 0)."""
  scores = _scores(run_, method, task)
  if run_.config.task.measure_kl and run_.config.init_from:
    scores["kl_to_start"] = _kl_to_start(run_, task) if int(run_.state["step"]) else 0.0
  return scores


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.method` in `workdir`; returns the trainer's result plus, on the task, each score
  of _scores before and after (accuracy_before/after: greedy exact match; <reward>_*, and with
  task.sampled_samples sampled_<reward>_*, pass_at_k_*, best_of_n_*, self_consistency_*) and the KL
  to the starting policy (kl_to_start, when task.measure_kl). With task.score_every = N the same
  scores are also measured every N steps and written to the metrics as eval_<score> records (the
  curves of held-out accuracy against step and training wall time that `train.plot` draws)."""
  run_, method, task = setup(config, workdir)
  # Scores are measured by generating answers: a policy's business, not a reward model's.
  measure = config.task.accuracy_problems > 0 and task is not None and method.generates
  every = config.task.score_every if measure else 0
  measured: list[tuple[int, dict[str, float]]] = []  # (step, scores) of each measure the loop takes

  def measure_fn(r: trainer.Run) -> dict[str, float]:
    measured.append((int(r.state["step"]), _measured(r, method, task)))
    return measured[-1][1]

  result = {}
  if measure and int(run_.state["step"]) == 0 and not every and config.task.score_at_start:
    measure_fn(run_)  # the "before" scores; with score_every the loop's Measure takes them at step 0
  along = trainer.Measure(every, measure_fn, at_start=config.task.score_at_start) if every else None
  result.update(trainer.train_loop(run_, measure=along))
  if measured and measured[0][0] == 0:
    before = {k: v for k, v in measured[0][1].items() if k != "kl_to_start"}
    result.update({f"{key}_before": value for key, value in before.items()})
  if measure:
    if measured and measured[-1][0] == int(run_.state["step"]):
      after = dict(measured[-1][1])
    else:
      after = _measured(run_, method, task)
    if "kl_to_start" in after:
      result["kl_to_start"] = after.pop("kl_to_start")
    result.update({f"{key}_after": value for key, value in after.items()})
  if jax.process_index() == 0 and measure:
    _report(config, result)
  result["run"] = run_
  return result
