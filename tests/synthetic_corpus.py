"""A few hundred short synthetic documents in text files: training data for tiny end-to-end runs."""

from pathlib import Path

import numpy as np

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang in trees".split()


def write_corpus(root: Path) -> Path:
  """Four files of 120 documents (5 to 60 words each, seeded) in `root`; returns root."""
  rng = np.random.default_rng(0)
  for f in range(4):
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(5, 60))) + "." for _ in range(120)]
    (root / f"part{f}.txt").write_text("\n\n".join(docs))
  return root
