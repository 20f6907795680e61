"""The long-context evaluation (align/passkey.py): prompts, scoring and perplexity windows, with a
byte-level tokenizer and oracle answerers (no model has to be good for the harness to be tested)."""

import re

import numpy as np
import pytest
from flax import nnx

import model
from align import passkey


class Bytes:
  """A tokenizer whose tokens are UTF-8 bytes."""
  bos_id = -1

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids):
    return bytes(ids).decode()


def _key_of(prompt):
  return re.search(r"The pass key is (\d+)\. Remember", prompt).group(1)


@pytest.mark.parametrize("length", [256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_prompt_has_the_length_and_the_key_at_the_depth(length, depth):
  tokens = Bytes()
  prompt = passkey.passkey_prompt(tokens, length, depth, "12345")
  sentence = max(len(s) for s in passkey.FILLER.split(". ")) + 2
  assert length - 2 * sentence <= len(tokens.encode(prompt)) <= length + sentence
  assert prompt.startswith(passkey.INSTRUCTION) and prompt.endswith(passkey.QUESTION)
  filler_start = len(passkey.INSTRUCTION)
  needle = prompt.index("The pass key is 12345")
  needle_end = needle + len("The pass key is 12345. Remember it. 12345 is the pass key. ")
  filler_length = len(prompt) - len(passkey.QUESTION) - filler_start - (needle_end - needle)
  assert abs((needle - filler_start) - depth * filler_length) <= sentence
  assert _key_of(prompt) == "12345"


def test_scoring_reads_the_first_number():
  assert passkey.is_right(" 12345. Remember", "12345")
  assert not passkey.is_right(" 1234 5", "12345")
  assert not passkey.is_right(" the key", "12345")
  assert not passkey.is_right(" 123456", "12345")


def test_accuracy_table_against_oracles():
  tokens = Bytes()
  right = passkey.passkey_accuracy(lambda ps: [f" {_key_of(p)}." for p in ps], tokens, [200, 400], [0.0, 1.0], trials=3)
  assert right == {200: {0.0: 1.0, 1.0: 1.0}, 400: {0.0: 1.0, 1.0: 1.0}}

  def near_the_end_only(prompts):  # right when the key is in the last quarter of the prompt
    return [f" {_key_of(p)}" if p.index("pass key is ") > 0.75 * len(p) else " 11111" for p in prompts]

  table = passkey.passkey_accuracy(near_the_end_only, tokens, [400], [0.0, 0.5, 1.0], trials=4)
  assert table == {400: {0.0: 0.0, 0.5: 0.0, 1.0: 1.0}}


def test_perplexity_windows_against_a_float64_loop():
  config = model.get_preset("tiny", num_layers=1, vocab_size=64)
  decoder = model.Transformer(config, rngs=nnx.Rngs(0))
  stream = np.random.default_rng(0).integers(0, 64, 40).astype(np.int32)
  got = passkey.perplexity_by_length(decoder, stream, [8, 12], windows=3)
  for length in (8, 12):
    nll = []
    for w in range(3):
      window = stream[w * (length + 1):(w + 1) * (length + 1)]
      logits = np.asarray(decoder(window[None, :-1])[0], np.float64)
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
      nll += [-logp[t, window[t + 1]] for t in range(length)]
    assert got[length] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
  with pytest.raises(ValueError, match="too few for 3 windows of 21"):
    passkey.perplexity_by_length(decoder, stream, [20], windows=3)


def test_training_examples_answer_their_key_within_the_lengths():
  tokens = Bytes()
  records = passkey.passkey_records(tokens, 40, 300, 600, seed=3)
  sentence = max(len(s) for s in passkey.FILLER.split(". ")) + 2
  lengths, depths = [], []
  for record in records:
    prompt = record["prompt"]
    key = _key_of(prompt)
    assert len(key) == passkey.KEY_DIGITS and prompt.endswith(passkey.QUESTION)
    assert record["completion"] == f" {key}." and record["text"] == prompt + record["completion"]
    lengths.append(len(tokens.encode(prompt)))
    assert 300 - 2 * sentence <= lengths[-1] <= 600 + sentence
    needle = len(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    filler = len(prompt) - len(passkey.INSTRUCTION) - len(passkey.QUESTION) - needle
    depths.append((prompt.index("The pass key is") - len(passkey.INSTRUCTION)) / filler)
  assert max(lengths) - min(lengths) > 200 and min(depths) < 0.2 and max(depths) > 0.8  # drawn, not fixed
  assert records == passkey.passkey_records(tokens, 40, 300, 600, seed=3)
  with pytest.raises(ValueError, match="min_length"):
    passkey.passkey_records(tokens, 1, 300, 200)


def test_the_corpus_file_is_jsonl_that_sft_and_pretraining_read(tmp_path):
  from align import data as align_data
  from align import passkey_corpus
  from configs import common
  from train import data as data_lib

  out = tmp_path / "corpus" / "passkey.jsonl"
  assert passkey_corpus.write_corpus(Bytes(), out, 30, 200, 300, seed=1) == 30
  assert sorted(p.name for p in out.parent.iterdir()) == ["passkey.jsonl"]  # no temp file left
  records = passkey.passkey_records(Bytes(), 30, 200, 300, seed=1)
  assert align_data.read_jsonl(out, "sft") == records
  config = common.data_config()
  config.source, config.paths = "jsonl", str(out)
  read = list(data_lib.documents(config, "train")) + list(data_lib.documents(config, "eval"))
  assert sorted(read) == sorted(r["text"] for r in records)
