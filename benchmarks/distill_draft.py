"""A draft model for speculative decoding, distilled from its target at the sequence level: trained on
the target's own greedy continuations (Kim & Rush 2016; DistillSpec, Zhou et al. 2024, shows that
training on the target's outputs is what raises acceptance).

    python benchmarks/distill_draft.py --target=runs/quickstart --workdir=runs/draft_distilled
    python benchmarks/speculative.py --target=runs/quickstart --draft=runs/draft_distilled/run

1. The target (a run trained on the embedded corpus, like the quickstart) greedily continues
   --prompts windows of --prompt_tokens tokens, consecutive windows of the documents of that
   corpus's *train* split (benchmarks/speculative.py prompts with the held-out split), by --new
   tokens, --batch at a time. Each prompt with its continuation, decoded, is one record of
   WORKDIR/corpus.jsonl (written to a temporary name, then renamed).
2. The draft pre-trains on them with the quickstart recipe, `:size=small` by default (2 layers,
   width 128: 0.9 M parameters against the target's 4.2 M), on the target's tokenizer:
   `python -m train --config=configs/pretrain/quickstart.py:size=small,steps=S
   --config.data.source=jsonl --config.data.paths=WORKDIR/corpus.jsonl
   --config.tokenizer.path=TARGET/tokenizer.model --workdir=WORKDIR/run [--config.init_from=INIT]`.
3. WORKDIR/draft_vocab.json lists the corpus's --draft_vocab most frequent tokens (FR-Spec, Zhao et
   al. 2025): `speculative_generate(..., draft_vocab=ids)` then scores only those in the draft's
   head, most of a small draft's step (benchmarks/speculative.py --draft_vocab=FILE).

A greedy speculative round accepts a draft token when it is the target's argmax, so the draft is
trained on exactly the sequences it will be asked to predict. Greedy, the target's text is often
repetitive (a small model loops): the draft learns those loops too, which is where its acceptance
comes from; on sampled text it is measured separately (benchmarks/speculative.py's sampled rows).
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import infer  # noqa: E402
import rundir  # noqa: E402
from configs.pretrain import quickstart  # noqa: E402
from rundir.tokenizer import MODEL_FILENAME, load_tokenizer  # noqa: E402
from speculative import corpus_prompts  # noqa: E402 (benchmarks/speculative.py, beside this script)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--target", default=os.path.join(REPO, "runs", "quickstart"), help="the target's run directory")
  p.add_argument("--workdir", default=os.path.join(REPO, "runs", "draft_distilled"))
  p.add_argument("--prompts", type=int, default=2048, help="windows of train-split documents to continue")
  p.add_argument("--prompt_tokens", type=int, default=32)
  p.add_argument("--new", type=int, default=224, help="greedy tokens the target adds to each prompt")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--size", default="small", choices=sorted(quickstart.SIZES), help="the draft's quickstart size")
  p.add_argument("--steps", type=int, default=450, help="the draft's training steps")
  p.add_argument("--init", default="", help="optional: a run the draft starts from (else a random init)")
  p.add_argument("--draft_vocab", type=int, default=512, help="frequent tokens written to draft_vocab.json")
  p.add_argument("--override", action="append", default=[],
                 help="more trainer flags, repeatable: --override=--config.model.num_layers=1")
  return p.parse_args(argv)


def write_corpus(args) -> str:
  """WORKDIR/corpus.jsonl, and beside it corpus.json: the settings it was generated with. An
  existing corpus is reused only when those settings are the ones asked for now."""
  path = os.path.join(args.workdir, "corpus.jsonl")
  settings = {"target": args.target, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new": args.new}
  if os.path.exists(path):
    try:
      with open(os.path.join(args.workdir, "corpus.json")) as f:
        saved = json.load(f)
    except FileNotFoundError:
      saved = {}  # settings unknown: nothing matches
    changed = [f"--{key}: {saved.get(key)!r} there, {value!r} now" for key, value in settings.items()
               if saved.get(key) != value]
    if changed:
      raise ValueError(f"{path} was generated with other settings ({'; '.join(changed)}); use another --workdir")
    print(f"{path} exists, generated with the same settings: reusing it", flush=True)
    return path
  target, tokenizer = rundir.load(args.target)
  prompts = corpus_prompts(tokenizer, "train", args.prompts, args.prompt_tokens, every_window=True)
  started = time.perf_counter()
  records = []
  for start in range(0, len(prompts), args.batch):
    batch = prompts[start:start + args.batch]
    out = infer.generate(target, batch, max_new_tokens=args.new)  # greedy
    records += [tokenizer.decode(prompt + list(tokens)) for prompt, tokens in zip(batch, out.tokens)]
    print(f"generated {len(records)}/{len(prompts)} ({time.perf_counter() - started:.0f} s)", flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    for text in records:
      f.write(json.dumps({"text": text}) + "\n")
  with open(os.path.join(args.workdir, "corpus.json"), "w") as f:
    json.dump(settings, f)
  os.replace(temporary, path)  # the corpus last: it exists only beside its settings
  return path


def write_draft_vocab(args, corpus: str) -> None:
  """WORKDIR/draft_vocab.json: the corpus's --draft_vocab most frequent token ids (FR-Spec's
  frequency-ranked subset), for speculative_generate(..., draft_vocab=...), and their coverage."""
  tokenizer = load_tokenizer(os.path.join(args.target, MODEL_FILENAME))  # not the weights again
  counts = collections.Counter()
  with open(corpus, encoding="utf-8") as f:
    for line in f:
      counts.update(int(t) for t in tokenizer.encode(json.loads(line)["text"]))
  top = counts.most_common(args.draft_vocab)
  coverage = sum(n for _, n in top) / sum(counts.values())
  path = os.path.join(args.workdir, "draft_vocab.json")
  with open(path + ".tmp", "w") as f:
    json.dump({"token_ids": sorted(t for t, _ in top), "coverage": coverage}, f)
  os.replace(path + ".tmp", path)
  print(f"{path}: the {len(top)} most frequent tokens cover {coverage:.3f} of the corpus", flush=True)


def main(argv=None):
  args = parse_args(argv)
  # The trainer runs in the repository's root: paths given relative to here must still hold there.
  args.target, args.workdir = os.path.abspath(args.target), os.path.abspath(args.workdir)
  args.init = os.path.abspath(args.init) if args.init else ""
  corpus = write_corpus(args)
  write_draft_vocab(args, corpus)
  command = [
      sys.executable, "-m", "train", f"--config=configs/pretrain/quickstart.py:size={args.size},steps={args.steps}",
      f"--workdir={os.path.join(args.workdir, 'run')}", "--config.data.source=jsonl", f"--config.data.paths={corpus}",
      f"--config.tokenizer.path={os.path.join(args.target, MODEL_FILENAME)}", "--config.sample_prompt=",
  ]
  if args.init:
    command.append(f"--config.init_from={args.init}")
  command += args.override
  print(" ".join(command), flush=True)
  subprocess.check_call(command, cwd=REPO)


if __name__ == "__main__":
  main()
