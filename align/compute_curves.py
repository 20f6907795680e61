"""python -m align.compute_curves --config=configs/align/compute_curves.py --config.policy=RUN \
    [--config.reward_model=RUN] [--config.sft_runs=RUN,RUN] --out=DIR

Test-time compute against train-time compute on a task: held-out accuracy against inference FLOPs
for best-of-N with the task's verifier, best-of-N with a reward model, self-consistency and budget
forcing's thinking budget, beside greedy accuracy against training FLOPs for SFT checkpoints.
Writes DIR/curves.json (every number, written atomically) and DIR/curves.png, and prints a table;
DIR/samples.json keeps the samples (and a reward model's scores of them), which a second run of the
same draw reuses (to add a reward model or SFT runs, or change the budgets, without sampling again).

The N-sample curves are nested: max(ns) samples are drawn once per problem and N uses the first N
of them, so one draw serves every N and a curve never dips because a larger N drew afresh.
Best-of-N picks the sample its ranker scores highest (the first among ties) and counts it right when
the task's exact verifier says so; with the exact verifier as the ranker that is pass@N (an oracle,
the ceiling of any verifier), also given unbiased from all samples (Chen et al. 2021, eq. 1).
Self-consistency (Wang et al. 2023) is the majority of the extracted answers.

Budget forcing (s1: Muennighoff et al. 2025) needs a thinking segment and a delimiter that ends it.
Here thinking is a worked solution, everything before the task's "\\nAnswer:" line, and the
delimiter is that line's tokens as the SFT data tokenizes them (its newline is the end-of-thinking
token). Each of config.budget_modes is a curve over the budgets B: 'maximum' forces the delimiter
after B thinking tokens (B = 0 answers at once; a B past the solution's own length changes nothing),
and 'exact' also replaces an earlier end of thinking with budget_continuation (s1's "Wait"), so a B
past the solution's length makes the model think on. A forced completion is scored on its first answer
line (past a forced prefix the model may write on, other "Answer:" lines included); one that stops
while thinking has no answer. A task whose completions have no such line is skipped, and the JSON
says why.

FLOPs (model.forward_flops, from the model config): a sample costs the forward FLOPs of all its
tokens, prompt and completion, read with a KV cache; each sample reads its own prompt (no prefix
sharing), and padding and finished rows still in a batch are not counted (an ideal engine's cost).
A reward model adds its forward over every sample it scores; the verifier and the vote are programs,
free. Training FLOPs are the trainer's flops_seen at the checkpoint (train.trainer.flops_at: its steps'
FLOPs, pairs and frozen forwards included, and its rollouts') of the run's own steps; the pre-training
its init_from had is a cost every curve shares, left out. The reward-model curve's training FLOPs
are the policy's plus the reward model's own (its flops_seen: each of its batch rows a pair of
sequences).
The trade-off panel puts both on one axis, the total cost of answering `serve_problems` problems
(as Snell et al. 2024 weigh test-time against pre-training compute): training FLOPs +
serve_problems * inference FLOPs per problem.
"""

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

import infer
import model as model_lib
import rundir
from align import chat, data, reward_model, rollout
from align.tasks import ANSWER_PREFIX, Problem, Task, get_task
from configs import validation
from infer import test_time
from model import sharding
from train import flops as flops_lib
from train import plot as plot_lib
from train import trainer

JSON_FILE, PLOT_FILE, SAMPLES_FILE = "curves.json", "curves.png", "samples.json"
ANSWER_LINE = f"\n{ANSWER_PREFIX}"  # what ends a worked solution (thinking) and starts its answer
LABELS = {"verifier": "best-of-N, verifier ({verifier})", "reward_model": "best-of-N, reward model",
          "self_consistency": "self-consistency", "train_time": "SFT checkpoints, greedy",
          "budget_maximum": "budget forcing: at most B thinking tokens, T={budget_temperature}",
          "budget_exact": "budget forcing: exactly B ('{budget_continuation}' before B), T={budget_temperature}"}
BUDGET_MODES = ("maximum", "exact")
PAIR = 2  # sequences per batch row of a reward model's training (align/reward_model.py: chosen and rejected)


# ---------------------------------------------------------------- curves from scored samples
def pass_at_n(correct: np.ndarray, ns: Sequence[int]) -> np.ndarray:
  """correct [P, M] bool -> [len(ns)]: the share of problems with a right answer among the first n."""
  return np.asarray([correct[:, :n].any(axis=1).mean() for n in ns])


def pass_at_n_unbiased(correct: np.ndarray, ns: Sequence[int]) -> np.ndarray:
  """pass@n estimated from all M samples of each problem: 1 - C(M - c, n) / C(M, n), c right."""
  m, right = correct.shape[1], correct.sum(axis=1)

  def one(n, c):  # prod_{i = M - c + 1}^{M} (1 - n / i): the ratio of binomials without overflow
    return 1.0 if m - c < n else 1.0 - float(np.prod(1.0 - n / np.arange(m - c + 1, m + 1)))

  return np.asarray([np.mean([one(n, c) for c in right]) for n in ns])


def best_of_n(correct: np.ndarray, scores: np.ndarray, ns: Sequence[int]) -> np.ndarray:
  """correct, scores [P, M] -> [len(ns)]: the share of problems whose highest-scored sample among the
  first n (the first among ties) is right."""
  rows = np.arange(len(correct))
  return np.asarray([correct[rows, np.argmax(scores[:, :n], axis=1)].mean() for n in ns])


def self_consistency(answers: Sequence[Sequence[Any]], gold: Sequence[Any], ns: Sequence[int]) -> np.ndarray:
  """answers [P][M] (None: no answer), gold [P] -> [len(ns)]: the share of problems whose majority
  answer among the first n (infer.test_time.majority_vote: the first seen among ties) is gold."""
  return np.asarray([np.mean([test_time.majority_vote(row[:n])[0] == g for row, g in zip(answers, gold)])
                     for n in ns])


def nested_flops(flops: np.ndarray, ns: Sequence[int]) -> np.ndarray:
  """flops [P, M] per sample -> [len(ns)]: the mean over problems of the first n samples' sum."""
  return np.asarray([flops[:, :n].sum(axis=1).mean() for n in ns])


def training_flops(run: str | os.PathLike, step: int, config: model_lib.ModelConfig, *,
                   sequences: int = 1) -> float | None:
  """The trainer's flops_seen at checkpoint `step` (train.trainer.flops_at); for a run from before the
  trainer kept its count, steps * batch_size * seq_len * flops_per_token * `sequences` per batch row
  (padding included); None without a run's config.json (a Hugging Face directory)."""
  path = Path(run) / rundir.loading.CONFIG_FILE
  saved = json.loads(path.read_text()) if path.is_file() else {}
  if "batch_size" not in saved or "seq_len" not in saved:
    return None
  recorded = trainer.flops_at(run, step)
  if recorded is not None:
    return recorded
  tokens = step * saved["batch_size"] * saved["seq_len"]
  return float(sequences * tokens * model_lib.flops_per_token(config, saved["seq_len"]))


# ---------------------------------------------------------------- measuring a model
@dataclasses.dataclass
class Scored:
  """M samples per problem, problem-major [P, M], scored."""

  texts: list[list[str]]
  answers: list[list[Any]]  # the task's extracted answer, None for none
  correct: np.ndarray  # [P, M] bool: the exact verifier
  flops: np.ndarray  # [P, M] forward FLOPs of each sample (prompt + completion)
  completion_tokens: np.ndarray  # [P, M]


def draw(policy, tokenizer, problems: Sequence[Problem], *, samples: int, sampling, max_new_tokens: int, seed: int,
         rows_per_call: int) -> dict[str, list[list]]:
  """`samples` completions of each problem: their texts and token counts (prompt with bos, and
  completion with its stop token), each [P][M] (align.rollout.sample: each row's randomness depends
  only on the seed and the row's index)."""
  out = rollout.sample(policy, tokenizer, [p.prompt for p in problems], n=samples, max_new_tokens=max_new_tokens,
                       sampling=sampling, seed=seed, rows_per_call=rows_per_call)

  def rows(values):
    return [list(values[i * samples: (i + 1) * samples]) for i in range(len(problems))]

  return {"texts": rows(out.texts), "prompt_tokens": rows([len(p) for p in out.prompt_ids]),
          "completion_tokens": rows([len(c) for c in out.completion_ids])}


def score(drawn: dict[str, list[list]], problems: Sequence[Problem], task: Task,
          config: model_lib.ModelConfig) -> Scored:
  """What `draw` drew, scored by the task's exact verifier and priced in FLOPs for a model of `config`."""
  texts, exact = drawn["texts"], task.reward("exact")
  correct = np.asarray([[exact(p, t) == 1.0 for t in row] for p, row in zip(problems, texts)])
  lengths = np.asarray(drawn["completion_tokens"])
  return Scored(texts, [[task.extract_answer(t) for t in row] for row in texts], correct,
                flops_lib.sample_flops(config, drawn["prompt_tokens"], lengths), lengths)


def reward_model_scores(rm, tokenizer, problems: Sequence[Problem], texts: list[list[str]], *,
                        seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """The reward model's score [P, M] of each sample and the tokens it reads [P, M] (bos, prompt and
  completion, cut to seq_len). A text repeated for a problem is scored once (its cost is counted for
  every sample all the same)."""
  unique = sorted({(i, t) for i, row in enumerate(texts) for t in row})
  values = reward_model.score(rm, tokenizer, [problems[i].prompt for i, _ in unique], [t for _, t in unique],
                              seq_len=seq_len)
  by_text = dict(zip(unique, values))
  # The eos the pieces end with is the last target, not read.
  read = {(i, t): min(len(data.tokenize_pieces(chat.prompt_completion(problems[i].prompt, t), tokenizer)[0]) - 1,
                      seq_len) for i, t in unique}
  return (np.asarray([[by_text[(i, t)] for t in row] for i, row in enumerate(texts)]),
          np.asarray([[read[(i, t)] for t in row] for i, row in enumerate(texts)]))


@dataclasses.dataclass(frozen=True)
class Thinking:
  """Where a completion's thinking ends, as the task's worked solutions are tokenized."""

  end_token: int  # the token that ends thinking (the answer line's newline)
  delimiter: tuple[int, ...]  # forced at the budget: the end token and the answer prefix


def thinking_delimiter(tokenizer, problem: Problem) -> Thinking | str:
  """The Thinking of `problem`'s worked solution, or why it has none (a reason, as text)."""
  completion = problem.completion()
  if ANSWER_LINE not in completion:
    return (f"the task's completions have no worked solution before a {ANSWER_LINE!r} line (e.g. "
            f"{completion!r:.60}), so there is no thinking to budget")
  _, ids = data.prompt_completion_ids({"prompt": problem.prompt, "completion": completion}, tokenizer)

  def text(n):
    return tokenizer.decode(ids[:n])

  start = next(i for i in range(len(ids)) if "\n" in text(i + 1))  # the first token that writes a newline
  end = next(i for i in range(start, len(ids) + 1) if ANSWER_LINE in text(i))
  if ids[start] in ids[:start]:
    return f"the end-of-thinking token {ids[start]} also occurs inside the worked solution"
  return Thinking(ids[start], tuple(ids[start:end]))


def first_answer_line(text: str) -> str:
  """`text` up to the end of the line after its first end of thinking: the answer it committed to
  (after a forced answer prefix the model may write on, another "Answer:" line included)."""
  at = text.find(ANSWER_LINE)
  end = -1 if at < 0 else text.find("\n", at + len(ANSWER_LINE))
  return text if end < 0 else text[:end]


def forced_answers(policy, tokenizer, problems: Sequence[Problem], task: Task, controller, *, max_new_tokens: int,
                   sampling, rows_per_call: int, end_token: int) -> dict[str, float]:
  """One completion per problem under `controller`: accuracy (of its first answer line), inference
  FLOPs per problem, the mean number of tokens before the first end of thinking (the whole completion
  when it has none: it stopped while thinking, and has no answer), and two completions as examples."""
  prompts = [rollout.encode_prompt(tokenizer, p.prompt) for p in problems]
  tokens = []
  for start in range(0, len(prompts), rows_per_call):
    chunk = prompts[start: start + rows_per_call]
    tokens += infer.generate(policy, chunk, max_new_tokens=max_new_tokens, sampling=sampling, rng=start,
                             stop_tokens=[tokenizer.eos_id], controller=controller).tokens
  texts = [rollout.completion_text(tokenizer, p, t) for p, t in zip(prompts, tokens)]
  exact = task.reward("exact")
  thinking = [t.index(end_token) if end_token in t else len(t) for t in tokens]
  return {"accuracy": float(np.mean([exact(p, first_answer_line(t)) for p, t in zip(problems, texts)])),
          "inference_flops": float(flops_lib.sample_flops(policy.config, [len(p) for p in prompts],
                                                            [len(t) for t in tokens]).mean()),
          "thinking_tokens": float(np.mean(thinking)), "completion_tokens": float(np.mean([len(t) for t in tokens])),
          "examples": texts[:2]}


def greedy_point(model, tokenizer, problems, task, *, max_new_tokens: int, rows_per_call: int) -> dict[str, float]:
  """Greedy accuracy and inference FLOPs per problem (one answer each)."""
  drawn = draw(model, tokenizer, problems, samples=1, sampling=infer.Sampling(), max_new_tokens=max_new_tokens,
               seed=0, rows_per_call=rows_per_call)
  scored = score(drawn, problems, task, model.config)
  return {"accuracy": float(scored.correct.mean()), "inference_flops": float(scored.flops.mean())}


def checkpoints(run: str) -> list[int]:
  """The steps of a run's kept checkpoints, in order."""
  source = rundir.Checkpointer(Path(run) / rundir.loading.CHECKPOINTS, keep=1_000_000, async_save=False,
                               read_only=True)
  try:
    return sorted(source.all_steps())
  finally:
    source.close()


def train_time_curve(runs: Sequence[str], problems, task, *, with_init: bool, max_new_tokens: int,
                     rows_per_call: int) -> list[dict[str, Any]]:
  """Greedy accuracy against training FLOPs: every kept checkpoint of each run (step: its training
  steps) and, with_init, the latest checkpoint of the init_from each run started from (step 0 and 0
  training FLOPs; a shared one once)."""
  points, seen = [], set()
  for run in runs:
    sources = []  # (path, checkpoint step or None for the latest, training steps)
    if with_init:
      saved = json.loads((Path(run) / rundir.loading.CONFIG_FILE).read_text())
      if saved.get("init_from"):
        sources.append((saved["init_from"], None, 0))
    sources += [(run, step, step) for step in checkpoints(run)]
    for path, checkpoint, steps in sources:
      key = (str(Path(path).resolve()), checkpoint)
      if key in seen:
        continue
      seen.add(key)
      model, tokenizer = rundir.load(path, step=checkpoint)
      flops = training_flops(path, steps, model.config) if steps else 0.0
      point = greedy_point(model, tokenizer, problems, task, max_new_tokens=max_new_tokens,
                           rows_per_call=rows_per_call)
      points.append({"run": str(path), "checkpoint": checkpoint, "step": steps, "training_flops": flops, **point})
  return points


def budget_forcing_curve(policy, tokenizer, problems: Sequence[Problem], task: Task, config: ml_collections.ConfigDict,
                         mode: str, *, thinking: Thinking, training: float) -> dict[str, Any]:
  """forced_answers at each of config.budgets in `mode` (BUDGET_MODES; the module docstring says how)."""
  exact = mode == "exact"
  continuation = tuple(tokenizer.encode(config.budget_continuation)) if exact else ()
  points = []
  for budget in config.budgets:
    forcing = infer.BudgetForcing(end_think_token=thinking.end_token, max_thinking_tokens=budget,
                                  min_thinking_tokens=budget if exact else 0,
                                  continuation=continuation if budget else (), end_think_delimiter=thinking.delimiter)
    # Room for the budget, a continuation begun at its last token, the delimiter and the answer.
    room = budget + len(continuation) + len(thinking.delimiter) + config.budget_answer_tokens
    point = forced_answers(policy, tokenizer, problems, task, forcing, max_new_tokens=room,
                           sampling=infer.Sampling(temperature=config.budget_temperature),
                           rows_per_call=config.rows_per_call, end_token=thinking.end_token)
    points.append({"budget": budget, "training_flops": training, **point})
  return {"knob": "budget", "points": points, "end_of_thinking": tokenizer.decode(list(thinking.delimiter)),
          "continuation": config.budget_continuation if exact else ""}


# ---------------------------------------------------------------- config
def _paths(config: ml_collections.ConfigDict) -> list[str]:
  return [r.strip() for r in config.sft_runs.split(",") if r.strip()]


def validate(config: ml_collections.ConfigDict) -> Task:
  """Start-up checks of every value (the paths are checked by check_paths); returns the task."""
  ns = tuple(config.ns)
  if not ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ns) or list(ns) != sorted(set(ns)):
    raise validation.ConfigError(f"config.ns={ns}: positive ints in increasing order (N samples per problem)")
  if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in config.budgets):
    raise validation.ConfigError(f"config.budgets={tuple(config.budgets)}: thinking budgets are ints >= 0")
  for key in ("problems", "max_new_tokens", "reward_seq_len", "budget_answer_tokens", "rows_per_call",
              "serve_problems"):
    if config[key] < 1:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 1")
  if not config.temperature > 0:
    raise validation.ConfigError(f"config.temperature={config.temperature} must be > 0: at 0 the N samples are one")
  if config.budget_temperature < 0:
    raise validation.ConfigError(f"config.budget_temperature={config.budget_temperature} must be >= 0 (0: greedy)")
  if any(mode not in BUDGET_MODES for mode in config.budget_modes):
    raise validation.ConfigError(f"config.budget_modes={tuple(config.budget_modes)}: each is one of {BUDGET_MODES}")
  if "exact" in config.budget_modes and config.budgets and not config.budget_continuation:
    raise validation.ConfigError("config.budget_continuation is empty, but config.budget_modes' 'exact' needs it "
                                 "(s1's 'Wait')")
  try:
    task = get_task(config.task)
    if task is None:
      raise ValueError("config.task.name is '': the curves need a task (its problems and verifier)")
    task.reward(config.verifier)
  except ValueError as e:
    raise validation.ConfigError(str(e) if "config." in str(e) else f"config.verifier: {e}") from e
  return task


def check_paths(config: ml_collections.ConfigDict) -> None:
  """Each path key names a run's workdir (or, for the policy, a Hugging Face directory)."""
  if not config.policy:
    raise validation.ConfigError("config.policy is empty: give the run whose samples are scored")
  named = [("config.policy", config.policy)] + ([("config.reward_model", config.reward_model)]
                                                 if config.reward_model else [])
  named += [("config.sft_runs", r) for r in _paths(config)]
  for key, path in named:
    if not (rundir.loading.is_run(path) or (key == "config.policy" and rundir.loading.is_huggingface(path))):
      raise validation.ConfigError(f"{key}={path!r} is not a training run's workdir (with checkpoints/)"
                                   + ("" if os.path.isdir(path) else "; it does not exist"))


# ---------------------------------------------------------------- the experiment
def run(config: ml_collections.ConfigDict, out_dir: str | os.PathLike, *, log=sys.stdout) -> dict[str, Any]:
  """Every curve of the module docstring on config.problems held-out problems; writes and returns the result."""
  task = validate(config)
  check_paths(config)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  timings, started = {}, time.perf_counter()

  def timed(name):
    timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

  ns, m = list(config.ns), max(config.ns)
  problems = task.split("eval", config.problems, config.task.seed)
  step = None if config.step < 0 else config.step
  policy, tokenizer = rundir.load(config.policy, step=step)
  if rundir.loading.is_run(config.policy):
    step = checkpoints(config.policy)[-1] if step is None else step
  policy_training = training_flops(config.policy, step or 0, policy.config) or 0.0  # 0: a Hugging Face directory
  # The samples are kept in out_dir: a second run of the same draw (to add a reward model or SFT runs) reuses them.
  key = {"policy": str(Path(config.policy).resolve()), "step": step, "task": config.task.to_dict(),
         "problems": len(problems), "samples": m, "temperature": config.temperature, "seed": config.seed,
         "max_new_tokens": config.max_new_tokens}
  kept = out_dir / SAMPLES_FILE
  drawn = json.loads(kept.read_text()) if kept.is_file() else {}
  if drawn.get("key") == key:
    print(f"{len(problems)} problems, {m} samples each: reusing {kept}", file=log, flush=True)
  else:
    print(f"{len(problems)} problems, {m} samples each at T={config.temperature}", file=log, flush=True)
    drawn = {"key": key, **draw(policy, tokenizer, problems, samples=m, sampling=infer.Sampling(
        temperature=config.temperature), max_new_tokens=config.max_new_tokens, seed=config.seed,
        rows_per_call=config.rows_per_call)}
    rundir.loading.write_json_atomic(kept, drawn)
  scored = score(drawn, problems, task, policy.config)
  timed("sampling")
  sample_flops = nested_flops(scored.flops, ns)
  curves, skipped = {}, {}

  def n_curve(name, accuracy, flops, training=policy_training, **extra):
    curves[name] = {"knob": "n", "points": [
        {"n": n, "accuracy": float(a), "inference_flops": float(f), "training_flops": training,
         **{k: float(v[i]) for k, v in extra.items()}} for i, (n, a, f) in enumerate(zip(ns, accuracy, flops))]}

  verifier = task.reward(config.verifier)
  ranks = np.asarray([[verifier(p, t) for t in row] for p, row in zip(problems, scored.texts)])
  n_curve("verifier", best_of_n(scored.correct, ranks, ns), sample_flops,
          pass_at_n=pass_at_n(scored.correct, ns), pass_at_n_unbiased=pass_at_n_unbiased(scored.correct, ns))
  n_curve("self_consistency", self_consistency(scored.answers, [p.answer for p in problems], ns), sample_flops)
  if config.reward_model:
    rm = reward_model.load(config.reward_model, mesh=None, rules=sharding.DEFAULT_RULES)
    rm_key = {"path": str(Path(config.reward_model).resolve()), "step": checkpoints(config.reward_model)[-1],
              "seq_len": config.reward_seq_len}
    if drawn.get("reward_model", {}).get("key") != rm_key:  # its scores are kept beside the samples too
      rm_scores, rm_read = reward_model_scores(rm, tokenizer, problems, scored.texts, seq_len=config.reward_seq_len)
      drawn["reward_model"] = {"key": rm_key, "scores": rm_scores.tolist(), "read_tokens": rm_read.tolist()}
      rundir.loading.write_json_atomic(kept, drawn)
    rm_scores, rm_read = (np.asarray(drawn["reward_model"][k]) for k in ("scores", "read_tokens"))
    rm_flops = model_lib.forward_flops(rm.config, rm_read.astype(np.float64))
    # Its training is a cost of this curve too (its batch rows are pairs: two sequences each).
    rm_training = training_flops(config.reward_model, rm_key["step"], rm.config, sequences=PAIR) or 0.0
    n_curve("reward_model", best_of_n(scored.correct, rm_scores, ns), sample_flops + nested_flops(rm_flops, ns),
            training=policy_training + rm_training)
    timed("reward_model")
  else:
    skipped["reward_model"] = "no config.reward_model given"

  thinking = thinking_delimiter(tokenizer, problems[0])  # every problem's answer line is the same
  if isinstance(thinking, str) or not config.budgets or not config.budget_modes:
    skipped["budget_forcing"] = thinking if isinstance(thinking, str) else "config.budgets or budget_modes is empty"
  else:
    for mode in config.budget_modes:
      curves[f"budget_{mode}"] = budget_forcing_curve(policy, tokenizer, problems, task, config, mode,
                                                      thinking=thinking, training=policy_training)
    timed("budget_forcing")

  runs = _paths(config) or ([config.policy] if rundir.loading.is_run(config.policy) else [])
  curves["train_time"] = {"knob": "step", "points": train_time_curve(
      runs, problems, task, with_init=config.sft_init, max_new_tokens=config.max_new_tokens,
      rows_per_call=config.rows_per_call)}
  timed("train_time")

  result = {
      "config": config.to_dict(), "problems": len(problems), "samples_per_problem": m,
      "policy": {"path": str(config.policy), "step": step, "params": model_lib.param_count(policy.config),
                 "training_flops": policy_training},
      "sample_accuracy": float(scored.correct.mean()),  # one T-temperature sample, over all P * M of them
      "answered": float(np.mean([a is not None for row in scored.answers for a in row])),
      "mean_completion_tokens": float(scored.completion_tokens.mean()),
      "curves": curves, "skipped": skipped, "serve_problems": config.serve_problems, "timings_s": timings,
  }
  rundir.loading.write_json_atomic(out_dir / JSON_FILE, result)
  plot(result, out_dir / PLOT_FILE)
  print(table(result), file=log, flush=True)
  return result


# ---------------------------------------------------------------- the report
def _label(name: str, result: dict) -> str:
  return LABELS[name].format(**result["config"])


def table(result: dict) -> str:
  """The curves as text: one line per point (accuracy, inference GFLOPs per problem, training FLOPs)."""
  lines = [f"{result['problems']} problems; one sample at T={result['config']['temperature']} is right "
           f"{result['sample_accuracy']:.3f} of the time; the policy's training FLOPs "
           f"{result['policy']['training_flops']:.3g}"]
  for name, curve in result["curves"].items():
    lines.append(f"{_label(name, result)}:")
    for point in curve["points"]:
      extra = "".join(f"  {k} {point[k]:.3f}" for k in ("pass_at_n_unbiased", "thinking_tokens") if k in point)
      lines.append(f"  {curve['knob']}={point[curve['knob']]:<4} accuracy {point['accuracy']:.3f}  inference "
                   f"{point['inference_flops'] / 1e9:8.3f} GFLOPs/problem  training "
                   f"{point['training_flops']:.3g}{extra}")
  lines += [f"skipped {name}: {why}" for name, why in result["skipped"].items()]
  return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
  """Two panels, log x: accuracy against inference FLOPs per problem (the test-time curves), and
  every curve against training + serve_problems * inference FLOPs (the trade-off); one line per SFT
  run, from its starting point."""
  import matplotlib  # noqa: PLC0415 (here, so that importing this module stays cheap)

  matplotlib.use("Agg")  # headless
  from matplotlib import figure as figure_lib  # noqa: PLC0415

  figure = figure_lib.Figure(figsize=(13, 5), layout="constrained")
  per_problem, total = figure.subplots(1, 2, sharey=True)
  q = result["serve_problems"]

  def cost(point):
    return (point["training_flops"] or 0.0) + q * point["inference_flops"]

  markers = {"verifier": "o", "reward_model": "s", "self_consistency": "^", "budget_maximum": "D", "budget_exact": "v"}
  for i, (name, curve) in enumerate((n, c) for n, c in result["curves"].items() if n != "train_time"):
    points, knob = curve["points"], curve["knob"]
    style = dict(color=f"C{i}", marker=markers.get(name, "o"), markersize=4, label=_label(name, result))
    y = [p["accuracy"] for p in points]
    per_problem.plot([p["inference_flops"] for p in points], y, **style)
    total.plot([cost(p) for p in points], y, **style)
    for panel, x in ((per_problem, points[-1]["inference_flops"]), (total, cost(points[-1]))):
      panel.annotate(f"{knob}={points[-1][knob]}", (x, y[-1]), fontsize="x-small", xytext=(3, 3),
                     textcoords="offset points")
  train = result["curves"].get("train_time", {"points": []})["points"]
  starts = [p for p in train if p["step"] == 0]
  for j, run in enumerate(dict.fromkeys(p["run"] for p in train if p["step"])):
    points = starts + sorted((p for p in train if p["run"] == run), key=lambda p: p["step"])
    total.plot([cost(p) for p in points], [p["accuracy"] for p in points], color="black", marker="*",
               linestyle=("-", "--", ":", "-.")[j % 4], label=f"SFT {Path(run).name}, greedy (steps "
               f"{', '.join(str(p['step']) for p in points)})")
  per_problem.set_xlabel("inference FLOPs per problem (forward: prompt + completion, every sample)")
  total.set_xlabel(f"training FLOPs + {q} problems x inference FLOPs per problem (pre-training left out)")
  per_problem.set_ylabel(f"accuracy on {result['problems']} held-out problems")
  per_problem.set_ylim(-0.02, 1.02)
  for panel in (per_problem, total):
    panel.set_xscale("log")
    panel.grid(alpha=0.3)
  handles, labels = total.get_legend_handles_labels()
  figure.legend(handles, labels, loc="outside upper center", ncols=3, fontsize="small")
  return plot_lib.save_figure(figure, path)


if __name__ == "__main__":
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  from configs import cli as configs_cli  # noqa: PLC0415

  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/align/compute_curves.py[:arg]")
  _OUT = flags.DEFINE_string("out", None, f"Directory for {JSON_FILE} and {PLOT_FILE}.")
  flags.mark_flags_as_required(["config", "out"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(_CONFIG.value, _OUT.value)

  configs_cli.run(main)
