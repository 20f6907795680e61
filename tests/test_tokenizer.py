"""The sentencepiece tokenizer: training, exact round trips, determinism, specials, the run's copy."""

import ml_collections
import numpy as np
import pytest

from configs import common
from rundir import tokenizer as tokenizer_lib

VOCAB = 300  # 256 byte pieces, 4 control ids, and a few dozen characters and merges


def _texts(n=200, seed=0):
  rng = np.random.default_rng(seed)
  words = "the cat sat on a mat while dogs ran far away from home and birds sang in trees".split()
  return [" ".join(rng.choice(words, size=rng.integers(3, 30))) + f". Doc {i}.\n  Indented line." for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tokenizer_lib.train_tokenizer(_texts(), path, vocab_size=VOCAB)


def test_round_trip_with_byte_fallback(trained):
  loaded = tokenizer_lib.load_tokenizer(trained.path)
  assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (VOCAB, 0, 2, 3)
  for text in ["the cat sat on a mat", "  two leading spaces,\ttab\n\nblank line ", "naïve café 日本語 🙂", ""]:
    ids = loaded.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert loaded.bos_id not in ids and loaded.eos_id not in ids  # encode adds neither
    assert loaded.decode(ids) == text
  # Unseen characters are bytes, not <unk>: 'é' is two UTF-8 bytes.
  assert [loaded.id_to_piece(i) for i in loaded.encode("é")][-2:] == ["<0xC3>", "<0xA9>"]
  assert loaded.decode(np.array(loaded.encode("cat"), np.int32)) == "cat"  # numpy ids are fine too


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(tmp_path, model_type):
  a = tokenizer_lib.train_tokenizer(_texts(), tmp_path / "a.model", vocab_size=VOCAB, model_type=model_type)
  b = tokenizer_lib.train_tokenizer(iter(_texts()), tmp_path / "b.model", vocab_size=VOCAB, model_type=model_type)
  assert a.path.read_bytes() == b.path.read_bytes()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files left


def test_special_tokens_get_single_ids(tmp_path):
  specials = ("<|user|>", "<|end|>")
  tok = tokenizer_lib.train_tokenizer(_texts(), tmp_path / "t.model", vocab_size=VOCAB, special_tokens=specials)
  assert [tok.encode(s)[-1] for s in specials] == [4, 5]  # right after pad, unk, bos, eos
  ids = tok.encode("<|user|>the cat<|end|>")
  assert 4 in ids and 5 in ids
  assert tok.decode(ids) == "<|user|>the cat<|end|>"


def test_training_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="model_type='wordpiece' is unknown"):
    tokenizer_lib.train_tokenizer(_texts(), tmp_path / "t.model", vocab_size=VOCAB, model_type="wordpiece")
  with pytest.raises(ValueError, match=r"vocab_size=100000 .*failed.*Vocabulary size too high"):
    tokenizer_lib.train_tokenizer(_texts(), tmp_path / "t.model", vocab_size=100_000)
  with pytest.raises(ValueError, match="training texts are empty"):
    tokenizer_lib.train_tokenizer(["", "  \n "], tmp_path / "t.model", vocab_size=VOCAB)
  assert not (tmp_path / "t.model").exists()
  with pytest.raises(FileNotFoundError, match="no_such.model"):
    tokenizer_lib.load_tokenizer(tmp_path / "no_such.model")
  (tmp_path / "junk.model").write_text("not a model")
  with pytest.raises(ValueError, match="junk.model is not a sentencepiece model"):
    tokenizer_lib.load_tokenizer(tmp_path / "junk.model")


def _config(**overrides) -> ml_collections.ConfigDict:
  config = common.tokenizer_config()
  config.vocab_size = VOCAB
  config.update(overrides)
  return config


def test_get_tokenizer_trains_once_then_reuses_the_workdir_copy(tmp_path):
  calls = []

  def texts_fn():
    calls.append(1)
    return _texts()

  first = tokenizer_lib.get_tokenizer(_config(special_tokens="<|a|>, <|b|>"), tmp_path, texts_fn)
  assert first.path == tmp_path / "tokenizer.model" and len(calls) == 1
  assert [first.encode(s)[-1] for s in ("<|a|>", "<|b|>")] == [4, 5]

  def must_not_train():
    raise AssertionError("a resumed run must reuse workdir/tokenizer.model")

  # A resumed run loads the saved model even if the config now asks for something else.
  again = tokenizer_lib.get_tokenizer(_config(vocab_size=999), tmp_path, must_not_train)
  assert again.path.read_bytes() == first.path.read_bytes()


def test_get_tokenizer_copies_a_given_model(trained, tmp_path):
  workdir = tmp_path / "run"
  tok = tokenizer_lib.get_tokenizer(_config(path=str(trained.path)), workdir, lambda: [])
  assert tok.path == workdir / "tokenizer.model"
  assert tok.path.read_bytes() == trained.path.read_bytes()
  with pytest.raises(FileNotFoundError, match=r"config.tokenizer.path=.*missing.model"):
    tokenizer_lib.get_tokenizer(_config(path=str(tmp_path / "missing.model")), tmp_path / "run2", lambda: [])
  with pytest.raises(ValueError, match=r"config.tokenizer: .*vocab_size=100000"):
    tokenizer_lib.get_tokenizer(_config(vocab_size=100_000), tmp_path / "run3", _texts)


def test_other_processes_wait_for_process_zero(tmp_path, monkeypatch):
  monkeypatch.setattr(tokenizer_lib.jax, "process_index", lambda: 1)
  with pytest.raises(TimeoutError, match=r"process 1 waited .* for process 0 to write .*tokenizer.model"):
    tokenizer_lib.get_tokenizer(_config(), tmp_path, _texts, timeout_s=0.2)
  assert not (tmp_path / "tokenizer.model").exists()  # only process 0 writes
