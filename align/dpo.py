"""The DPO family on the one trainer: preference pairs in, `align.losses.dpo_loss` (or SimPO) out.

A batch row is one pair: chosen_* and rejected_* [B, T] (prompt + completion, right-padded; the
mask covers completion tokens only) and the reference model's summed completion log-probs [B].
Those are computed once, by the run's starting model, before the first step, and kept in the
workdir (reference_logps_{train,eval}.npz), so the reference model is never held in memory during
training and a resumed run reads them back.

Length conventions: sigmoid (DPO, cDPO), robust and hinge use summed completion log-probs; IPO,
SimPO and ORPO use per-token means (see align/losses.py). SimPO and ORPO are reference-free: the
reference log-probs are read but do not enter their loss; ORPO's `beta` is the weight of its
odds-ratio term (lambda in the paper) next to the chosen completions' NLL.
"""

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from align import ai_feedback, data, losses, preferences, rollout
from align.method import Method, check_choice
from align.tasks import Task, split_problems
from infer.sampling import Sampling
from model import peft
from train import flops as flops_lib
from train import losses as train_losses

LOSS_TYPES = losses.DPO_LOSS_TYPES + ("simpo", "orpo")
_MEAN_LOGPS = ("ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # no reference log-probs needed (still computed, for the metrics' sake)


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  c = config.dpo
  check_choice(config, "dpo.loss_type", LOSS_TYPES)
  check_choice(config, "dpo.pairs", ("data", "ai_feedback"))
  check_choice(config, "dpo.on_error", data.ON_ERROR)
  if not 0 <= c.label_smoothing < 0.5:
    raise ValueError(f"config.dpo.label_smoothing={c.label_smoothing} must be in [0, 0.5)")
  if c.beta <= 0:
    raise ValueError(f"config.dpo.beta={c.beta} must be > 0")
  if c.pairs == "ai_feedback" and task is None:
    raise ValueError("config.dpo.pairs='ai_feedback' judges the policy's samples by the task's reward: "
                     "give config.task.name")


def _split_records(config, split: str, *, tokenizer, model, workdir, task: Task | None) -> list[dict]:
  """The split's pairs; with dpo.pairs='ai_feedback', the train pairs are the starting policy's own
  samples ranked by the task's exact reward (made once, kept in the workdir as JSONL)."""
  if config.dpo.pairs != "ai_feedback" or split != "train":
    return preferences.records(config, split, task)
  path = Path(workdir) / "ai_feedback_pairs.jsonl"
  if not path.exists():
    if model is None or task is None:
      raise ValueError("dpo.pairs='ai_feedback' needs a task (config.task.name) and the starting model")
    by_prompt = {p.prompt: p for p in split_problems(task, config.task, "train")}
    exact = task.reward("exact")
    judge = ai_feedback.reward_function_judge(lambda prompt, completion: exact(by_prompt[prompt], completion))
    pairs = ai_feedback.preference_pairs(
        model, tokenizer, list(by_prompt), judge=judge, n=config.dpo.ai_feedback_samples,
        max_new_tokens=config.task.accuracy_tokens, sampling=Sampling(temperature=config.dpo.ai_feedback_temperature),
        rng=config.seed,
    )
    logging.info("AI feedback: %d pairs from %d prompts x %d samples", len(pairs), len(by_prompt),
                 config.dpo.ai_feedback_samples)
    if not pairs:
      raise ValueError("AI feedback found no prompt whose samples the judge scored differently; "
                       "raise dpo.ai_feedback_samples or the temperature")
    if jax.process_index() == 0:
      data.write_jsonl(path, pairs)
    return pairs
  return data.read_jsonl(path, "preference")


def completion_logps(model, tokens, targets, mask):
  """Summed log-probs [B] and token counts [B] of the masked targets."""
  nll, _ = train_losses.token_cross_entropy(model(tokens), targets)
  mask = mask.astype(jnp.float32)
  return -jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def reference_logps(model, features: list[dict], *, batch_size: int) -> dict[str, np.ndarray]:
  """The starting model's chosen/rejected summed log-probs for every pair (batched, jitted)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def score(state, tokens, targets, mask):
    return completion_logps(nnx.merge(graphdef, state), tokens, targets, mask)[0]

  def side_logps(side):
    arrays = [np.stack([f[f"{side}_{k}"] for f in features]) for k in ("tokens", "targets", "mask")]
    return rollout.in_chunks(functools.partial(score, state), *arrays, batch_size=batch_size).astype(np.float32)

  return {side: side_logps(side) for side in ("chosen", "rejected")}


def _reference_path(workdir, split: str) -> Path:
  return Path(workdir) / f"reference_logps_{split}.npz"


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  """One pair per row; reference log-probs from the workdir, computed by the starting model on the first start."""
  model, workdir = context.start, context.workdir
  if model is not None and peft.has_adapters(model):  # the reference is the base, adapters off
    model = peft.without_adapters(model)
  features = {s: [preferences.pair_features(r, tokenizer, seq_len=config.seq_len)
                  for r in _split_records(config, s, tokenizer=tokenizer, model=model, workdir=workdir, task=task)]
              for s in (("train", "eval") if split == "train" else ("eval",))}
  if split == "train" and not _reference_path(workdir, "train").exists():
    if model is None:
      raise ValueError("the reference log-probs are missing and no starting model was given")
    for s, feats in features.items():  # the eval pairs are scored now too: by the same reference
      ref = reference_logps(model, feats, batch_size=config.batch_size)
      if jax.process_index() == 0:
        data.save_npz_atomic(_reference_path(workdir, s), **ref)
      logging.info("reference log-probs of %d %s pairs: chosen %.2f, rejected %.2f (mean)", len(feats), s,
                   ref["chosen"].mean(), ref["rejected"].mean())
  path = _reference_path(workdir, split)
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: the reference log-probs are written when training starts")
  reference = np.load(path)
  rows = features[split]
  if len(reference["chosen"]) != len(rows):
    raise ValueError(f"{path} holds {len(reference['chosen'])} pairs but the {split} data has {len(rows)}; "
                     "the data changed since the run started")
  for i, row in enumerate(rows):
    row["reference_chosen_logps"] = reference["chosen"][i]
    row["reference_rejected_logps"] = reference["rejected"][i]
  return preferences.batched(rows, config, split)


def dpo_loss_fn(model, batch, rng, *, beta: float, label_smoothing: float, loss_type: str, gamma: float,
                sft_coef: float = 0.0, whole_batch=None):
  """The trainer's loss_fn for the DPO family: both sides in one forward pass ([2B, T]). Every term is
  a mean over the pairs that count, their number counted on the whole batch (train.step.LossFn)."""
  del rng
  whole = train_losses.whole(batch, whole_batch)
  pairs_kw = {"pair_mask": losses.pairs_that_count(batch["chosen_mask"], batch["rejected_mask"]),
              "whole_pair_mask": losses.pairs_that_count(whole["chosen_mask"], whole["rejected_mask"])}
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  logps, counts = completion_logps(model, tokens, targets, mask)
  pairs = batch["chosen_tokens"].shape[0]
  chosen, rejected = logps[:pairs], logps[pairs:]
  ref_chosen, ref_rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
  if loss_type in _MEAN_LOGPS:
    chosen_n, rejected_n = jnp.maximum(counts[:pairs], 1.0), jnp.maximum(counts[pairs:], 1.0)
    chosen, rejected = chosen / chosen_n, rejected / rejected_n
    ref_chosen, ref_rejected = ref_chosen / chosen_n, ref_rejected / rejected_n
  if loss_type == "simpo":
    loss, metrics = losses.simpo_loss(chosen, rejected, beta=beta, gamma=gamma, **pairs_kw)
  elif loss_type == "orpo":
    loss, metrics = losses.orpo_loss(chosen, rejected, -chosen, beta=beta, **pairs_kw)
  else:
    loss, metrics = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                    label_smoothing=label_smoothing, loss_type=loss_type, **pairs_kw)
  if sft_coef:  # RPO (Pang et al. 2024): an NLL term on the chosen completions keeps their likelihood up
    chosen_nll = -logps[:pairs] / jnp.maximum(counts[:pairs], 1.0)  # length-normalized, one per pair
    metrics["nll/chosen"] = losses.pair_mean(chosen_nll, pairs_kw["pair_mask"])
    loss = loss + sft_coef * losses.pair_mean(chosen_nll, **pairs_kw)
  metrics["weight"] = jnp.sum(pairs_kw["pair_mask"]).astype(jnp.float32)
  metrics["tokens"] = jnp.sum(counts)
  return loss, metrics


def row_flops(config: ml_collections.ConfigDict, module) -> float:
  """A pair trained on, and the reference's forwards over it (both sides): computed once before
  training (make_dataset), counted here per row trained on, as a reference beside the policy would run."""
  return preferences.row_flops(config, module) + flops_lib.frozen(module.config, config.seq_len, 2)


def loss_fn(config: ml_collections.ConfigDict):
  c = config.dpo
  return functools.partial(dpo_loss_fn, beta=c.beta, label_smoothing=c.label_smoothing, loss_type=c.loss_type,
                           gamma=c.gamma, sft_coef=c.sft_coef)


METHOD = Method(name="dpo", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, row_flops=row_flops,
                flops_note=("the reference log-probs of every pair, computed once before training, are counted per row "
                            "trained on (2 forwards); dpo.pairs='ai_feedback' sampling is not counted"))
