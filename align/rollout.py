"""Learning from the policy's own samples: sampling with infer/, samples as token rows, and the
experience source that feeds them to the one trainer loop.

The online methods (PPO, GRPO/RLOO, ReST, RAFT, rejection sampling, STaR, on-policy distillation)
differ in what they do with samples, not in how they get them. Each gives an `ExperienceSource` its
`collect(iteration, state) -> (Experience, state)`; the source calls it whenever the trainer has
used up the current experience, sampling from the *live* parameters (the trainer's current state,
on the training mesh, no copy), and then serves the experience's schedule of minibatches, one per
trainer step. Each experience is kept in the workdir (`rollouts/<iteration>.npz`, written
atomically), so a run resumed mid-iteration trains on the very same samples. An experience may ask
the trainer to train on it from the run's starting parameters (`Experience.restart`: its first
minibatch carries train.trainer.RESTART). What making an experience computed (generation, scoring
forwards), counted on the source's train.flops.Meter during its collect, is its `flops`, which its
first minibatch reports to the trainer (train.trainer.FLOPS).
"""

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import infer
from align import data
from model import sharding
from train import flops as flops_lib
from train import losses as train_losses
from train import trainer

ROLLOUT_DIR = "rollouts"
KEEP_EXPERIENCE = 8  # experience files kept in the workdir (older ones are deleted)


@dataclasses.dataclass
class Samples:
  """n completions per prompt, prompt-major: row p * n + i is prompt p's i-th sample."""

  prompt_ids: list[list[int]]  # [R] the prompt's ids (bos included), repeated n times
  completion_ids: list[list[int]]  # [R] generated ids (a stop token, when met, kept last)
  finished: np.ndarray  # [R] bool: ended with a stop token (False: cut by the length budget)
  texts: list[str]  # [R] the completions as text (stop token dropped)


def encode_prompt(tokenizer, text: str) -> list[int]:
  ids = tokenizer.encode(text)
  return [tokenizer.bos_id, *ids] if tokenizer.bos_id >= 0 else ids


def completion_text(tokenizer, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
  """The completion's text as it reads after the prompt (sentencepiece's word-initial spaces kept):
  what a verifier or a reader sees. To train on a sample stored as text, store `training_text`."""
  ids = _text_ids(tokenizer, completion_ids)
  full, head = tokenizer.decode([*prompt_ids, *ids]), tokenizer.decode(list(prompt_ids))
  return full[len(head):] if full.startswith(head) else tokenizer.decode(ids)


def training_text(tokenizer, completion_ids: Sequence[int]) -> str:
  """The completion's text in the form training data holds a completion: tokenized on its own, as
  `align.data.tokenize_pieces` tokenizes one, it gives back completion_ids (ids as the tokenizer
  would segment the text, which a trained policy's are). A policy's samples kept as text to train on
  (AI-feedback pairs, RRHF's rankings) must be these: with sentencepiece the in-context text has one
  more leading space (the completion's own word-initial space, which decoding on its own drops), so
  it re-tokenizes to another first token, and the pair or ranking would train on text the policy did
  not sample."""
  return tokenizer.decode(_text_ids(tokenizer, completion_ids))


def _text_ids(tokenizer, completion_ids: Sequence[int]) -> list[int]:
  return [t for t in completion_ids if 0 <= t < tokenizer.vocab_size and t != tokenizer.eos_id]


def sample(model, tokenizer, prompts: Sequence[str], *, n: int = 1, max_new_tokens: int,
           sampling: infer.Sampling = infer.Sampling(temperature=1.0), seed: int = 0, rules=None,
           rows_per_call: int = 256) -> Samples:
  """n samples per prompt from `model` (on the mesh its parameters live on), rows_per_call rows per
  generate call. A row's randomness depends only on (seed, its row index), not on the chunking."""
  if n < 1:
    raise ValueError(f"n={n} must be >= 1")
  encoded = [encode_prompt(tokenizer, p) for p in prompts]
  stop = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
  rows = [ids for ids in encoded for _ in range(n)]
  per_call = max(rows_per_call // n, 1) * n
  completions, finished = [], []
  for start in range(0, len(rows), per_call):
    chunk = rows[start: start + per_call]
    seeds = [seed * 1_000_003 + start + i for i in range(len(chunk))]
    out = infer.generate(model, chunk, max_new_tokens=max_new_tokens, sampling=sampling, rng=seeds,
                         stop_tokens=stop, rules=rules)
    completions += out.tokens
    finished += [reason == "stop" for reason in out.finish_reasons]
  texts = [completion_text(tokenizer, p, c) for p, c in zip(rows, completions)]
  return Samples(rows, completions, np.asarray(finished, bool), texts)


def token_rows(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
               seq_len: int) -> dict[str, np.ndarray]:
  """Prompt + completion per row, right-padded to seq_len: tokens, targets, mask [R, T] int32, the
  mask on the completion's targets (prompt and padding are 0); a row too long loses its end."""
  rows = len(prompt_ids)
  out = {k: np.zeros((rows, seq_len), np.int32) for k in ("tokens", "targets", "mask")}
  for r, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
    if len(prompt) >= seq_len + 1:
      raise ValueError(f"prompt {r} has {len(prompt)} tokens; seq_len={seq_len} leaves no room for a completion")
    ids = np.asarray([*prompt, *completion], np.int32)[: seq_len + 1]
    n = len(ids) - 1
    out["tokens"][r, :n] = ids[:-1]
    out["targets"][r, :n] = ids[1:]
    out["mask"][r, len(prompt) - 1: n] = 1  # target j is token j + 1: the first completion token is target len(prompt) - 1
  return out


def sft_rows(prompt_ids, completion_ids, *, seq_len: int) -> dict[str, np.ndarray]:
  """The next-token loss's batch fields for unpacked rows (one sample per row, right-padded)."""
  rows = token_rows(prompt_ids, completion_ids, seq_len=seq_len)
  lengths = np.asarray([min(len(p) + len(c) - 1, seq_len) for p, c in zip(prompt_ids, completion_ids)])
  real = np.arange(seq_len)[None, :] < lengths[:, None]
  return {"tokens": rows["tokens"], "targets": rows["targets"], "loss_mask": rows["mask"],
          "segment_ids": real.astype(np.int32), "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                                             rows["tokens"].shape).copy()}


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _score(graphdef, state, tokens, targets, *, temperature: float):
  logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
  nll, _ = train_losses.token_cross_entropy(logits / temperature, targets)
  return -nll


def in_chunks(fn, *arrays: np.ndarray, batch_size: int):
  """fn(*chunks) -> arrays [b, ...] (or a tuple of them), called on batch_size rows of each [R, ...]
  array at a time, the last chunk zero-padded so one compiled shape serves every call; outputs
  concatenated."""
  outs = []
  for start in range(0, len(arrays[0]), batch_size):
    chunks = [a[start: start + batch_size] for a in arrays]
    n = len(chunks[0])
    if n < batch_size:
      chunks = [np.concatenate([a, np.zeros((batch_size - n, *a.shape[1:]), a.dtype)]) for a in chunks]
    out = fn(*(jnp.asarray(a) for a in chunks))
    outs.append(tuple(sharding.to_host(o)[:n] for o in (out if isinstance(out, tuple) else (out,))))
  merged = tuple(np.concatenate(parts) for parts in zip(*outs))
  return merged if len(merged) > 1 else merged[0]


def token_logprobs(model, tokens: np.ndarray, targets: np.ndarray, *, temperature: float = 1.0,
                   batch_size: int = 64) -> np.ndarray:
  """log p(target) [R, T] float32 under `model` (a language model: tokens [B, T] -> logits [B, T, V])
  with its logits divided by temperature, batch_size rows per (jitted) call."""
  graphdef, state = nnx.split(model)
  fn = functools.partial(_score, graphdef, state, temperature=float(temperature))
  return in_chunks(fn, tokens, targets, batch_size=batch_size)


@dataclasses.dataclass
class Experience:
  """Rows [R, ...] of training data and the schedule [S, B] of row indices: minibatch s is rows
  schedule[s]. Row arrays of any rank; the trainer places them along the batch axis. restart: the
  trainer puts the parameters and optimizer state back to the run's start before minibatch 0.
  flops: what making it computed outside the train step (ExperienceSource adds its meter's count)."""

  rows: dict[str, np.ndarray]
  schedule: np.ndarray
  restart: bool = False
  flops: float = 0.0

  def __post_init__(self):
    sizes = {k: len(v) for k, v in self.rows.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"experience rows differ in length: {sizes}")
    if self.schedule.ndim != 2 or not len(self.schedule):
      raise ValueError(f"the schedule must be a non-empty [steps, batch] array, got shape {self.schedule.shape}")


def epoch_schedule(num_rows: int, batch_size: int, *, epochs: int, seed: int) -> np.ndarray:
  """[epochs * floor(num_rows / batch_size), batch_size]: each epoch a fresh permutation of the rows
  cut into minibatches (PPO's several epochs of minibatches per rollout batch)."""
  if num_rows < batch_size:
    raise ValueError(f"{num_rows} rows cannot fill one minibatch of batch_size={batch_size}")
  rng = np.random.default_rng(seed)
  per_epoch = num_rows // batch_size
  return np.concatenate([rng.permutation(num_rows)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
                         for _ in range(epochs)])


def cycle_schedule(row_ids: np.ndarray, batch_size: int, *, steps: int, seed: int) -> np.ndarray:
  """[steps, batch_size] drawn from row_ids: shuffled passes over them, as many as `steps` needs
  (a fine-tuning set smaller than a batch is repeated)."""
  row_ids = np.asarray(row_ids)
  if not len(row_ids):
    raise ValueError("no rows to schedule")
  rng = np.random.default_rng(seed)
  need = steps * batch_size
  order = np.concatenate([rng.permutation(row_ids) for _ in range(-(-need // len(row_ids)))])
  return order[:need].reshape(steps, batch_size)


def experience_path(workdir, iteration: int) -> Path:
  """Where an ExperienceSource in `workdir` keeps iteration i's experience (the last KEEP_EXPERIENCE
  of them): a method that builds on its previous experience (STaR's growing set) reads it there."""
  return Path(workdir) / ROLLOUT_DIR / f"{iteration}.npz"


def save_experience(path: Path, experience: Experience, state_out: dict[str, Any]) -> None:
  """An iteration's experience and the method state after it, written atomically (npz)."""
  data.save_npz_atomic(path, schedule=experience.schedule, state_out=json.dumps(state_out),
                       restart=np.asarray(experience.restart), flops=np.asarray(experience.flops, np.float64),
                       **{f"row/{k}": v for k, v in experience.rows.items()})


def load_experience(path: Path) -> tuple[Experience, dict[str, Any]]:
  """What save_experience wrote: (the experience, the method state after it)."""
  with np.load(path) as saved:
    rows = {k[len("row/"):]: saved[k] for k in saved.files if k.startswith("row/")}
    restart = bool(saved["restart"]) if "restart" in saved.files else False
    flops = float(saved["flops"]) if "flops" in saved.files else 0.0
    return Experience(rows, saved["schedule"], restart, flops), json.loads(str(saved["state_out"]))


Collect = Callable[[int, dict[str, Any]], tuple[Experience, dict[str, Any]]]


class ExperienceSource(grain.IterDataset):
  """The trainer's data for an online method: `collect` is called for iteration 0, 1, ... whenever
  the current experience's schedule is used up; each step yields this process's rows of one
  minibatch. `state` is the method's own JSON state (an adaptive KL coefficient, say), carried
  from one collect to the next and saved with the iterator. `meter`: where the method counts what a
  collect computes (its online.Sampler, reward function and scoring forwards count on it)."""

  def __init__(self, collect: Collect, *, workdir, batch_size: int, initial_state: dict[str, Any] | None = None,
               meter: flops_lib.Meter | None = None):
    super().__init__()
    self._collect, self._workdir, self._batch_size = collect, Path(workdir), batch_size
    self._initial_state = dict(initial_state or {})
    self._meter = meter or flops_lib.Meter()

  def __iter__(self):
    return _ExperienceIterator(self._collect, self._workdir, self._batch_size, self._initial_state, self._meter)


class _ExperienceIterator(grain.DatasetIterator):

  def __init__(self, collect: Collect, workdir: Path, batch_size: int, initial_state: dict[str, Any],
               meter: flops_lib.Meter):
    super().__init__()
    self._collect, self._workdir, self._batch_size, self._meter = collect, workdir, batch_size, meter
    self._dir = workdir / ROLLOUT_DIR
    self._iteration, self._position = -1, 0
    # The method's state going into the current iteration's collect, and coming out of it.
    self._state_in, self._state_out = dict(initial_state), dict(initial_state)
    self._experience: Experience | None = None
    self._loaded = -1

  def _path(self, iteration: int) -> Path:
    return experience_path(self._workdir, iteration)

  def _collect_current(self) -> None:
    self._meter.take()  # what was counted before this collect is not its cost
    experience, self._state_out = self._collect(self._iteration, dict(self._state_in))
    experience = dataclasses.replace(experience, flops=experience.flops + self._meter.take())
    if experience.schedule.shape[1] != self._batch_size:
      raise ValueError(f"the schedule's minibatches have {experience.schedule.shape[1]} rows, the batch "
                       f"size is {self._batch_size}")
    self._experience, self._loaded = experience, self._iteration
    if jax.process_index() == 0:
      self._dir.mkdir(parents=True, exist_ok=True)
      save_experience(self._path(self._iteration), experience, self._state_out)
      for old in self._dir.glob("*.npz"):
        if old.stem.isdigit() and int(old.stem) <= self._iteration - KEEP_EXPERIENCE:
          old.unlink(missing_ok=True)

  def _reload(self) -> None:
    """After set_state: the saved experience of the current iteration, or, when it was deleted, the
    same iteration collected again from the restored parameters (then no longer exact, and its
    FLOPs, counted when its first minibatch was trained on, not counted again)."""
    path = self._path(self._iteration)
    if not path.exists():
      logging.warning("%s is missing: collecting iteration %d again from the restored parameters", path,
                      self._iteration)
      self._collect_current()
      return
    self._experience, self._state_out = load_experience(path)
    self._loaded = self._iteration

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iteration >= 0 and self._loaded != self._iteration:
      self._reload()
    if self._experience is None or self._position >= len(self._experience.schedule):
      self._iteration, self._position, self._state_in = self._iteration + 1, 0, self._state_out
      self._collect_current()
    ids = self._experience.schedule[self._position]
    first = self._position == 0
    self._position += 1
    per_process = self._batch_size // jax.process_count()
    mine = ids[jax.process_index() * per_process: (jax.process_index() + 1) * per_process]
    batch = {k: v[mine] for k, v in self._experience.rows.items()}
    if first and self._experience.restart:
      batch[trainer.RESTART] = np.asarray(True)
    if first:
      batch[trainer.FLOPS] = np.asarray(self._experience.flops, np.float64)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"iteration": self._iteration, "position": self._position, "method_state": self._state_in}

  def set_state(self, state: dict[str, Any]) -> None:
    self._iteration, self._position = int(state["iteration"]), int(state["position"])
    self._state_in = self._state_out = dict(state["method_state"])
    self._experience, self._loaded = None, -1
