"""Documents -> packed, batched, checkpointable token rows, with grain.

`config.data` keys (defaults in configs/common.py, `data_config()`):
  source         'default': the embedded corpus (docstrings and comments of Python's stdlib);
                 'text': UTF-8 files, documents separated by blank lines (text_unit='paragraph')
                         or one document per file (text_unit='file');
                 'jsonl': one JSON object per line, the document in `text_field`;
                 'array_record': grain's random-access format; a record is UTF-8 text, or a JSON
                         object (starts with '{') holding the document in `text_field`
  paths          comma-separated files or glob patterns (** allowed); not for 'default'
  eval_paths     held-out files in the same format; '' holds out `eval_percent` of the documents
  eval_percent   float, share of documents held out when eval_paths is '' (a stable hash of each
                 document's file name and index in its file, so the split never moves)
  text_field     the JSON key of the document text ('jsonl', 'array_record')
  text_unit      'paragraph' or 'file' ('text' only)
  num_threads    threads that read and tokenize documents
  prefetch_buffer  batches prepared ahead of the trainer, in a background thread (0: none)
  process_sharding  how the train split is divided between processes:
                 'rows': every process reads and packs the same global stream and keeps its rows of
                         each global batch, so a run's batches (and losses) do not depend on how
                         many hosts it runs on, and it can resume on another topology;
                 'documents': each process reads only its 1/P of the documents (for corpora that
                         are too large to tokenize on every host); batches then depend on P.
The shuffle seed is the run's `seed`, passed to `make_dataset`.

A batch is a dict of int32 arrays [B, T], B = global_batch_size // process_count (this process's
rows), T = seq_len:
  tokens       inputs: a document is bos + ids + eos (no bos if the tokenizer has none), and
               its tokens are all but the last
  targets      the next token of the same document (so a document's last input predicts its eos)
  segment_ids  1, 2, 3... for the documents of a row, 0 on padding
  positions    position within the document's piece in this row, restarting at 0 per segment
  loss_mask    1 on real tokens, 0 on padding
Documents are concatenated and cut into rows (grain's ConcatThenSplit): a long document continues
in the next row as a new segment with positions from 0, and rows have no padding except at the
end of a finite stream.

Splits. 'train' is divided between processes as `process_sharding` says, shuffles each epoch anew
from the seed, and repeats forever (num_epochs=None); partial batches are dropped.
'eval' is one pass in file order, not shuffled; every process reads the whole split and keeps its
rows of each global batch, so all processes see the same number of batches (a collective step
never waits on a process that has run out), and the last batch is padded with empty rows
(loss_mask 0).

Text and JSONL files are read into memory (and cached per file); ArrayRecord is read lazily,
record by record, which is the format for corpora larger than host memory.
"""

import atexit
import functools
import glob
import json
import os
import re
import weakref
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from train import corpus

SOURCES = ("default", "text", "jsonl", "array_record")
TEXT_UNITS = ("paragraph", "file")
SPLITS = ("train", "eval")
PROCESS_SHARDINGS = ("rows", "documents")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_DOCS_IN_FLIGHT = 256  # documents tokenized ahead of packing


# ---------------------------------------------------------------------------- reading documents


def resolve_paths(spec: str, key: str = "config.data.paths") -> list[Path]:
  """Comma-separated files and glob patterns -> existing files, each pattern's matches sorted."""
  found: list[Path] = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    item = os.path.expanduser(item)
    if glob.has_magic(item):
      matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(f"{key}: the pattern {item!r} matches no file")
      found.extend(matches)
    elif os.path.isdir(item):
      raise IsADirectoryError(f"{key}: {item!r} is a directory; give files or a pattern like {item}/*.txt")
    elif not os.path.isfile(item):
      raise FileNotFoundError(f"{key}: the file {item!r} does not exist")
    else:
      found.append(Path(item))
  if not found:
    raise ValueError(f"{key} is empty; give comma-separated files or glob patterns")
  return list(dict.fromkeys(found))  # a file named twice is read once


def _file_key(path: Path) -> tuple[str, int, int]:
  """Cache key: the file's contents are assumed unchanged while its size and mtime are."""
  stat = path.stat()
  return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=256)
def _text_documents(file: tuple[str, int, int], unit: str) -> tuple[str, ...]:
  text = Path(file[0]).read_text(encoding="utf-8")
  pieces = [text] if unit == "file" else _PARAGRAPH_BREAK.split(text)
  return tuple(p.strip() for p in pieces if p.strip())


@functools.lru_cache(maxsize=256)
def _jsonl_documents(file: tuple[str, int, int], field: str) -> tuple[str, ...]:
  docs = []
  with open(file[0], encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        docs.append(_field(line, field, f"{file[0]}, line {number}"))
  return tuple(docs)


def _field(line: str, field: str, where: str) -> str:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict) or field not in obj:
    keys = sorted(obj) if isinstance(obj, dict) else f"none: it is a {type(obj).__name__}"
    raise ValueError(f"{where} has no field {field!r} (config.data.text_field); its keys: {keys}")
  if not isinstance(obj[field], str):
    raise ValueError(f"{where}: field {field!r} is a {type(obj[field]).__name__}, not a string")
  return obj[field]


class _ArrayRecordTexts(Sequence):
  """The records of ArrayRecord files as texts, read on access (for corpora beyond memory)."""

  def __init__(self, files: list[Path], field: str):
    self._sources = [grain.sources.ArrayRecordDataSource(str(f)) for f in files]
    self._files, self._field = files, field
    self.counts = [len(s) for s in self._sources]
    self._starts = np.cumsum([0] + self.counts)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> str:
    file = int(np.searchsorted(self._starts, index, side="right")) - 1
    record = self._sources[file][index - int(self._starts[file])]
    where = f"{self._files[file]}, record {index - int(self._starts[file])}"
    try:
      text = record.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _field(text, self._field, where) if text.lstrip().startswith("{") else text


def _keys(names: Sequence[str], counts: Sequence[int]) -> np.ndarray:
  """One split key per document: crc32 of its file's name (not its full path, so that the split
  survives moving the data) in the high 32 bits, its index in the file in the low 32 bits."""
  files = np.repeat(np.array([zlib.crc32(n.encode()) for n in names], np.uint64), counts)
  within = np.concatenate([np.arange(c, dtype=np.uint64) for c in counts] or [np.zeros(0, np.uint64)])
  return (files << np.uint64(32)) | within


def _load(data_config, key: str) -> tuple[Sequence[str], np.ndarray]:
  """(texts, split keys) of the files of `config.data.<key>`, or of the embedded corpus."""
  source, spec = data_config.source, data_config[key]
  if source not in SOURCES:
    raise ValueError(f"config.data.source={source!r} is unknown; known sources: {SOURCES}")
  if source == "default":
    if spec:
      raise ValueError(f"config.data.{key}={spec!r} is set, but config.data.source='default' reads no files")
    named = corpus.stdlib_documents()
    return [text for _, text in named], _keys([name for name, _ in named], [1] * len(named))
  files = resolve_paths(spec, f"config.data.{key}")
  if source == "array_record":
    texts = _ArrayRecordTexts(files, data_config.text_field)
    counts = texts.counts
  else:
    if source == "text" and data_config.text_unit not in TEXT_UNITS:
      raise ValueError(f"config.data.text_unit={data_config.text_unit!r} is unknown; known: {TEXT_UNITS}")
    per_file = [
        _text_documents(_file_key(f), data_config.text_unit) if source == "text"
        else _jsonl_documents(_file_key(f), data_config.text_field)
        for f in files
    ]
    texts, counts = [d for docs in per_file for d in docs], [len(docs) for docs in per_file]
  if not len(texts):
    raise ValueError(f"config.data.{key}: the {source} files {[str(f) for f in files]} hold no documents")
  return texts, _keys([f.name for f in files], counts)


def _held_out(keys: np.ndarray, eval_percent: float) -> np.ndarray:
  """A stable pseudo-random share of the documents (splitmix64's finalizer spreads the keys)."""
  h = keys.copy()
  h ^= h >> np.uint64(30)
  h *= np.uint64(0xBF58476D1CE4E5B9)
  h ^= h >> np.uint64(27)
  h *= np.uint64(0x94D049BB133111EB)
  h ^= h >> np.uint64(31)
  held = h % np.uint64(10_000) < np.uint64(round(eval_percent * 100))
  if eval_percent > 0 and not held.any() and len(keys) > 1:
    held[np.argmin(h)] = True  # a small corpus still gets a held-out document
  return held


class _Subset(Sequence):
  def __init__(self, texts: Sequence[str], indices: np.ndarray):
    self._texts, self._indices = texts, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> str:
    return self._texts[int(self._indices[i])]


def documents(data_config: ml_collections.ConfigDict, split: str) -> Sequence[str]:
  """The texts of one split, in file order (random access; lazy for ArrayRecord)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")
  if data_config.eval_paths:
    return _load(data_config, "eval_paths" if split == "eval" else "paths")[0]
  if not 0 <= data_config.eval_percent < 100:
    raise ValueError(f"config.data.eval_percent={data_config.eval_percent} must be in [0, 100)")
  texts, keys = _load(data_config, "paths")
  held = _held_out(keys, data_config.eval_percent)
  indices = np.flatnonzero(held if split == "eval" else ~held)
  if not len(indices):
    raise ValueError(
        f"the {split} split of config.data is empty: {len(texts)} documents, "
        f"eval_percent={data_config.eval_percent}; change eval_percent or set eval_paths"
    )
  return _Subset(texts, indices)


def training_texts(data_config: ml_collections.ConfigDict, *, seed: int, max_chars: int = 20_000_000) -> list[str]:
  """Train-split documents for the tokenizer: a seeded sample of at most about `max_chars` characters."""
  docs = documents(data_config, "train")
  order = np.random.default_rng(seed).permutation(len(docs))
  texts, total = [], 0
  for i in order:
    if total >= max_chars:
      break
    texts.append(docs[int(i)])
    total += len(texts[-1])
  return texts


# ---------------------------------------------------------------------------- the pipeline


def _collate(rows: Sequence[dict[str, np.ndarray]], num_rows: int) -> dict[str, np.ndarray]:
  """Packed rows -> the batch dict, padded with empty rows (segment 0) up to `num_rows`."""
  seq_len = len(rows[0]["inputs"])
  batch = {k: np.zeros((num_rows, seq_len), np.int32) for k in BATCH_KEYS}
  for i, row in enumerate(rows):
    batch["tokens"][i] = row["inputs"]
    batch["targets"][i] = row["targets"]
    batch["segment_ids"][i] = row["inputs_segment_ids"]
    batch["positions"][i] = row["inputs_positions"]
  batch["loss_mask"][:] = batch["segment_ids"] > 0
  return batch


def make_dataset(
    data_config: ml_collections.ConfigDict,
    tokenizer,
    *,
    split: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> grain.IterDataset:
  """This process's batches of `split` (see the module docstring); iterate it for a checkpointable iterator.

  num_epochs: None is forever for 'train' and one pass for 'eval'.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size)):
    if value <= 0:
      raise ValueError(f"{name}={value} must be positive")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs={num_epochs} must be positive (or None)")
  if data_config.process_sharding not in PROCESS_SHARDINGS:
    raise ValueError(
        f"config.data.process_sharding={data_config.process_sharding!r} is not one of {PROCESS_SHARDINGS}"
    )
  rows = global_batch_size // process_count
  by_documents = split == "train" and data_config.process_sharding == "documents"
  docs = grain.MapDataset.source(documents(data_config, split))
  if split == "train":
    if by_documents:
      if len(docs) < process_count:
        raise ValueError(f"the train split has {len(docs)} documents, fewer than the {process_count} processes")
      docs = docs[process_index::process_count]
    docs = docs.shuffle(seed=seed % 2**32).repeat(num_epochs)
  elif num_epochs is not None and num_epochs > 1:
    docs = docs.repeat(num_epochs)
  bos, eos = tokenizer.bos_id, tokenizer.eos_id

  def tokenize(text: str) -> dict[str, np.ndarray]:
    ids = np.array([bos, *tokenizer.encode(text), eos], np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}

  read = grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=_DOCS_IN_FLIGHT)
  ds = docs.map(tokenize).to_iter_dataset(read)
  # Packs the two features identically, so a target always sits beside its own input.
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
  if by_documents:
    ds = ds.batch(rows, drop_remainder=True, batch_fn=functools.partial(_collate, num_rows=rows))
  else:  # the global batch, of which this process keeps its rows
    ds = ds.batch(
        global_batch_size, drop_remainder=split == "train",
        batch_fn=functools.partial(_collate, num_rows=global_batch_size),
    )
    lo, hi = process_index * rows, (process_index + 1) * rows
    ds = ds.map(lambda batch: {k: v[lo:hi] for k, v in batch.items()})
  if data_config.prefetch_buffer > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_config.prefetch_buffer)
  return _JsonStateIterDataset(ds)


def checkpointable(dataset: grain.IterDataset) -> grain.IterDataset:
  """`dataset` with an iterator whose state survives JSON (a no-op for make_dataset's own)."""
  return dataset if isinstance(dataset, _JsonStateIterDataset) else _JsonStateIterDataset(dataset)


class _JsonStateIterDataset(grain.IterDataset):
  """Gives the pipeline's iterator a state that survives JSON (as orbax stores it) and a clean exit."""

  def __iter__(self):
    return _JsonStateIterator(self._parent.__iter__())


_LIVE_ITERATORS: "weakref.WeakSet[_JsonStateIterator]" = weakref.WeakSet()


class _JsonStateIterator(grain.DatasetIterator):
  """grain 0.2.18's ConcatThenSplit keeps slices as tuples and compares them with (-1, -1); JSON
  brings them back as lists, which it would misread as real slices and resume elsewhere."""

  def __init__(self, inner: grain.DatasetIterator):
    super().__init__()  # holds the pipeline itself (not as a grain parent) so it can let go at exit
    self._inner = inner
    _LIVE_ITERATORS.add(self)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return json.loads(json.dumps(self._inner.get_state()))

  def set_state(self, state: dict[str, Any]) -> None:
    self._inner.set_state(_with_tuple_slices(state))

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()


@atexit.register
def _release_iterators() -> None:
  """grain's prefetch iterators stop their threads in __del__, which at interpreter exit would run
  after the modules it needs are gone (a traceback on every exit); stop and drop them while they exist."""
  for it in list(_LIVE_ITERATORS):
    it.close()
    it._inner = None  # pylint: disable=protected-access


def _with_tuple_slices(state: Any) -> Any:
  if isinstance(state, dict):
    return {
        k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _with_tuple_slices(v)
        for k, v in state.items()
    }
  return state
