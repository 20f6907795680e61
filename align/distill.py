"""Distillation of a teacher into a student that shares its tokenizer (the teacher may be larger and
of another configuration). config.distill.kind picks what the student learns from:

  forward_kl | reverse_kl | jsd   token-level: the teacher's next-token distributions (align/
        distill_losses.py; temperature, GKD's beta). Each iteration's sequences are, with probability
        distill.on_policy_fraction, the student's own samples (on-policy, GKD: Agarwal et al. 2024),
        else the task's reference completions.
  sequence       sequence-level (Kim & Rush 2016): fine-tune on the teacher's generations.
  step_by_step   distilling step-by-step (Hsieh et al. 2023): the teacher's generation is split into
        its rationale and its answer, and the student learns both as two tasks told apart by a prefix
        of the prompt, loss = answer loss + distill.rationale_weight * rationale loss; at test time
        the student is asked with the answer prefix only (no rationale to generate).

The trained module is `Distiller`: the student (`decoder`) and the teacher under `frozen` (not
trained, not saved: reloaded from distill.teacher when a run resumes).
"""

import functools
import logging

import ml_collections
import numpy as np
from flax import nnx

from align import data, distill_losses, online, rollout, sft
from align.method import Method, check_choice
from align.tasks import ANSWER_PREFIX as TASK_ANSWER_PREFIX
from align.tasks import Problem, Task
from train import flops as flops_lib
from train import losses as train_losses

KINDS = distill_losses.DISTILLATION_KINDS + ("sequence", "step_by_step")
ANSWER_PREFIX = "[answer] "  # step_by_step's two tasks
RATIONALE_PREFIX = "[rationale] "


class Distiller(nnx.Module):
  """`model(tokens) -> the student's logits`; the teacher rides along, frozen."""

  def __init__(self, decoder, teacher):
    self.decoder = decoder
    self.config = decoder.config
    self.frozen = teacher

  def __call__(self, tokens, **kwargs):
    return self.decoder(tokens, **kwargs)


def wrap(decoder, *, mesh, rules, seed: int, config: ml_collections.ConfigDict, load) -> Distiller:
  del mesh, rules, seed
  teacher = load(config.distill.teacher, overrides={})  # the teacher's own architecture, as saved
  if teacher.config.vocab_size != decoder.config.vocab_size:
    raise ValueError(f"the teacher's vocab_size={teacher.config.vocab_size} ({config.distill.teacher}) differs from "
                     f"the student's {decoder.config.vocab_size}: distillation needs one tokenizer for both")
  return Distiller(decoder, teacher)


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  online.validate_rl(config, task)
  c = config.distill
  check_choice(config, "distill.kind", KINDS)
  if not c.teacher:
    raise ValueError("config.distill.teacher is empty: give the teacher's run workdir or Hugging Face directory")
  if not 0 <= c.on_policy_fraction <= 1:
    raise ValueError(f"config.distill.on_policy_fraction={c.on_policy_fraction} must be in [0, 1]")
  if c.kind == "step_by_step" and task is None:
    raise ValueError("config.distill.kind='step_by_step' splits rationale from answer by the task's answer "
                     "extractor: give config.task.name")


def eval_prompt(config: ml_collections.ConfigDict, problem: Problem) -> str:
  """How the trained student is asked (step_by_step: with the answer task's prefix)."""
  return (ANSWER_PREFIX if config.distill.kind == "step_by_step" else "") + problem.prompt


def split_rationale(text: str, extract_answer) -> tuple[str, str] | None:
  """A generation ' steps...\\nAnswer: 42' -> (' steps...', ' Answer: 42'): cut at its last answer
  line, else at its last line break; None where that part states no answer (extract_answer)."""
  cut = text.rfind("\n" + TASK_ANSWER_PREFIX)
  cut = text.rfind("\n") if cut < 0 else cut
  if cut < 0 or extract_answer(text[cut:]) is None:
    return None
  return text[:cut], " " + text[cut + 1:].strip()


def _reference_rows(records: list[dict], iteration: int, size: int, tokenizer, *, seed: int, seq_len: int):
  """Iteration i's slice of the task's (prompt, completion) records as rows with completion masks."""
  picked = online.prompt_batch(list(range(len(records))), iteration, size, seed=seed)
  prompts, completions = zip(*(data.prompt_completion_ids(records[i], tokenizer) for i in picked))
  return rollout.token_rows(prompts, completions, seq_len=seq_len)


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  live, rules = context.live, context.rules
  if split != "train":
    raise ValueError("distillation runs are measured by generation; set config.eval_every=0")
  c, rl = config.distill, config.rl
  size = rl.prompts_per_iteration
  pool = online.prompts(config, task)
  meter = flops_lib.Meter()
  student = online.Sampler(lambda: live().decoder, tokenizer, config, rules, meter=meter)
  teacher = online.Sampler(lambda: live().frozen, tokenizer, config, rules, meter=meter)
  records = None
  if c.kind in distill_losses.DISTILLATION_KINDS and c.on_policy_fraction < 1:
    records = sft.records(config, "train", task)  # the task's or the JSONL's reference completions

  def schedule(num_rows, iteration):
    return rollout.epoch_schedule(num_rows, config.batch_size, epochs=rl.epochs,
                                  seed=config.seed * 1_000_003 + iteration)

  def collect(iteration: int, state: dict):
    prompts = online.prompt_batch(pool, iteration, size, seed=config.seed)
    if c.kind in distill_losses.DISTILLATION_KINDS:
      on_policy = np.random.default_rng([config.seed, iteration]).random() < c.on_policy_fraction
      if on_policy:
        samples = student(prompts, iteration, n=1)
        rows = rollout.token_rows(samples.prompt_ids, samples.completion_ids, seq_len=config.seq_len)
      else:
        rows = _reference_rows(records, iteration, size, tokenizer, seed=config.seed, seq_len=config.seq_len)
      state["on_policy_iterations"] = state.get("on_policy_iterations", 0) + int(on_policy)
      return rollout.Experience(rows, schedule(size, iteration)), state
    samples = teacher(prompts, iteration, n=1, temperature=c.teacher_temperature)
    if c.kind == "sequence":
      rows = rollout.sft_rows(samples.prompt_ids, samples.completion_ids, seq_len=config.seq_len)
      return rollout.Experience(rows, schedule(size, iteration)), state
    answer, rationale = [], []  # step_by_step: two tasks per teacher generation that has an answer
    for prompt, text in zip(prompts, samples.texts):
      parts = split_rationale(text, task.extract_answer)
      if parts is not None:
        answer.append((ANSWER_PREFIX + prompt, parts[1]))
        rationale.append((RATIONALE_PREFIX + prompt, parts[0]))
    if len(answer) < config.batch_size:
      raise RuntimeError(f"step_by_step: only {len(answer)} of the teacher's {len(prompts)} generations end in an "
                         f"answer line, fewer than a batch ({config.batch_size}); is distill.teacher trained on the task?")
    logging.info("step_by_step iteration %d: %d of %d teacher generations used", iteration, len(answer), len(prompts))
    rows = {}
    for name, pairs in (("answer", answer), ("rationale", rationale)):
      prompt_ids = [rollout.encode_prompt(tokenizer, p) for p, _ in pairs]
      completion_ids = [[*tokenizer.encode(t), tokenizer.eos_id] for _, t in pairs]
      rows.update({f"{name}_{k}": v for k, v in
                   rollout.sft_rows(prompt_ids, completion_ids, seq_len=config.seq_len).items()})
    return rollout.Experience(rows, schedule(len(answer), iteration)), state

  return rollout.ExperienceSource(collect, workdir=context.workdir, batch_size=config.batch_size, meter=meter)


def token_loss_fn(model: Distiller, batch, rng, *, kind: str, temperature: float, beta: float, whole_batch=None):
  """The student's divergence from the teacher, a mean over the whole batch's completion tokens
  (train.step.LossFn)."""
  del rng
  student = model.decoder(batch["tokens"])
  teacher = model.frozen(batch["tokens"])
  loss, metrics = distill_losses.distillation_loss(student, teacher, batch["mask"], kind=kind,
                                                   temperature=temperature, beta=beta,
                                                   whole_mask=train_losses.whole(batch, whole_batch)["mask"])
  return loss, {**metrics, "tokens": metrics["weight"]}


def step_by_step_loss_fn(model: Distiller, batch, rng, *, rationale_weight: float, z_loss: float, whole_batch=None):
  """answer loss + rationale_weight * rationale loss, each a token mean over its own rows' tokens in
  the whole batch: two normalizers, so each task's loss is its own share (train.step.LossFn). The
  metrics are each task's cross-entropy over this batch."""
  whole = train_losses.whole(batch, whole_batch)

  def task(prefix):
    part, whole_part = ({k[len(prefix):]: v for k, v in b.items() if k.startswith(prefix)} for b in (batch, whole))
    return train_losses.next_token_loss(model.decoder, part, rng, z_loss=z_loss, whole_batch=whole_part)

  answer, answer_metrics = task("answer_")
  rationale, rationale_metrics = task("rationale_")
  tokens = answer_metrics["tokens"] + rationale_metrics["tokens"]
  return answer + rationale_weight * rationale, {
      "distill/answer_loss": answer_metrics["cross_entropy"],
      "distill/rationale_loss": rationale_metrics["cross_entropy"], "weight": tokens, "tokens": tokens,
  }


def row_flops(config: ml_collections.ConfigDict, module: Distiller) -> float:
  """A train step's row: the student trained on its sequence (step_by_step: on two, the answer's and
  the rationale's), and for the token-level kinds the teacher's forward over it."""
  c, seq_len = config.distill, config.seq_len
  if c.kind in distill_losses.DISTILLATION_KINDS:
    return flops_lib.trained(module.decoder.config, seq_len) + flops_lib.frozen(module.frozen.config, seq_len)
  return flops_lib.trained(module.decoder.config, seq_len, 2 if c.kind == "step_by_step" else 1)


def loss_fn(config: ml_collections.ConfigDict):
  c = config.distill
  if c.kind in distill_losses.DISTILLATION_KINDS:
    return functools.partial(token_loss_fn, kind=c.kind, temperature=c.temperature, beta=c.beta)
  if c.kind == "step_by_step":
    return functools.partial(step_by_step_loss_fn, rationale_weight=c.rationale_weight, z_loss=config.z_loss)
  return functools.partial(train_losses.next_token_loss, z_loss=config.z_loss)


METHOD = Method(name="distill", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate, wrap=wrap,
                eval_prompt=eval_prompt, row_flops=row_flops)
