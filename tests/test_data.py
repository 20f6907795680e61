"""The grain pipeline: packing invariants against a plain re-computation, exact resume, sharding,
every source, the embedded corpus, and errors that name the file, line and key."""

import copy
import collections
import io
import json
import tokenize

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from configs import common
from train import corpus, data
from rundir import tokenizer as tokenizer_lib

SEQ = 16


def _docs(n=60, seed=0) -> list[str]:
  """Distinct documents from 2 to ~50 tokens, so that rows hold several and some span rows."""
  rng = np.random.default_rng(seed)
  words = "the cat sat on a mat while dogs ran far away from home and birds sang".split()
  return [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(1, 25))) for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tokenizer_lib.train_tokenizer(_docs(200, seed=1), path, vocab_size=300)


@pytest.fixture
def text_config(tmp_path):
  docs = _docs()
  for f in range(3):
    (tmp_path / f"part{f}.txt").write_text("\n\n".join(docs[f::3]) + "\n")
  return _config(source="text", paths=str(tmp_path / "part*.txt")), docs


def _config(**overrides):
  config = common.data_config()
  config.update(overrides)
  return config


def _take(dataset, n):
  it = iter(dataset)
  return [next(it) for _ in range(n)]


def _segments(batches):
  """(input tokens, targets, positions) of every segment, in stream order."""
  out = []
  for batch in batches:
    for row in range(len(batch["tokens"])):
      seg = batch["segment_ids"][row]
      for s in range(1, seg.max() + 1):
        where = seg == s
        out.append((batch["tokens"][row][where], batch["targets"][row][where], batch["positions"][row][where]))
  return out


def _documents_from(batches, tok):
  """Re-assembles whole documents from packed segments (a document ends where a target is eos)."""
  docs, current = [], []
  for inputs, targets, _ in _segments(batches):
    current.extend(inputs.tolist())
    if targets[-1] == tok.eos_id:
      assert current[0] == tok.bos_id
      docs.append(tok.decode(current[1:]))
      current = []
  assert not current, "a document was cut off"
  return docs


def test_packing_matches_a_plain_recomputation(tok, text_config):
  config, _ = text_config
  batches = list(data.make_dataset(config, tok, split="eval", seq_len=SEQ, global_batch_size=4, seed=0,
                                   process_index=0, process_count=1))
  # The reference: each held-out document, in file order, as bos + ids + eos and next-token pairs.
  pieces = collections.deque()
  for text in data.documents(config, "eval"):
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    pieces.append((ids[:-1], ids[1:]))
  assert len(pieces) > 1 and len(batches) > 1
  for batch in batches:
    assert set(batch) == set(data.BATCH_KEYS)
    assert all(v.dtype == np.int32 and v.shape == (4, SEQ) for v in batch.values())
    for row in range(4):
      seg = batch["segment_ids"][row]
      np.testing.assert_array_equal(batch["loss_mask"][row], seg > 0)  # zero exactly on padding
      used = int((seg > 0).sum())
      assert (seg[used:] == 0).all() and (batch["tokens"][row][used:] == 0).all()  # padding only at the end
      if used:
        assert seg[0] == 1 and set(np.diff(seg[:used])) <= {0, 1}  # 1, 2, 3... in order
  # Each segment is the next piece of the current document: it never runs into the next one.
  for inputs, targets, positions in _segments(batches):
    np.testing.assert_array_equal(positions, np.arange(len(inputs)))
    doc_inputs, doc_targets = pieces[0]
    assert len(inputs) <= len(doc_inputs)
    np.testing.assert_array_equal(inputs, doc_inputs[: len(inputs)])
    np.testing.assert_array_equal(targets, doc_targets[: len(inputs)])
    if len(inputs) == len(doc_inputs):
      pieces.popleft()
      assert targets[-1] == tok.eos_id  # a document's last input predicts its own eos
    else:
      pieces[0] = (doc_inputs[len(inputs):], doc_targets[len(inputs):])
  assert not pieces  # one pass covers the split exactly
  # Full rows except the padded tail of the last batch.
  masks = np.concatenate([b["loss_mask"] for b in batches])
  assert masks[:-4].all() and not masks[-1].all()


def test_resume_is_exact(tok, text_config):
  config, _ = text_config
  dataset = data.make_dataset(config, tok, split="train", seq_len=SEQ, global_batch_size=3, seed=5,
                              process_index=0, process_count=1)
  it = iter(dataset)
  expected, states = [], []
  for _ in range(7):
    states.append(json.loads(json.dumps(it.get_state())))  # what a checkpoint stores
    expected.append(next(it))
  for cut in range(7):
    resumed = iter(dataset)
    resumed.set_state(states[cut])
    for want in expected[cut:]:
      got = next(resumed)
      for k in data.BATCH_KEYS:
        np.testing.assert_array_equal(got[k], want[k])
  # Both kinds of state: a document split across rows at the checkpoint, and none.
  assert {s["remainder_slices"]["inputs"] == [-1, -1] for s in states} == {True, False}


def test_same_seed_same_batches_and_epochs_reshuffle(tok, text_config):
  config, docs = text_config
  make = lambda seed, **kw: data.make_dataset(config, tok, split="train", seq_len=SEQ, global_batch_size=1,
                                              seed=seed, process_index=0, process_count=1, **kw)
  a, b, c = _take(make(1), 5), _take(make(1), 5), _take(make(2), 5)
  assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b))
  assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, c))
  two_epochs = _documents_from(list(make(1, num_epochs=2)), tok)
  n = len(data.documents(config, "train"))
  first, second = two_epochs[:n], two_epochs[n:]
  assert sorted(first) == sorted(second) and first != second


def test_document_shards_are_disjoint_and_cover_the_split(tok, text_config):
  config, _ = text_config
  config = copy.deepcopy(config)
  config.process_sharding = "documents"
  shards = [
      # One row per process: drop_remainder then drops nothing, so the cover can be exact.
      _documents_from(list(data.make_dataset(config, tok, split="train", seq_len=SEQ, global_batch_size=3,
                                             seed=0, process_index=p, process_count=3, num_epochs=1)), tok)
      for p in range(3)
  ]
  assert all(shards) and not set(shards[0]) & set(shards[1])
  assert sorted(sum(shards, [])) == sorted(data.documents(config, "train"))


def test_row_sharded_train_batches_do_not_depend_on_the_process_count(tok, text_config):
  config, _ = text_config
  assert config.process_sharding == "rows"
  make = lambda p, n: data.make_dataset(config, tok, split="train", seq_len=SEQ, global_batch_size=4, seed=0,
                                        process_index=p, process_count=n)
  whole, halves = iter(make(0, 1)), [iter(make(0, 2)), iter(make(1, 2))]
  for _ in range(5):
    w, h0, h1 = next(whole), next(halves[0]), next(halves[1])
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(w[k], np.concatenate([h0[k], h1[k]]))


def test_eval_rows_are_slices_of_one_global_batch(tok, text_config):
  config, _ = text_config
  make = lambda p, n: list(data.make_dataset(config, tok, split="eval", seq_len=SEQ, global_batch_size=4, seed=0,
                                             process_index=p, process_count=n))
  whole, halves = make(0, 1), [make(0, 2), make(1, 2)]
  assert len(halves[0]) == len(halves[1]) == len(whole)  # no process runs out first
  for w, h0, h1 in zip(whole, *halves):
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(w[k], np.concatenate([h0[k], h1[k]]))


def test_text_sources_and_globs(tmp_path, text_config):
  config, docs = text_config
  everything = list(data.documents(config, "train")) + list(data.documents(config, "eval"))
  assert sorted(everything) == sorted(docs)
  assert set(data.documents(config, "train")).isdisjoint(data.documents(config, "eval"))
  # Explicit files and patterns, comma-separated; a file named twice is read once.
  parts = [str(tmp_path / f"part{f}.txt") for f in range(3)]
  config.paths = f"{parts[0]}, {tmp_path}/part[12].txt, {parts[0]}"
  assert sorted(list(data.documents(config, "train")) + list(data.documents(config, "eval"))) == sorted(docs)
  # One document per file, and held-out files instead of a held-out share.
  config.update(text_unit="file", paths=parts[0], eval_paths=parts[1])
  assert list(data.documents(config, "train")) == ["\n\n".join(docs[0::3])]
  assert list(data.documents(config, "eval")) == ["\n\n".join(docs[1::3])]


def test_jsonl_with_a_custom_field(tmp_path, tok):
  docs = _docs(20)
  lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
  (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n\n")  # blank lines are skipped
  (tmp_path / "b.jsonl").write_text("\n".join(lines[10:]))
  config = _config(source="jsonl", paths=str(tmp_path / "*.jsonl"), text_field="body", eval_percent=10.0)
  train, held = data.documents(config, "train"), data.documents(config, "eval")
  assert sorted([*train, *held]) == sorted(docs) and len(held) >= 1
  batch = _take(data.make_dataset(config, tok, split="train", seq_len=SEQ, global_batch_size=2, seed=0,
                                  process_index=0, process_count=1), 1)[0]
  assert batch["tokens"].shape == (2, SEQ) and batch["tokens"][0, 0] == tok.bos_id


def test_array_record(tmp_path, tok):
  docs = _docs(30)
  for f, chunk in enumerate((docs[:12], docs[12:])):
    writer = ArrayRecordWriter(str(tmp_path / f"shard{f}.array_record"), "group_size:1")
    for i, d in enumerate(chunk):  # plain text records and JSON records may mix
      writer.write((json.dumps({"text": d}) if i % 2 else d).encode("utf-8"))
    writer.close()
  config = _config(source="array_record", paths=str(tmp_path / "shard*.array_record"), eval_percent=10.0)
  train, held = data.documents(config, "train"), data.documents(config, "eval")
  assert sorted([*train, *held]) == sorted(docs) and len(held) >= 1
  got = _documents_from(list(data.make_dataset(config, tok, split="train", seq_len=SEQ, global_batch_size=1,
                                               seed=0, process_index=0, process_count=1, num_epochs=1)), tok)
  assert sorted(got) == sorted(train)


def test_corpus_reads_docstrings_and_comments(tmp_path, monkeypatch):
  source = '''"""Module doc."""
x = "# not a comment" + '# nor this'  # a trailing comment
y = f"{x!r} # still a string" + """
# inside a triple-quoted string
"""  # after it


class A:
  """Class doc,
     indented."""

  if True:
    def f(self):
      \'\'\'Nested function doc.\'\'\'
      # first line of a block
      # second line
      return "\\\\" + "#no"
'''
  found = [(t.start[0], t.string.lstrip("#").strip()) for t in tokenize.generate_tokens(io.StringIO(source).readline)
           if t.type == tokenize.COMMENT]
  assert corpus.comments(source) == found
  assert corpus.document(source) == (
      "Module doc.\n\na trailing comment\n\nafter it\n\nClass doc,\nindented.\n\nNested function doc.\n\n"
      "first line of a block\nsecond line"
  )
  assert corpus.document("def broken(:\n") is None
  # The walk: sorted, test suites and site-packages skipped, short documents dropped.
  long_doc = f'"""{"word " * 60}"""\n'
  for rel in ("b.py", "a/c.py", "test/t.py", "a/tests/t.py", "site-packages/p.py", "short.py", "bad.py"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text({"short.py": '"""Short."""', "bad.py": "def (:"}.get(rel, long_doc))
  monkeypatch.setattr(corpus, "stdlib_root", lambda: tmp_path)
  corpus.stdlib_documents.cache_clear()
  try:
    assert [name for name, _ in corpus.stdlib_documents()] == ["a/c.py", "b.py"]
  finally:
    corpus.stdlib_documents.cache_clear()


def test_default_corpus_splits(tok):
  config = _config()
  train, held = data.documents(config, "train"), data.documents(config, "eval")
  assert len(train) > 300 and 0 < len(held) < len(train) / 10
  assert set(train).isdisjoint(held)
  batch = _take(data.make_dataset(config, tok, split="eval", seq_len=SEQ, global_batch_size=2, seed=0,
                                  process_index=0, process_count=1), 1)[0]
  assert batch["loss_mask"].all()


def test_errors_name_the_problem(tmp_path, tok):
  with pytest.raises(FileNotFoundError, match=r"config.data.paths: the file '.*missing.txt' does not exist"):
    data.documents(_config(source="text", paths=str(tmp_path / "missing.txt")), "train")
  with pytest.raises(FileNotFoundError, match=r"config.data.paths: the pattern '.*no_dir/\*.txt' matches no file"):
    data.documents(_config(source="text", paths=str(tmp_path / "no_dir" / "*.txt")), "train")
  (tmp_path / "empty.txt").write_text("\n  \n\n")
  with pytest.raises(ValueError, match="hold no documents"):
    data.documents(_config(source="text", paths=str(tmp_path / "empty.txt")), "train")
  (tmp_path / "field.jsonl").write_text('{"text": "fine"}\n{"body": "x", "id": 1}\n')
  with pytest.raises(ValueError, match=r"field.jsonl, line 2 has no field 'text'.*\['body', 'id'\]"):
    data.documents(_config(source="jsonl", paths=str(tmp_path / "field.jsonl")), "train")
  (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n')
  with pytest.raises(ValueError, match=r"broken.jsonl, line 3 is not valid JSON"):
    data.documents(_config(source="jsonl", paths=str(tmp_path / "broken.jsonl")), "train")
  with pytest.raises(ValueError, match=r"config.data.source='parquet' is unknown"):
    data.documents(_config(source="parquet"), "train")
  with pytest.raises(ValueError, match=r"config.data.paths='x.txt' is set, but config.data.source='default'"):
    data.documents(_config(paths="x.txt"), "train")
  (tmp_path / "one.txt").write_text("only one document")
  with pytest.raises(ValueError, match="the eval split of config.data is empty: 1 documents, eval_percent=2.0"):
    data.documents(_config(source="text", paths=str(tmp_path / "one.txt")), "eval")
  with pytest.raises(ValueError, match="global_batch_size=5 is not divisible by process_count=2"):
    data.make_dataset(_config(source="text", paths=str(tmp_path / "one.txt")), tok, split="train", seq_len=SEQ,
                      global_batch_size=5, seed=0, process_index=0, process_count=2)
