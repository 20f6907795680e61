"""RRHF (Yuan et al. 2023): rank each prompt's responses by their scores with a hinge on their
length-normalised log-probs, plus SFT on the best one (`align.losses.rrhf_loss`). No reference model.

A batch row is one prompt with N = rrhf.responses responses: tokens, targets, mask [B, N, T]
(prompt + response, right-padded, the mask on the response's targets; a prompt with fewer responses
has the rest all 0, and they enter no pair) and scores [B, N].

Where the responses come from (rrhf.source):
  data    {"prompt", "responses", "scores"} JSONL (rrhf.train_path, rrhf.eval_path), or, with a
          task, each problem's worked solution and a wrong one, scored by the task's verifier
          rrhf.reward.
  policy  the starting policy's rrhf.samples samples per train problem, scored by the task's verifier
          rrhf.reward; with rrhf.with_solutions the task's worked solution joins them (the paper
          ranks responses from several sources, human-written ones among them). Sampled once and
          kept in the workdir (rrhf_responses.jsonl), so a resumed run ranks the same responses.
          The eval split is the task's, as for 'data'.
"""

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from align import data, losses, preferences, rollout
from align.method import Method, check_choice
from align.tasks import Task, split_problems
from train import flops as flops_lib
from infer.sampling import Sampling
from train import losses as train_losses

SOURCES = ("data", "policy")
RESPONSES_FILE = "rrhf_responses.jsonl"


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  c = config.rrhf
  check_choice(config, "rrhf.source", SOURCES)
  check_choice(config, "rrhf.on_error", data.ON_ERROR)
  if c.responses < 2:
    raise ValueError(f"config.rrhf.responses={c.responses} must be >= 2: a ranking needs two responses")
  if c.sft_weight < 0:
    raise ValueError(f"config.rrhf.sft_weight={c.sft_weight} must be >= 0")
  if task is not None and c.reward not in task.rewards:
    raise ValueError(f"config.rrhf.reward={c.reward!r} is not one of task {task.name!r}'s rewards {sorted(task.rewards)}")
  if c.source == "policy":
    if task is None:
      raise ValueError("config.rrhf.source='policy' scores the starting policy's samples by the task's reward: "
                       "give config.task.name")
    if c.samples < 1 or c.temperature <= 0:
      raise ValueError(f"config.rrhf.samples={c.samples} must be >= 1 and config.rrhf.temperature={c.temperature} > 0")
    if c.samples + int(c.with_solutions) > c.responses:
      raise ValueError(f"config.rrhf.samples={c.samples} (plus one with config.rrhf.with_solutions) is more than "
                       f"config.rrhf.responses={c.responses}, the responses a row holds")


def records(config: ml_collections.ConfigDict, split: str, task: Task | None) -> list[dict]:
  """The split's {"prompt", "responses", "scores"}: the task's right and wrong completions, or config.rrhf's JSONL."""
  c = config.rrhf
  if task is not None:
    if task.wrong_completion is None:
      raise ValueError(f"task {task.name!r} makes no wrong completions, so it gives no {split} rankings: use "
                       "config.rrhf.source='policy' (with config.eval_every=0: no held-out rankings) or "
                       "config.task.name='' with config.rrhf.train_path")
    reward = task.reward(c.reward)
    out = []
    for problem in split_problems(task, config.task, split):
      responses = [problem.completion(), task.wrong_completion(problem)]
      out.append({"prompt": problem.prompt, "responses": responses,
                  "scores": [float(reward(problem, r)) for r in responses]})
    return out
  path = c.train_path if split == "train" else c.eval_path
  if not path:
    raise ValueError(f"config.rrhf.{split}_path is empty and config.task.name is ''")
  return data.read_jsonl(path, "ranking", on_error=c.on_error)


def policy_records(config: ml_collections.ConfigDict, model, tokenizer, task: Task) -> list[dict]:
  """rrhf.samples samples of `model` per train problem (and its worked solution, with
  rrhf.with_solutions), scored by the task's verifier rrhf.reward."""
  c = config.rrhf
  problems = split_problems(task, config.task, "train")
  reward = task.reward(c.reward)
  samples = rollout.sample(model, tokenizer, [p.prompt for p in problems], n=c.samples,
                           max_new_tokens=config.task.accuracy_tokens, sampling=Sampling(temperature=c.temperature),
                           seed=config.seed)
  out = []
  for i, problem in enumerate(problems):
    sampled = [rollout.training_text(tokenizer, ids) for ids in samples.completion_ids[i * c.samples: (i + 1) * c.samples]]
    responses = sampled + ([problem.completion()] if c.with_solutions else [])
    out.append({"prompt": problem.prompt, "responses": responses,
                "scores": [float(reward(problem, r)) for r in responses]})
  return out


def _split_records(config, split: str, *, tokenizer, model, workdir, task: Task | None) -> list[dict]:
  if config.rrhf.source != "policy" or split != "train":
    return records(config, split, task)
  path = Path(workdir) / RESPONSES_FILE
  if path.exists():
    return data.read_jsonl(path, "ranking")
  if model is None:
    raise ValueError("config.rrhf.source='policy' samples the starting model, and none was given")
  out = policy_records(config, model, tokenizer, task)
  scores = np.asarray([r["scores"] for r in out])
  logging.info("RRHF: %d prompts x %d responses from the starting policy, mean score %.3f, %.0f%% of prompts "
               "with responses scored apart", len(out), scores.shape[1], scores.mean(),
               100 * np.mean(scores.max(1) > scores.min(1)))
  if jax.process_index() == 0:
    data.write_jsonl(path, out)
  return out


def ranked_features(record: dict, tokenizer, *, seq_len: int, responses: int) -> dict[str, np.ndarray]:
  """tokens, targets, mask [N, T] int32 (all 0 for the rows past the record's responses) and scores [N]."""
  n = len(record["responses"])
  if n > responses:
    raise ValueError(f"the record of prompt {record['prompt']!r:.60} has {n} responses; "
                     f"config.rrhf.responses={responses} is the most a row holds")
  out = {k: np.zeros((responses, seq_len), np.int32) for k in ("tokens", "targets", "mask")}
  out["scores"] = np.zeros(responses, np.float32)
  for i, (text, score) in enumerate(zip(record["responses"], record["scores"])):
    for name, values in preferences.completion_features(record["prompt"], text, tokenizer, seq_len=seq_len).items():
      out[name][i] = values
    out["scores"][i] = score
  return out


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  """One prompt and its N responses per row."""
  found = _split_records(config, split, tokenizer=tokenizer, model=context.start, workdir=context.workdir, task=task)
  if not found:
    raise ValueError(f"the {split} split has no RRHF records")
  rows = [ranked_features(r, tokenizer, seq_len=config.seq_len, responses=config.rrhf.responses) for r in found]
  return preferences.batched(rows, config, split)


def ranking_loss(logits, batch, *, sft_weight: float, whole_batch=None):
  """RRHF on logits [B, N, T, V] of the batch's responses (targets, mask [B, N, T], scores [B, N]):
  per-token mean log-probs, then `losses.rrhf_loss`; a response counts when it has a completion token."""
  nll, _ = train_losses.token_cross_entropy(logits, batch["targets"])  # [B, N, T]
  mask = batch["mask"].astype(jnp.float32)
  counts = jnp.sum(mask, axis=-1)  # [B, N]
  mean_logps = -jnp.sum(nll * mask, axis=-1) / jnp.maximum(counts, 1.0)
  whole_mask = jnp.any(train_losses.whole(batch, whole_batch)["mask"] > 0, axis=-1)
  loss, metrics = losses.rrhf_loss(mean_logps, batch["scores"], counts > 0, sft_weight=sft_weight,
                                   whole_response_mask=whole_mask)
  metrics["weight"] = jnp.sum(jnp.any(counts > 0, axis=1)).astype(jnp.float32)
  metrics["tokens"] = jnp.sum(counts)
  return loss, metrics


def rrhf_loss_fn(model, batch, rng, *, sft_weight: float, whole_batch=None):
  """The trainer's loss_fn: every response of the batch in one forward pass ([B * N, T])."""
  del rng
  b, n, t = batch["tokens"].shape
  logits = model(batch["tokens"].reshape(b * n, t))  # [B * N, T, V]
  return ranking_loss(logits.reshape(b, n, t, -1), batch, sft_weight=sft_weight, whole_batch=whole_batch)


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(rrhf_loss_fn, sft_weight=config.rrhf.sft_weight)


def row_flops(config: ml_collections.ConfigDict, module) -> float:
  """A train step's row: rrhf.responses sequences (padding responses included: computed on), trained."""
  return flops_lib.trained(module.config, config.seq_len, config.rrhf.responses)


METHOD = Method(name="rrhf", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, row_flops=row_flops,
                flops_note="rrhf.source='policy' sampling (once, before training) is not counted")
