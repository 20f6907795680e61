"""python -m align.passkey_corpus --run=DIR --out=passkey.jsonl --count=4000 --min_length=64 --max_length=128

Writes passkey-retrieval training examples (align/passkey.py: `passkey_records`) as JSONL,
{"prompt", "completion", "text"} per line, lengths counted in the tokens of DIR's tokenizer (a
run's workdir or a Hugging Face directory). SFT on them (`python -m align` with
`--config.sft.train_path=FILE`: the loss on the answer alone, each example whole in its row), as the
long-context extension experiment in README's "Long context" does, or pre-train on the text
(`--config.data.source=jsonl --config.data.paths=FILE`; rows then cut examples apart).
"""

import json
import os

from absl import app, flags

import rundir
from align import passkey
from rundir.atomic import write_atomic

flags.DEFINE_string("run", None, "A run's workdir or a Hugging Face directory: its tokenizer counts lengths.")
flags.DEFINE_string("out", None, "The JSONL file to write (atomically).")
flags.DEFINE_integer("count", 4000, "Documents to write.", lower_bound=1)
flags.DEFINE_integer("min_length", 64, "Shortest prompt, in tokens.", lower_bound=16)
flags.DEFINE_integer("max_length", 128, "Longest prompt, in tokens.", lower_bound=16)
flags.DEFINE_integer("seed", 0, "Keys, lengths and depths.")
FLAGS = flags.FLAGS


def write_corpus(tokenizer, out: str | os.PathLike, count: int, min_length: int, max_length: int, seed: int) -> int:
  """`count` passkey examples as JSONL at `out`, written to a temp file and renamed; returns the count."""
  records = passkey.passkey_records(tokenizer, count, min_length, max_length, seed=seed)
  write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
  return len(records)


def main(argv):
  del argv
  count = write_corpus(rundir.load_tokenizer(FLAGS.run), FLAGS.out, FLAGS.count, FLAGS.min_length,
                       FLAGS.max_length, FLAGS.seed)
  print(f"wrote {count} passkey examples of {FLAGS.min_length}-{FLAGS.max_length} tokens to {FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["run", "out"])
  app.run(main)
