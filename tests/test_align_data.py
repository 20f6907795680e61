"""Alignment data: JSONL checks name file and line; SFT loss masks cover only completion tokens;
packing keeps examples whole and apart."""

import json

import pytest

from align import data
from rundir import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tok")
  texts = [f"Question: What is {a} + {b}?\nSolution: {a + b}\nAnswer: {a + b}" for a in range(40) for b in range(9)]
  return tokenizer_lib.train_tokenizer(texts, directory / "tok.model", vocab_size=320)


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def test_malformed_lines_name_file_and_line(tmp_path):
  path = _write(tmp_path / "sft.jsonl", [
      json.dumps({"prompt": "a", "completion": "b"}), "", "{not json", json.dumps({"prompt": "a"}),
  ])
  with pytest.raises(data.DataError, match=r"sft\.jsonl:3: invalid JSON"):
    data.read_jsonl(path, "sft")
  assert len(data.read_jsonl(path, "sft", on_error="skip")) == 1
  pairs = _write(tmp_path / "pairs.jsonl", [
      json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1.5}),
      json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}),
  ])
  with pytest.raises(data.DataError, match=r"pairs\.jsonl:2: 'margin' must be a number"):
    data.read_jsonl(pairs, "preference")
  bad_chat = _write(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "robot", "content": "x"}]})])
  with pytest.raises(data.DataError, match=r"chat\.jsonl:1: .*role='robot'"):
    data.read_jsonl(bad_chat, "sft")


def test_loss_mask_covers_only_the_completion(tokenizer):
  record = {"prompt": "Question: What is 3 + 4?\nSolution:", "completion": " 7\nAnswer: 7"}
  features = data.sft_features(record, tokenizer, template="plain", seq_len=64)
  trained = features["targets"][features["target_mask"] == 1].tolist()
  assert trained == tokenizer.encode(" 7\nAnswer: 7") + [tokenizer.eos_id]
  prompt_len = len(tokenizer.encode(record["prompt"]))  # after bos
  assert not features["target_mask"][: prompt_len].any()


def test_chat_records_train_only_assistant_turns(tokenizer):
  record = {"messages": [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
                         {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "2"}]}
  features = data.sft_features(record, tokenizer, template="plain", seq_len=128)
  trained = features["targets"][features["target_mask"] == 1].tolist()
  assert trained == tokenizer.encode("7\n\n") + tokenizer.encode("2\n\n") + [tokenizer.eos_id]


def test_packed_batches_keep_examples_whole(tokenizer):
  records = [{"prompt": f"Question: What is {a} + 1?\nSolution:", "completion": f" {a + 1}\nAnswer: {a + 1}"}
             for a in range(30)]
  ds = data.make_sft_dataset(records, tokenizer, template="plain", seq_len=48, global_batch_size=4, seed=0,
                             split="eval")
  seen = 0
  for batch in ds:
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
    for row in range(4):
      segments = batch["segment_ids"][row]
      for s in set(segments.tolist()) - {0}:
        where = segments == s
        tokens = batch["tokens"][row][where]
        assert tokens[0] == tokenizer.bos_id  # each example starts a segment, whole
        assert batch["positions"][row][where].tolist() == list(range(where.sum()))
        text = tokenizer.decode(batch["targets"][row][where & (batch["loss_mask"][row] == 1)].tolist())
        assert "Answer:" in text and "Question" not in text
        seen += 1
      assert not batch["loss_mask"][row][segments == 0].any()
  assert seen == 30
