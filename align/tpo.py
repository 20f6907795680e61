"""TPO, Thought Preference Optimization (Wu et al. 2024, "Thinking LLMs"): the policy is asked to
think and then respond; a judge scores only the response; the best and worst of each prompt's K
thought + response samples become a DPO pair; train with `align.losses.dpo_loss`; repeat.

Per iteration: rl.prompts_per_iteration prompts, each put in tpo.template ("{prompt}" marks where),
K = rl.samples_per_prompt samples of the live policy. A sample's response is its text after the
first tpo.marker; the judge (config.rl.reward: a task's verifier, or a reward model) scores that
response against the plain prompt (less rl.missing_eos_penalty for a sample that never ended), and
a sample with no marker scores lowest, as in the paper. A prompt whose samples all score alike
gives no pair. The pairs are whole completions (thought and response, stop token included),
trained on for rl.epochs passes (at least one step). The paper's iterations are a few large ones:
many prompts per iteration and several epochs here.

The DPO reference moves: iteration t's reference is the policy that sampled its pairs (M_t), as in
the paper's iterations, where M_{t+1} is trained by DPO from M_t on M_t's own pairs (the recipe of
Self-Rewarding LMs and Iterative RPO it follows); iteration 0's is the starting model. Its summed
log-probs are computed when the pairs are made and kept with them in the workdir (align/rollout.py's
experience), so each iteration starts at the DPO loss ln 2 (sigmoid) and a resumed run continues on
the same pairs and reference.

Length control (the paper's section 2.3, against judges that favour long responses): with
tpo.length_penalty = rho > 0, each prompt's parsed samples are ranked by z(score) - rho * z(length),
z standardising over that prompt's parsed samples and length counted in the response's characters;
so among equally judged responses the shortest is best and the longest worst (rho = 0: the score
alone, ties giving no pair).

Held-out scores (align/run.py) read the response alone, as the judge does: the text after the
marker, or nothing (wrong) where the policy wrote no marker.
"""

import functools
import logging

import ml_collections
import numpy as np

from align import dpo, losses, online, preferences, rollout
from align.method import Method, check_choice
from align.tasks import Problem, Task
from train import flops as flops_lib

_MAX_EMPTY_ITERATIONS = 8


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  online.validate_rl(config, task)
  c = config.tpo
  check_choice(config, "tpo.loss_type", losses.DPO_LOSS_TYPES)
  if c.beta <= 0:
    raise ValueError(f"config.tpo.beta={c.beta} must be > 0")
  if c.length_penalty < 0:
    raise ValueError(f"config.tpo.length_penalty={c.length_penalty} must be >= 0 (0: no length control)")
  if c.template.count("{prompt}") != 1:
    raise ValueError(f"config.tpo.template={c.template!r:.80} must hold '{{prompt}}' exactly once")
  if not c.marker:
    raise ValueError("config.tpo.marker='' cannot mark where the response starts")
  if config.rl.samples_per_prompt < 2:
    raise ValueError(f"config.rl.samples_per_prompt={config.rl.samples_per_prompt} must be >= 2: "
                     "a pair needs two samples")


def thought_prompt(template: str, prompt: str) -> str:
  return template.replace("{prompt}", prompt)


def parse_response(text: str, marker: str) -> str | None:
  """The response part of a thought + response completion: the text after the first `marker`; None
  when there is none."""
  thought, found, response = text.partition(marker)
  del thought
  return response if found else None


def judge_scores(prompts: list[str], responses: list[str | None], reward_fn) -> np.ndarray:
  """[R] float64: the reward of each parsed response for its prompt, -inf where none was parsed."""
  scores = np.full(len(responses), -np.inf)
  parsed = [i for i, r in enumerate(responses) if r is not None]
  if parsed:
    scores[parsed] = reward_fn([prompts[i] for i in parsed], [responses[i] for i in parsed])
  return scores


def _standardized(x: np.ndarray, parsed: np.ndarray) -> np.ndarray:
  """[P, K] x standardised over each row's parsed entries (0 where they do not vary)."""
  count = np.maximum(parsed.sum(axis=1, keepdims=True), 1)
  mean = np.where(parsed, x, 0.0).sum(axis=1, keepdims=True) / count
  std = np.sqrt(np.where(parsed, (x - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count)
  return np.where(std > 0, (x - mean) / np.where(std > 0, std, 1.0), 0.0)


def length_controlled(scores: np.ndarray, lengths: np.ndarray, penalty: float) -> np.ndarray:
  """scores, lengths [P, K] -> z(score) - penalty * z(length) over each prompt's parsed (finite)
  samples; unparsed ones stay -inf. penalty 0: `scores` unchanged."""
  if not penalty:
    return scores
  parsed = np.isfinite(scores)
  safe = np.where(parsed, scores, 0.0)
  controlled = _standardized(safe, parsed) - penalty * _standardized(lengths.astype(np.float64), parsed)
  return np.where(parsed, controlled, -np.inf)


def select_pairs(scores: np.ndarray) -> np.ndarray:
  """scores [P, K] -> [n, 3] int rows (prompt, best sample, worst sample), one per prompt whose
  samples do not all tie; the first sample among tied best (worst) ones."""
  best, worst = np.argmax(scores, axis=1), np.argmin(scores, axis=1)
  rows = np.arange(len(scores))
  apart = scores[rows, best] > scores[rows, worst]
  return np.stack([rows[apart], best[apart], worst[apart]], axis=1)


def pair_rows(samples: rollout.Samples, pairs: np.ndarray, k: int, *, seq_len: int) -> dict[str, np.ndarray]:
  """chosen_/rejected_ tokens, targets, mask [n, T] of the (prompt, best, worst) rows of `pairs`."""
  out = {}
  for side, column in (("chosen", 1), ("rejected", 2)):
    index = pairs[:, 0] * k + pairs[:, column]
    rows = rollout.token_rows([samples.prompt_ids[i] for i in index], [samples.completion_ids[i] for i in index],
                              seq_len=seq_len)
    out.update({f"{side}_{name}": values for name, values in rows.items()})
  return out


def reference_logps(model, rows: dict[str, np.ndarray], *, batch_size: int) -> dict[str, np.ndarray]:
  """reference_chosen_logps, reference_rejected_logps [n] float32: `model`'s summed completion log-probs."""
  out = {}
  for side in ("chosen", "rejected"):
    logprobs = rollout.token_logprobs(model, rows[f"{side}_tokens"], rows[f"{side}_targets"], batch_size=batch_size)
    out[f"reference_{side}_logps"] = np.sum(logprobs * rows[f"{side}_mask"], axis=1).astype(np.float32)
  return out


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  if split != "train":
    raise ValueError("TPO has no held-out loss (set config.eval_every=0); it is measured by generation")
  c, rl = config.tpo, config.rl
  pool = online.prompts(config, task)
  meter = flops_lib.Meter()
  reward_fn = online.reward_fn(config, task, tokenizer, mesh=context.mesh, rules=context.rules, meter=meter)
  sampler = online.Sampler(context.live, tokenizer, config, context.rules, meter=meter)
  k = rl.samples_per_prompt

  def pairs_of(iteration: int):
    prompts = online.prompt_batch(pool, iteration, rl.prompts_per_iteration, seed=config.seed)
    samples = sampler([thought_prompt(c.template, p) for p in prompts], iteration)
    responses = [parse_response(t, c.marker) for t in samples.texts]
    repeated = [p for p in prompts for _ in range(k)]
    scores = judge_scores(repeated, responses, reward_fn) - rl.missing_eos_penalty * ~samples.finished
    lengths = np.asarray([len(r or "") for r in responses])
    pairs = select_pairs(length_controlled(scores.reshape(-1, k), lengths.reshape(-1, k), c.length_penalty))
    parsed = np.isfinite(scores)
    logging.info("TPO sampling %d: %.0f%% of responses parsed, judged %.3f (mean), %d pairs of %d prompts", iteration,
                 100 * parsed.mean(), scores[parsed].mean() if parsed.any() else float("nan"), len(pairs),
                 len(prompts))
    return samples, pairs

  def collect(iteration: int, state: dict):
    sampled = int(state.get("sampled", iteration))
    for _ in range(_MAX_EMPTY_ITERATIONS):
      samples, pairs = pairs_of(sampled)
      sampled += 1
      if len(pairs):
        break
      logging.warning("TPO sampling %d gave no pair (every prompt's samples judged alike); sampling the next prompts",
                      sampled - 1)
    else:
      raise RuntimeError(f"TPO: {_MAX_EMPTY_ITERATIONS} samplings in a row gave no pair: the judge scored every "
                         f"prompt's samples alike (is config.tpo.marker={c.marker!r} ever written?)")
    rows = pair_rows(samples, pairs, k, seq_len=config.seq_len)
    reference = context.live()  # M_t, the sampling policy
    rows.update(reference_logps(reference, rows, batch_size=config.batch_size))
    meter.add(flops_lib.frozen(reference.config, config.seq_len, 2 * len(pairs)))
    steps = max(1, int(np.ceil(rl.epochs * len(pairs) / config.batch_size)))
    schedule = rollout.cycle_schedule(np.arange(len(pairs)), config.batch_size, steps=steps,
                                      seed=config.seed * 1_000_003 + sampled)
    return rollout.Experience(rows, schedule), {**state, "sampled": sampled}

  return rollout.ExperienceSource(collect, workdir=context.workdir, batch_size=config.batch_size, meter=meter)


def eval_prompt(config: ml_collections.ConfigDict, problem: Problem) -> str:
  return thought_prompt(config.tpo.template, problem.prompt)


def eval_response(config: ml_collections.ConfigDict, text: str) -> str:
  """What a held-out completion is scored on: its response, as the judge reads it ('' without one)."""
  return parse_response(text, config.tpo.marker) or ""


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(dpo.dpo_loss_fn, beta=config.tpo.beta, label_smoothing=0.0,
                           loss_type=config.tpo.loss_type, gamma=0.0)


METHOD = Method(name="tpo", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, eval_prompt=eval_prompt,
                eval_response=eval_response, row_flops=preferences.row_flops)
