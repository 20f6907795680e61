"""The run's tokenizer: a sentencepiece model, trained on the run's own text or given as a file.

`config.tokenizer` keys (defaults in configs/common.py, `tokenizer_config()`):
  path            str   an existing sentencepiece .model (e.g. Llama 2's); '' trains a new one
  vocab_size      int   size of a newly trained vocabulary, specials and byte pieces included
  model_type      str   'bpe' or 'unigram' (a new tokenizer only)
  byte_fallback   bool  unknown characters become their UTF-8 bytes (<0x..> pieces), never <unk>;
                        with False, newlines and unseen characters encode as <unk>
  special_tokens  str   comma-separated symbols that always encode as one id (e.g. '<|user|>,<|end|>')

A run's tokenizer lives in `workdir/tokenizer.model`: the first run writes it (trained, or copied
from `path`), and a resumed run and the inference package load that same file.

A newly trained model has pad=0, unk=1, bos=2, eos=3, then the special tokens, then the rest.
Text is not normalised (identity rule, whitespace kept) so decode(encode(text)) == text.
"""

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import ml_collections
import sentencepiece as spm

from rundir.atomic import write_atomic

MODEL_FILENAME = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece skips training sentences longer than max_sentence_length bytes; we cut lines into
# pieces of at most this many characters (<= 4 bytes each in UTF-8) so no text is silently lost.
_MAX_LINE_CHARS = 4096


class Tokenizer:
  """A sentencepiece model; `encode` adds no bos/eos (the data pipeline adds them per document).

  A given model may lack some ids: sentencepiece reports -1 (Llama 2's has no pad; the data
  pipeline pads with 0 under loss_mask 0 whatever the tokenizer says).
  """

  def __init__(self, processor: spm.SentencePieceProcessor, path: str | os.PathLike):
    self._sp = processor
    self._path = Path(path)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def path(self) -> Path:
    return self._path

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def __repr__(self) -> str:
    return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer model {path} does not exist")
  processor = spm.SentencePieceProcessor()
  try:
    processor.load(str(path))
  except (OSError, RuntimeError) as e:
    raise ValueError(f"{path} is not a sentencepiece model: {e}") from e
  return Tokenizer(processor, path)


def _training_lines(texts: Iterable[str], max_sentences: int) -> Iterator[str]:
  """Non-empty lines of `texts`, long ones cut, at most `max_sentences` of them.

  sentencepiece learns from "sentences"; lines are the natural unit here. Newlines themselves
  are then byte-fallback pieces (<0x0A>), as in Llama's tokenizer.
  """
  count = 0
  for text in texts:
    for line in text.split("\n"):
      for start in range(0, len(line), _MAX_LINE_CHARS):
        piece = line[start : start + _MAX_LINE_CHARS]
        if not piece.strip():
          continue
        if count >= max_sentences:
          return
        count += 1
        yield piece


def train_tokenizer(
    texts: Iterable[str],
    path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = (),
    max_sentences: int = 2_000_000,
) -> Tokenizer:
  """Trains a sentencepiece model on the lines of `texts` and writes it to `path` atomically.

  Deterministic: the same texts give a byte-identical model (one thread, no sampling of input).
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is unknown; known: {MODEL_TYPES}")
  special_tokens = [s for s in special_tokens if s]
  if len(set(special_tokens)) != len(special_tokens):
    raise ValueError(f"special_tokens={special_tokens} has duplicates")
  lines = list(_training_lines(texts, max_sentences))
  if not lines:
    raise ValueError("cannot train a tokenizer: the training texts are empty")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        user_defined_symbols=special_tokens,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        # Keep text as it is (Llama's choice): exact round trips, code indentation survives.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995 if byte_fallback else 1.0,
        input_sentence_size=0,  # use every line given; sampling them would need a seed
        max_sentence_length=4 * _MAX_LINE_CHARS,
        num_threads=1,  # determinism; bpe on a few MB takes about a second anyway
        minloglevel=2,
    )
  except RuntimeError as e:
    # sentencepiece's own message says what bound was hit (e.g. "set it to a value <= 286").
    raise ValueError(
        f"training a {model_type} tokenizer with vocab_size={vocab_size} on {len(lines)} lines failed: {e}"
    ) from None
  path = Path(path)
  write_atomic(path, model.getvalue())
  return load_tokenizer(path)


def _special_tokens(value: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(value, str):
    return tuple(s.strip() for s in value.split(",") if s.strip())
  return tuple(value)


def _wait_for(path: Path, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while not path.is_file():
    if time.monotonic() > deadline:
      raise TimeoutError(
          f"process {jax.process_index()} waited {timeout_s:.0f} s for process 0 to write {path}; "
          "is the workdir on a filesystem every process shares, and did process 0 fail?"
      )
    time.sleep(0.5)


def get_tokenizer(
    tokenizer_config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    texts_fn: Callable[[], Iterable[str]],
    *,
    timeout_s: float = 1800.0,
) -> Tokenizer:
  """The tokenizer of the run in `workdir`: its saved one, else `config.tokenizer.path`, else a new one.

  Only process 0 writes `workdir/tokenizer.model`; the others wait for it (shared filesystem).
  `texts_fn()` gives the training texts and is only called when a tokenizer must be trained.
  """
  target = Path(workdir) / MODEL_FILENAME
  if target.is_file():
    return load_tokenizer(target)
  source = tokenizer_config.path
  if source and not Path(source).is_file():
    raise FileNotFoundError(f"config.tokenizer.path={source!r} does not exist")
  if jax.process_index() != 0:
    _wait_for(target, timeout_s)
    return load_tokenizer(target)
  if source:
    load_tokenizer(source)  # fail here, naming the file, if it is not a sentencepiece model
    with open(source, "rb") as f:
      write_atomic(target, f.read())
    return load_tokenizer(target)
  texts = list(texts_fn())  # read here, so that a data error is not reported as a tokenizer one
  try:
    return train_tokenizer(
        texts,
        target,
        vocab_size=tokenizer_config.vocab_size,
        model_type=tokenizer_config.model_type,
        byte_fallback=tokenizer_config.byte_fallback,
        special_tokens=_special_tokens(tokenizer_config.special_tokens),
    )
  except ValueError as e:
    raise ValueError(f"config.tokenizer: {e}") from e
