"""Long-context evaluation: passkey retrieval (Mohtashami and Jaggi 2023) and perplexity against
context length, on any checkpoint.

Passkey: a random 5-digit key stated once inside filler text ("The grass is green. ..."), at a
chosen depth (0 = the start, 1 = just before the question), and the prompt ends "What is the pass
key? The pass key is"; the model answers greedily and is right when its continuation's first digits
are the key. A prompt's length is counted in the model's own tokens. Perplexity: held-out text as
one token stream cut into windows of each length, mean NLL over every token of every window.

  python -m align.evaluate --config=configs/infer/passkey.py --config.checkpoint=DIR

(align/evaluate.py) prints a table of accuracy by length and depth, and perplexity by length.
"""

import json
import math
import re
from pathlib import Path
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import infer
from infer.cli import encode_prompt
from train import data as data_lib
from train import losses

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> str:
  """Instruction, filler with "The pass key is KEY. Remember it. KEY is the pass key." at `depth`,
  and the question, about `length` tokens in all (whole filler sentences: never over by more than one)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
  sentences = [s + "." for s in FILLER.split(". ") if s.strip(". ")]
  fixed = len(tokenizer.encode(INSTRUCTION + needle + QUESTION))
  per_sentence = len(tokenizer.encode(FILLER)) / len(sentences)
  count = max(0, math.floor((length - fixed) / per_sentence))
  filler = [sentences[i % len(sentences)] + " " for i in range(count)]
  at = round(depth * count)
  return INSTRUCTION + "".join(filler[:at]) + needle + "".join(filler[at:]) + QUESTION


def passkey_records(tokenizer, count: int, min_length: int, max_length: int, seed: int = 0) -> list[dict]:
  """`count` training examples {"prompt", "completion", "text"}: a passkey prompt of a length drawn
  uniformly from [min_length, max_length] tokens with the key at a uniform depth, its answer " KEY.",
  and the two as one document (for pre-training-style runs; SFT reads prompt and completion)."""
  if not 16 <= min_length <= max_length:
    raise ValueError(f"need 16 <= min_length ({min_length}) <= max_length ({max_length})")
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(count):
    key = str(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
    length, depth = int(rng.integers(min_length, max_length + 1)), float(rng.uniform())
    prompt = passkey_prompt(tokenizer, length, depth, key)
    records.append({"prompt": prompt, "completion": f" {key}.", "text": f"{prompt} {key}."})
  return records


def is_right(continuation: str, key: str) -> bool:
  """The continuation's first run of digits is the key."""
  found = re.search(r"\d+", continuation)
  return found is not None and found.group() == key


def passkey_accuracy(answer: Callable[[list[str]], list[str]], tokenizer, lengths: Sequence[int],
                     depths: Sequence[float], trials: int, seed: int = 0) -> dict[int, dict[float, float]]:
  """{length: {depth: accuracy over `trials` keys}}; `answer(prompts) -> continuations`."""
  rng = np.random.default_rng(seed)
  table: dict[int, dict[float, float]] = {}
  for length in lengths:
    table[length] = {}
    for depth in depths:
      keys = [str(k) for k in rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, trials)]
      texts = answer([passkey_prompt(tokenizer, length, depth, key) for key in keys])
      table[length][depth] = float(np.mean([is_right(t, k) for t, k in zip(texts, keys)]))
  return table


def greedy_answers(model: nnx.Module, tokenizer, *, batch_size: int = 8) -> Callable[[list[str]], list[str]]:
  """The model's greedy continuations (KEY_DIGITS + 3 tokens) of each prompt, in batches."""
  def answer(prompts: list[str]) -> list[str]:
    out = []
    for start in range(0, len(prompts), batch_size):
      ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
      tokens = infer.generate(model, ids, max_new_tokens=KEY_DIGITS + 3).tokens
      out += [tokenizer.decode(t) for t in tokens]
    return out
  return answer


@jax.jit
def _window_nll(graphdef, state, tokens):  # tokens [B, L + 1] -> summed NLL [B] of tokens 1..L
  model = nnx.merge(graphdef, state)
  nll, _ = losses.token_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
  return jnp.sum(nll, axis=1)


def perplexity_by_length(model: nnx.Module, stream: np.ndarray, lengths: Sequence[int], *,
                         windows: int) -> dict[int, float]:
  """{L: exp(mean NLL)} over `windows` consecutive windows of L + 1 tokens of `stream` (each
  window's tokens after its first are predicted, with the window as their whole context)."""
  graphdef, state = nnx.split(model)
  out = {}
  for length in lengths:
    if len(stream) < windows * (length + 1):
      raise ValueError(f"the held-out text has {len(stream)} tokens: too few for {windows} windows of {length + 1}")
    rows = np.asarray(stream[: windows * (length + 1)], np.int32).reshape(windows, length + 1)
    out[length] = float(np.exp(np.sum(_window_nll(graphdef, state, jnp.asarray(rows))) / (windows * length)))
  return out


def held_out_stream(data_config: ml_collections.ConfigDict, tokenizer, max_tokens: int) -> np.ndarray:
  """The held-out documents of `data_config` (a run's config.data) as one token stream, each
  document after a bos token when the tokenizer has one."""
  ids: list[int] = []
  for text in data_lib.documents(data_config, "eval"):
    ids += [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    ids += list(tokenizer.encode(text))
    if len(ids) >= max_tokens:
      break
  return np.asarray(ids[:max_tokens], np.int32)


def run_data_config(checkpoint) -> ml_collections.ConfigDict | None:
  """config.data of a run's workdir (its config.json); None for a Hugging Face directory."""
  path = Path(checkpoint) / "config.json"
  saved = json.loads(path.read_text()) if path.exists() else {}
  return ml_collections.ConfigDict(saved["data"]) if "data" in saved and "model_type" not in saved else None
